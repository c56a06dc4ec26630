"""Quality metrics and gates: embeddings, fidelity, neighbour recall, accuracy, check_gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgesmith.artifacts import TorchModel, default_model_path
from edgesmith.errors import BadInput
from edgesmith.quality import accuracy, check_gates, embed, evaluate, fidelity, logits, neighbour_recall, row_cosines

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522)
TEXTS = [
    "the cat sat on the mat", "a dog barked at the mailman all morning", "rain again",
    "she sold her old bicycle to a neighbour", "prices rose sharply in the third quarter",
    "he plays the violin", "the committee postponed its decision until next week",
    "bread is baked early", "they walked along the river at dusk", "an old map of the city",
    "the engine would not start in the cold", "children laughed in the garden",
    "a letter arrived from abroad", "the museum opens at nine",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def encoder(tokenizer) -> TorchModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    module = BertModel(BertConfig(**TINY, attn_implementation="eager")).eval()
    return TorchModel(name="tiny", module=module, tokenizer=tokenizer)


def make_classifier(tokenizer, bias: tuple[float, float]) -> TorchModel:
    """A tiny classifier whose head ignores the text: zero weights, so it always predicts the class
    with the larger bias. Its answers are known without running it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(**TINY, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    module = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        module.classifier.weight.zero_()
        module.classifier.bias.copy_(torch.tensor(bias))
    return TorchModel(name="cls", task="sequence-classification", module=module, tokenizer=tokenizer)


# -- fidelity on constructed embeddings ----------------------------------------------------------


def clustered(seed: int = 0) -> np.ndarray:
    """12 points in 4 tight clusters of 3 around orthogonal directions: each point's 2 nearest
    neighbours are exactly its two cluster mates."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:4]
    points = np.repeat(centres, 3, axis=0) + 0.01 * rng.standard_normal((12, 8))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_identical_embeddings_are_perfect():
    emb = clustered()
    metrics = fidelity(emb, emb.copy(), k=2)
    assert metrics["cosine"] == pytest.approx(1.0)
    assert metrics["cosine_min"] == pytest.approx(1.0)
    assert metrics["recall@2"] == 1.0


def test_swapped_points_give_known_recall():
    ref = clustered()
    cand = ref.copy()
    a, b = 6, 9  # first point of cluster 2 and of cluster 3 trade places
    cand[[a, b]] = ref[[b, a]]
    metrics = fidelity(ref, cand, k=2)
    # a and b: 0 of 2 neighbours kept; their four former mates: 1 of 2; the other six: 2 of 2
    assert metrics["recall@2"] == pytest.approx((6 * 1.0 + 4 * 0.5 + 2 * 0.0) / 12)
    expected_cos = row_cosines(ref, cand)
    assert metrics["cosine"] == pytest.approx(expected_cos.mean())
    assert metrics["cosine_min"] == pytest.approx(float(ref[a] @ ref[b]), abs=1e-9) and metrics["cosine_min"] < 0.1


def test_noise_lowers_cosine_and_recall():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((64, 16))
    slight = fidelity(ref, ref + 0.05 * rng.standard_normal(ref.shape), k=10)
    heavy = fidelity(ref, ref + 1.0 * rng.standard_normal(ref.shape), k=10)
    assert 0.99 < slight["cosine"] < 1.0
    assert heavy["cosine"] < slight["cosine"]
    assert heavy["recall@10"] < slight["recall@10"] <= 1.0


def test_recall_needs_more_texts_than_k():
    emb = clustered()
    with pytest.raises(BadInput, match="more than 12 texts"):
        neighbour_recall(emb, emb, k=12)
    with pytest.raises(BadInput, match="shapes"):
        fidelity(emb, emb[:, :4], k=2)


# -- running artifacts ---------------------------------------------------------------------------


def test_embed_is_masked_mean_pooling(encoder, tokenizer):
    emb = embed(encoder, TEXTS, batch_size=4)
    assert emb.shape == (len(TEXTS), 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # by hand, one text at a time (no padding at all)
    for i in (0, 6):
        enc = tokenizer([TEXTS[i]], return_tensors="pt")
        with torch.no_grad():
            hidden = encoder.module(**enc).last_hidden_state[0]
        pooled = hidden.mean(dim=0).numpy()
        assert np.allclose(emb[i], pooled / np.linalg.norm(pooled), atol=1e-5)


def test_embed_same_alone_and_padded(encoder):
    together = embed(encoder, TEXTS, batch_size=len(TEXTS))
    alone = np.stack([embed(encoder, [t])[0] for t in TEXTS[:3]])
    assert np.allclose(together[:3], alone, atol=1e-5)


def test_embed_onnx_matches_torch(encoder, tmp_path):
    from edgesmith.export.onnx import ExportPass
    from edgesmith.passes import Context

    onnx_model = ExportPass()(encoder, Context(workdir=tmp_path))
    metrics = evaluate(onnx_model, encoder, TEXTS, k=5)
    assert metrics["cosine_min"] > 0.9999
    assert metrics["recall@5"] == 1.0


def test_evaluate_against_itself_and_with_precomputed(encoder):
    metrics = evaluate(encoder, encoder, TEXTS, k=5)
    assert set(metrics) == {"cosine", "cosine_min", "recall@5"}
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["recall@5"] == 1.0
    # precomputed reference outputs: the reference is not needed any more
    shifted = embed(encoder, TEXTS)[::-1].copy()  # rows in the wrong order: far from the truth
    wrong = evaluate(encoder, None, TEXTS, k=5, reference_embeddings=shifted)
    assert wrong["cosine"] < 0.99
    with pytest.raises(BadInput, match="rows"):
        evaluate(encoder, None, TEXTS, k=5, reference_embeddings=shifted[:3])
    with pytest.raises(BadInput, match="reference"):
        evaluate(encoder, None, TEXTS)


def test_embed_refuses_classifier(tokenizer):
    with pytest.raises(BadInput, match="feature-extraction"):
        embed(make_classifier(tokenizer, (0.0, 3.0)), TEXTS)


# -- classifiers ---------------------------------------------------------------------------------


def test_accuracy_int_and_named_labels(tokenizer):
    model = make_classifier(tokenizer, (0.0, 3.0))  # always "pos" (1)
    texts = TEXTS[:4]
    assert logits(model, texts).argmax(axis=1).tolist() == [1, 1, 1, 1]
    assert accuracy(model, texts, [1, 1, 0, 1]) == 0.75
    assert accuracy(model, texts, ["pos", "neg", "neg", "pos"]) == 0.5
    assert accuracy(model, texts, np.array([1, 1, 1, 1])) == 1.0
    with pytest.raises(BadInput, match="not one of the model's labels"):
        accuracy(model, texts, ["pos", "maybe", "neg", "pos"])
    with pytest.raises(BadInput, match="out of range"):
        accuracy(model, texts, [1, 2, 0, 1])
    with pytest.raises(BadInput, match="one label per text"):
        accuracy(model, texts, [1, 1])


def test_evaluate_classifier(tokenizer):
    pos = make_classifier(tokenizer, (0.0, 3.0))
    neg = make_classifier(tokenizer, (3.0, 0.0))
    itself = evaluate(pos, pos, TEXTS)
    assert itself == {"agreement": 1.0, "logits_cosine": pytest.approx(1.0)}
    flipped = evaluate(pos, neg, TEXTS[:4], labels=[1, 0, 1, 1])
    assert flipped["agreement"] == 0.0
    assert flipped["logits_cosine"] == pytest.approx(0.0, abs=1e-6)  # (0, 3) vs (3, 0)
    assert flipped["accuracy"] == 0.75
    with pytest.raises(BadInput, match="cannot compare"):
        evaluate(pos, make_encoder_like(tokenizer), TEXTS)


def make_encoder_like(tokenizer) -> TorchModel:
    from transformers import BertConfig, BertModel

    return TorchModel(module=BertModel(BertConfig(**TINY)).eval(), tokenizer=tokenizer)


# -- gates ---------------------------------------------------------------------------------------


def test_gate_beyond_max_drop_fails():
    metrics = {"cosine": 0.97, "cosine_min": 0.9, "recall@10": 0.8, "accuracy": 0.81}
    source = {"cosine": 1.0, "recall@10": 1.0, "accuracy": 0.85}
    failures = check_gates(metrics, source, {"cosine": 0.02, "recall@10": 0.25, "accuracy": 0.03})
    assert len(failures) == 2
    by_metric = {f["metric"]: f for f in failures}
    assert by_metric["cosine"] == {"metric": "cosine", "value": 0.97, "reference": 1.0,
                                   "drop": pytest.approx(0.03), "max_drop": 0.02}
    assert by_metric["accuracy"]["reference"] == 0.85
    assert by_metric["accuracy"]["drop"] == pytest.approx(0.04)


def test_gate_within_max_drop_holds():
    metrics = {"cosine": 0.99, "recall@10": 0.9, "accuracy": 0.84}
    assert check_gates(metrics, {"accuracy": 0.85}, {"cosine": 0.01, "recall@10": 0.1, "accuracy": 0.01}) == []
    # the reference of cosine is 1.0 even when the source's own figure is a hair below
    assert check_gates({"cosine": 0.99}, {"cosine": 0.9999999}, {"cosine": 0.01}) == []


def test_gate_errors():
    with pytest.raises(BadInput, match="unknown metric 'bleu'.*cosine.*accuracy"):
        check_gates({"cosine": 1.0}, {}, {"bleu": 0.1})
    with pytest.raises(BadInput, match="accuracy needs labels"):
        check_gates({"cosine": 1.0}, {}, {"accuracy": 0.1})
    with pytest.raises(BadInput, match="max_drop must be a number"):
        check_gates({"cosine": 1.0}, {}, {"cosine": "a lot"})
    with pytest.raises(BadInput, match="source model's own accuracy"):
        check_gates({"accuracy": 0.5}, {}, {"accuracy": 0.1})
