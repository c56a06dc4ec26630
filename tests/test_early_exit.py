"""Early exit: the network, policies, calibration, ONNX segments, controllers, profile, CLI errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.artifacts import EarlyExitModel, TorchModel, load
from edgesmith.compress import Context, early_exit
from edgesmith.early_exit.policy import (
    Budget,
    ExitPolicy,
    calibrate,
    evaluate_policy,
    score_matrix,
    simulate,
)
from edgesmith.errors import BadInput, GateFailed, ValidationFailed
from edgesmith.inputs import tokenize
from edgesmith.runtimes.base import get_runtime

torch.set_num_threads(1)


def _tiny(task: str, tokenizer, seed: int, init: float = 0.02) -> TorchModel:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3,
                     initializer_range=init)
    module = (BertForSequenceClassification if task == "sequence-classification" else BertModel)(cfg).eval()
    return TorchModel(task=task, name=f"tiny-{task}", module=module, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from edgesmith.data import builtin_corpus

    return builtin_corpus(limit=400)


@pytest.fixture(scope="module")
def exit_classifier(minilm_tokenizer, texts, tmp_path_factory) -> EarlyExitModel:
    # large initial weights: predictions that differ between sentences and between exits
    model = _tiny("sequence-classification", minilm_tokenizer, 0, init=0.5)
    out = early_exit(model, Context(texts=texts[:240], progress=False), steps=10, eval_every=5, validation=80,
                     budget="accuracy=0.05")
    return load(out.save(tmp_path_factory.mktemp("ee-classifier") / "model"))


@pytest.fixture(scope="module")
def exit_encoder(minilm_tokenizer, texts, tmp_path_factory) -> EarlyExitModel:
    model = _tiny("feature-extraction", minilm_tokenizer, 1)
    out = early_exit(model, Context(texts=texts[:240], progress=False), steps=10, eval_every=5, validation=80,
                     budget="cosine=0.9")
    return load(out.save(tmp_path_factory.mktemp("ee-encoder") / "model"))


def _with_policy(model: EarlyExitModel, folder: Path, name: str, threshold: float) -> EarlyExitModel:
    """A copy of ``model`` whose policy.json names another policy and threshold."""
    shutil.copytree(model.folder, folder)
    data = json.loads((folder / "policy.json").read_text())
    data.update(name=name, threshold=threshold)
    data.pop("thresholds", None)  # one threshold at every exit
    (folder / "policy.json").write_text(json.dumps(data))
    return load(folder)


_NETWORKS: dict[str, torch.nn.Module] = {}


def _network(model: EarlyExitModel):
    from edgesmith.early_exit.runtime import load_network

    key = str(model.folder)
    if key not in _NETWORKS:
        _NETWORKS[key] = load_network(model)
    return _NETWORKS[key]


def _unsegmented(model: EarlyExitModel, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every exit of the whole PyTorch network on the whole batch, then the policy: the reference."""
    from edgesmith.early_exit.runtime import load_policy

    net = _network(model)
    policy, _ = load_policy(model)
    with torch.no_grad():
        outs = net(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask")),
                   torch.from_numpy(feeds["token_type_ids"]) if "token_type_ids" in feeds else None)
    chosen, index = simulate(policy, [o.numpy() for o in outs], feeds["attention_mask"])
    return chosen, np.asarray(policy.exit_layers)[index]


def _median_threshold(model: EarlyExitModel, feeds, name: str) -> float:
    """A threshold that sends about half the samples out at the first exit where they may leave."""
    net = _network(model)
    with torch.no_grad():
        outs = [o.numpy() for o in net(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))]
    probe = ExitPolicy(name, 0.0, net.exit_layers, model.task)
    scores = score_matrix(probe, outs, feeds["attention_mask"])
    column = 1 if name in ("patience", "agreement") else 0
    score = float(np.median(scores[:, column]))
    return -score if name == "entropy" else score


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


def test_layers_called_one_by_one_reproduce_hidden_states(minilm_tokenizer, texts):
    from edgesmith.early_exit.network import ExitNetwork

    model = _tiny("feature-extraction", minilm_tokenizer, 2)
    feeds = tokenize(minilm_tokenizer, texts[:5], input_names=["input_ids", "attention_mask", "token_type_ids"])
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    net = ExitNetwork(model.module, model.task, [1, 2, 3, 4])
    with torch.no_grad():
        reference = model.module(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        _, states = net(ids, mask, with_hidden=True)
    keep = mask.bool()
    for k, state in enumerate(states, 1):
        assert torch.allclose(state[keep], reference[k][keep], atol=1e-5)


def test_bad_exit_layers_and_architectures(minilm_tokenizer):
    from edgesmith.early_exit.network import ExitNetwork, check_exit_layers

    assert check_exit_layers(None, 6) == [2, 3, 4, 5, 6]
    assert check_exit_layers([3, 1], 6) == [1, 3, 6]
    with pytest.raises(BadInput, match="layers 1-6"):
        check_exit_layers([7], 6)
    with pytest.raises(BadInput, match="BERT-family"):
        ExitNetwork(torch.nn.Linear(2, 2), "feature-extraction", [1])


# ---------------------------------------------------------------------------------------------
# Policies and calibration (numpy, exact)
# ---------------------------------------------------------------------------------------------


def test_each_policy_decides_from_its_own_rule():
    confident = np.array([[10.0, 0.0, 0.0]])
    unsure = np.array([[0.1, 0.0, 0.05]])
    outs = [np.concatenate([confident, unsure]), np.concatenate([confident, unsure]), np.zeros((2, 3))]
    mask = np.ones((2, 1))
    _, idx = simulate(ExitPolicy("entropy", 0.2, [1, 2, 3]), outs, mask)
    assert idx.tolist() == [0, 2]
    _, idx = simulate(ExitPolicy("maxprob", 0.9, [1, 2, 3]), outs, mask)
    assert idx.tolist() == [0, 2]
    # patience 1: the same prediction at two consecutive exits (both rows agree at exits 0 and 1)
    _, idx = simulate(ExitPolicy("patience", 1, [1, 2, 3]), outs, mask)
    assert idx.tolist() == [1, 1]
    flip = [outs[0], np.array([[0.0, 5.0, 0.0], [0.1, 0.0, 0.05]]), outs[2]]
    _, idx = simulate(ExitPolicy("patience", 1, [1, 2, 3]), flip, mask)
    assert idx.tolist() == [2, 1]
    # agreement (encoders): cosine of consecutive pooled embeddings
    tokens = np.ones((2, 2, 4))
    other = tokens.copy()
    other[1] = -1.0
    mask = np.array([[1, 1], [1, 0]])
    _, idx = simulate(ExitPolicy("agreement", 0.99, [1, 2, 3], task="feature-extraction"),
                      [tokens, other, tokens], mask)
    assert idx.tolist() == [1, 2]


def test_policy_names_are_checked_against_the_task():
    with pytest.raises(BadInput, match="does not fit"):
        ExitPolicy("agreement", 0.9, [1, 2], task="sequence-classification")
    with pytest.raises(BadInput, match="does not fit"):
        ExitPolicy("entropy", 0.9, [1, 2], task="feature-extraction")
    with pytest.raises(BadInput, match="unknown exit policy"):
        ExitPolicy("magic", 0.9, [1, 2])
    for bad in ("accuracy", "accuracy=2", "speed=0.1", "accuracy=x"):
        with pytest.raises(BadInput):
            Budget.parse(bad)
    with pytest.raises(BadInput, match="does not fit"):
        Budget.parse("cosine=0.9").check_task("sequence-classification")


def _synthetic(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Exit logits that get closer to the final ones with depth; labels = the final prediction
    flipped for a tenth of the samples."""
    rng = np.random.default_rng(seed)
    final = rng.normal(size=(n, 5)) * 3
    outs = [final + rng.normal(size=(n, 5)) * noise for noise in (4.0, 2.0, 1.0)] + [final]
    labels = final.argmax(1)
    flip = rng.random(n) < 0.1
    labels[flip] = (labels[flip] + 1) % 5
    return outs, labels


@pytest.mark.parametrize("name", ["entropy", "maxprob", "patience"])
def test_calibration_meets_its_budget_on_held_out_data(name):
    outs, labels = _synthetic(20000, 0)
    calib = [o[:10000] for o in outs]
    held = [o[10000:] for o in outs]
    mask = np.ones((10000, 1))
    budget = Budget.parse("accuracy=0.02")
    policy = calibrate(name, "sequence-classification", [2, 3, 4, 6], calib, mask, budget, labels[:10000])
    assert policy.calibration["accuracy_drop"] <= 0.02 + 1e-9
    assert policy.calibration["expected_layers"] < 6  # it saves layers
    result = evaluate_policy(policy, held, mask, labels[10000:])
    # 10,000 held-out samples: the standard error of a 2 % drop is ~0.0014
    assert result["accuracy_drop"] <= 0.02 + 0.005
    assert sum(result["histogram"].values()) == 10000
    tight = calibrate(name, "sequence-classification", [2, 3, 4, 6], calib, mask, Budget.parse("accuracy=0.0"),
                      labels[:10000])
    assert tight.calibration["expected_layers"] >= policy.calibration["expected_layers"]


@pytest.mark.parametrize("name", ["entropy", "maxprob", "patience"])
def test_per_exit_thresholds_save_layers_and_hold_the_budget_on_held_out_data(name):
    outs, labels = _synthetic(20000, 2)
    calib, held = [o[:10000] for o in outs], [o[10000:] for o in outs]
    mask = np.ones((10000, 1))
    budget = Budget.parse("accuracy=0.02")
    shared = calibrate(name, "sequence-classification", [2, 3, 4, 6], calib, mask, budget, labels[:10000],
                       thresholds="shared")
    per_exit = calibrate(name, "sequence-classification", [2, 3, 4, 6], calib, mask, budget, labels[:10000])
    assert shared.thresholds is None and len(per_exit.thresholds) == 3
    assert per_exit.calibration["accuracy_drop"] <= 0.02 + 1e-9
    # coordinate descent starts from the shared threshold: it can only save layers
    assert per_exit.calibration["expected_layers"] <= shared.calibration["expected_layers"] + 1e-12
    assert per_exit.calibration["shared_threshold_layers"] == pytest.approx(shared.calibration["expected_layers"])
    result = evaluate_policy(per_exit, held, mask, labels[10000:])
    assert result["accuracy_drop"] <= 0.02 + 0.005
    if name != "patience":  # on these exits a continuous score has room to differ per exit
        assert per_exit.calibration["expected_layers"] < shared.calibration["expected_layers"] - 0.05
        assert len(set(per_exit.thresholds)) > 1
    # the policy decides with the per-exit thresholds: simulate reproduces the calibration's histogram
    _, index = simulate(per_exit, calib, mask)
    counts = np.bincount(index, minlength=4)
    assert {str(layer): int(c) for layer, c in zip([2, 3, 4, 6], counts)} == per_exit.calibration["histogram"]


def test_calibration_judges_against_the_reference_model():
    """A jointly trained network is judged against the original model, not its own last exit."""
    outs, labels = _synthetic(6000, 3)
    mask = np.ones((6000, 1))
    budget = Budget.parse("accuracy=0.01")
    own = calibrate("maxprob", "sequence-classification", [2, 3, 4, 6], outs, mask, budget, labels)
    # a weaker original (here: as accurate as exit 1) lowers the accuracy floor: fewer layers needed
    moved = calibrate("maxprob", "sequence-classification", [2, 3, 4, 6], outs, mask, budget, labels,
                      reference=outs[1])
    assert moved.calibration["accuracy_full"] == pytest.approx(float((outs[1].argmax(1) == labels).mean()))
    assert own.calibration["accuracy_full"] == pytest.approx(float((outs[-1].argmax(1) == labels).mean()))
    assert moved.calibration["accuracy_drop"] <= 0.01 + 1e-9
    assert moved.calibration["expected_layers"] < own.calibration["expected_layers"]
    # a reference the network cannot match at any exit: the budget cannot hold, exit 3 (a gate)
    rng = np.random.default_rng(0)
    with pytest.raises(GateFailed, match="even the full network misses it"):
        calibrate("maxprob", "sequence-classification", [2, 3, 4, 6], outs, mask, budget,
                  reference=rng.normal(size=outs[0].shape))


def test_per_exit_thresholds_round_trip_and_are_checked(tmp_path):
    policy = ExitPolicy("entropy", 0.5, [2, 4, 6], thresholds=[0.2, 0.7])
    policy.save(tmp_path / "policy.json")
    again = ExitPolicy.from_json(json.loads((tmp_path / "policy.json").read_text()))
    assert again.thresholds == [0.2, 0.7] and again.threshold_at(1) == 0.7
    assert "2: 0.2" in again.describe() and "4: 0.7" in again.describe()
    with pytest.raises(BadInput, match="per-exit thresholds"):
        ExitPolicy("entropy", 0.5, [2, 4, 6], thresholds=[0.2])
    with pytest.raises(BadInput, match="thresholds 'some'"):
        calibrate("entropy", "sequence-classification", [1, 2], [np.zeros((4, 2))] * 2, np.ones((4, 1)),
                  Budget.parse("accuracy=0.1"), thresholds="some")


def test_calibration_of_agreement_meets_a_cosine_budget():
    rng = np.random.default_rng(1)
    final = rng.normal(size=(4000, 1, 16))
    outs = [final + rng.normal(size=final.shape) * s for s in (1.0, 0.3, 0.1)] + [final]
    mask = np.ones((4000, 1))
    policy = calibrate("agreement", "feature-extraction", [1, 2, 3, 4], [o[:2000] for o in outs], mask[:2000],
                       Budget.parse("cosine=0.97"))
    held = evaluate_policy(policy, [o[2000:] for o in outs], mask[2000:])
    assert policy.calibration["cosine"] >= 0.97
    assert held["cosine"] >= 0.97 - 0.005
    assert policy.calibration["expected_layers"] < 4


# ---------------------------------------------------------------------------------------------
# The pass, its artifact, export validation
# ---------------------------------------------------------------------------------------------


def test_pass_output_is_a_validated_segmented_artifact(exit_classifier):
    entry = exit_classifier.lineage[-1]
    report = entry["report"]
    assert entry["pass"] == "early-exit"
    assert report["exit_layers"] == [2, 3, 4]
    assert [s["layers"] for s in report["segment_validation"]] == [[0, 2], [2, 3], [3, 4]]
    assert all(s["max_abs"] <= 1e-3 and s["min_cosine"] >= 0.9999 for s in report["segment_validation"])
    assert report["calibration"]["accuracy_drop"] <= 0.05 + 1e-9
    assert sum(report["exit_histogram"].values()) == report["calibration_texts"] == 80
    policy = json.loads((exit_classifier.folder / "policy.json").read_text())
    assert [s["file"] for s in policy["segments"]] == ["segment-00.onnx", "segment-01.onnx", "segment-02.onnx"]
    assert policy["segments"][1]["inputs"] == ["hidden_in", "attention_mask"]
    assert exit_classifier.kind == "early-exit" and exit_classifier.size_bytes() > 0


def test_segment_validation_names_a_segment_that_differs(exit_classifier, texts):
    from edgesmith.early_exit.runtime import load_network
    from edgesmith.early_exit.segments import validate_segments

    net = load_network(exit_classifier)
    segments = exit_classifier.policy_data["segments"]
    names = exit_classifier.input_names
    ok = validate_segments(net, exit_classifier.folder, segments, exit_classifier.tokenizer, texts[:40],
                           input_names=names, atol=1e-3, min_cosine=0.9999, label="tiny")
    assert len(ok) == 3
    with torch.no_grad():
        net.heads[1].out.bias.add_(1.0)  # the torch side of segment 1 no longer matches its ONNX file
    with pytest.raises(ValidationFailed, match="segment 1"):
        validate_segments(net, exit_classifier.folder, segments, exit_classifier.tokenizer, texts[:40],
                          input_names=names, atol=1e-3, min_cosine=0.9999, label="tiny")


# ---------------------------------------------------------------------------------------------
# Controllers: equal to the unsegmented model at any batch size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["entropy", "maxprob", "patience"])
def test_classifier_controllers_equal_the_unsegmented_model(exit_classifier, texts, tmp_path, policy):
    tok = exit_classifier.tokenizer
    names = exit_classifier.input_names
    probe = tokenize(tok, texts[300:332], input_names=names)
    threshold = 1.0 if policy == "patience" else _median_threshold(exit_classifier, probe, policy)
    model = _with_policy(exit_classifier, tmp_path / policy, policy, threshold)
    sessions = [get_runtime("onnxruntime").load(model), get_runtime("torch").load(model)]
    seen_layers: set[int] = set()
    for batch in (1, 3, 8):
        for start in range(0, 24, batch):
            feeds = tokenize(tok, texts[300 + start:300 + start + batch], input_names=names)
            ref_logits, ref_layers = _unsegmented(model, feeds)
            for session in sessions:
                out = session.run(feeds)
                assert out["exit_layer"].tolist() == ref_layers.tolist(), (session.runtime, batch)
                np.testing.assert_allclose(out["logits"], ref_logits, atol=1e-4)
            seen_layers.update(ref_layers.tolist())
    stats = sessions[0].exit_stats()
    assert stats["samples"] == 3 * 24 and stats["segment_rows"][0] == 72
    if policy != "patience":  # a barely trained tiny model predicts alike at every exit; see the test below
        assert len(seen_layers) >= 2, "the threshold should send samples out at different exits"
        assert stats["segment_rows"][-1] < 72  # later segments ran on gathered, smaller batches


def _table_runners(table: np.ndarray) -> list:
    """Segments whose exit output for a sample is ``table[segment, sample id]``; the id travels in
    the first token (input_ids) and then in the hidden state, as a real hidden state would."""
    def runner(i: int):
        def run(feeds):
            ids = feeds["input_ids"][:, 0] if i == 0 else feeds["hidden_in"][:, 0, 0].astype(np.int64)
            hidden = np.repeat(ids.astype(np.float32)[:, None, None], 2, axis=1)
            return hidden, table[i, ids]
        return run
    return [runner(i) for i in range(table.shape[0])]


@pytest.mark.parametrize("name,threshold", [("entropy", 0.6), ("maxprob", 0.7), ("patience", 1), ("patience", 2),
                                            ("agreement", 0.5), ("maxprob", [0.9, 0.6, 0.75]),
                                            ("entropy", [0.3, 0.8, 0.5]), ("patience", [2, 1, 1])])
def test_controller_gathers_rows_and_keeps_each_samples_policy_state(name, threshold):
    from edgesmith.early_exit.runtime import ExitController

    rng = np.random.default_rng(3)
    n = 40
    task = "feature-extraction" if name == "agreement" else "sequence-classification"
    if task == "feature-extraction":
        base = rng.normal(size=(n, 2, 6))
        table = np.stack([base + rng.normal(size=base.shape) * s for s in (1.5, 1.0, 0.5, 0.0)]).astype(np.float32)
    else:
        base = rng.normal(size=(n, 3)) * 2
        table = np.stack([base + rng.normal(size=base.shape) * s for s in (1.5, 1.0, 0.5, 0.0)]).astype(np.float32)
    if isinstance(threshold, list):  # per-exit thresholds
        policy = ExitPolicy(name, threshold[0], [1, 2, 3, 4], task, thresholds=threshold)
    else:
        policy = ExitPolicy(name, threshold, [1, 2, 3, 4], task)
    mask = np.ones((n, 2), dtype=np.int64)
    reference, ref_index = simulate(policy, list(table), mask)
    controller = ExitController(_table_runners(table), policy, "out", ["input_ids", "attention_mask"])
    for batch in (1, 3, 8):
        for start in range(0, n, batch):
            ids = np.arange(start, min(n, start + batch))
            feeds = {"input_ids": np.stack([ids, ids], axis=1), "attention_mask": mask[ids]}
            out = controller.run(feeds)
            assert out["exit_layer"].tolist() == (ref_index[ids] + 1).tolist(), batch
            np.testing.assert_array_equal(out["out"], reference[ids])
    assert len(set(ref_index.tolist())) >= 2
    assert controller.stats()["segment_rows"][-1] < 3 * n


def test_encoder_controllers_equal_the_unsegmented_model(exit_encoder, texts, tmp_path):
    tok = exit_encoder.tokenizer
    names = exit_encoder.input_names
    probe = tokenize(tok, texts[300:332], input_names=names)
    model = _with_policy(exit_encoder, tmp_path / "agree", "agreement",
                         _median_threshold(exit_encoder, probe, "agreement"))
    sessions = [get_runtime("onnxruntime").load(model), get_runtime("torch").load(model)]
    seen: set[int] = set()
    for batch in (1, 3, 8):
        for start in range(0, 24, batch):
            feeds = tokenize(tok, texts[300 + start:300 + start + batch], input_names=names)
            ref, ref_layers = _unsegmented(model, feeds)
            keep = feeds["attention_mask"].astype(bool)
            for session in sessions:
                out = session.run(feeds)
                assert out["exit_layer"].tolist() == ref_layers.tolist()
                np.testing.assert_allclose(out["last_hidden_state"][keep], ref[keep], atol=1e-4)
            seen.update(ref_layers.tolist())
    assert len(seen) >= 2


def test_quality_and_profile_read_the_artifact(exit_classifier, texts):
    from edgesmith.profiling import Profile, profile
    from edgesmith.quality import logits

    scores = logits(exit_classifier, texts[:20])
    assert scores.shape == (20, 3)
    prof = profile(exit_classifier, batch=2, seq=16, warmup=1, iterations=6, texts=texts[:200])
    ex = prof.early_exit
    assert ex is not None and ex.samples == 12 and sum(ex.histogram.values()) == 12
    assert ex.total_layers == 4 and len(ex.segment_ms) == 3 and ex.segment_ms[0] > 0
    assert sum(ex.expected_histogram.values()) == 80
    again = Profile.from_dict(prof.model_dump(mode="json"))
    assert again.early_exit == ex
    from edgesmith.profiling import compare

    comparison = compare([prof, prof])
    lines = comparison.early_exit_lines()
    assert len(lines) == 2 and f"of {ex.total_layers} layers" in lines[0]
    assert f"measured mean {prof.stats.mean:.2f} ms" in lines[0] and f"{ex.expected_ms:.2f} ms" in lines[0]
    assert "Early exit, " in comparison.markdown()
    old = prof.model_dump(mode="json")
    old.pop("early_exit")
    assert Profile.from_dict(old).early_exit is None  # profiles written before the field still load


def test_quantize_segments(exit_classifier, texts):
    from edgesmith.compress import get_pass

    out = get_pass("quantize-segments")()(exit_classifier, Context(texts=texts[:64], progress=False))
    report = out.lineage[-1]["report"]
    assert out.kind == "early-exit" and out.meta["precision"] == "int8-dynamic"
    assert report["size_bytes"] < report["size_bytes_before"]
    assert 0.0 <= report["same_exit"] <= 1.0 and "agreement" in report
    with pytest.raises(BadInput, match="onnxruntime"):
        get_runtime("torch").load(out)  # INT8 segments have no torch twin


def test_bad_inputs_exit_2(capsys, tiny_classifier_dir, tmp_path):
    from edgesmith.cli.app import main

    def cli(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as info:
            main(["early-exit", *args, "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")])
        return info.value.code, capsys.readouterr().err

    model = str(tiny_classifier_dir)
    for args, words in [
        (("--data", "builtin:wordnet", "--budget", "accuracy=2"), "between 0 and 1"),
        (("--data", "builtin:wordnet", "--budget", "latency=0.1"), "budget metric"),
        (("--data", "builtin:wordnet", "--policy", "magic"), "--policy magic"),
        (("--data", "builtin:wordnet", "--exits", "a,b"), "--exits"),
        (("--data", str(tmp_path / "none.jsonl"), "--limit", "40"), "not found"),
        (("--data", "builtin:wordnet", "--limit", "60", "--policy", "agreement"), "does not fit"),
        (("--data", "builtin:wordnet", "--limit", "60", "--budget", "cosine=0.9"), "does not fit"),
        (("--data", "builtin:wordnet", "--limit", "60", "--exits", "9"), "layers 1-2"),
        (("--data", "builtin:wordnet", "--thresholds", "each"), "--thresholds each"),
    ]:
        code, err = cli(model, *args)
        assert code == 2, (args, err)
        assert words in err and "Traceback" not in err, (args, err)


def test_thresholds_never_exit_round_trip(tmp_path):
    policy = ExitPolicy("maxprob", math.inf, [2, 4])
    policy.save(tmp_path / "policy.json")
    again = ExitPolicy.from_json(json.loads((tmp_path / "policy.json").read_text()))
    assert again.threshold == math.inf


def test_recipe_early_exit_then_quantize_segments(minilm_tokenizer, tmp_path, cache_dir):
    from edgesmith.pipeline import run

    folder = tmp_path / "tiny-clf"
    _tiny("sequence-classification", minilm_tokenizer, 4).module.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    recipe = {
        "name": "ee", "model": str(folder), "data": {"limit": 120},
        "steps": [{"early-exit": {"steps": 4, "eval_every": 2, "validation": 40, "budget": "accuracy=0.05"}},
                  {"quantize-segments": {"eval_texts": 16}}],
        "profile": {"batch": 2, "seq": 16, "warmup": 1, "iterations": 5, "artifacts": ["source", "quantize-segments"]},
    }
    result = run(recipe, runs_dir=tmp_path / "runs", progress=False)
    steps = result.manifest["steps"]
    assert [s["kind"] for s in steps] == ["early-exit", "early-exit"]
    assert set(result.metrics["quantize-segments"]) >= {"agreement", "logits_cosine"}
    exits = [p for p in result.profiles if p.artifact.kind == "early-exit"]
    assert len(exits) == 1 and exits[0].early_exit is not None and exits[0].early_exit.samples == 10


def test_early_exit_after_head_pruning_runs_on_both_runtimes(minilm_tokenizer, texts, tmp_path):
    """A head-pruned backbone cannot be described by a stock config: the early-exit model's torch
    twin must come back through edgesmith's structure record, equal to the ONNX segments."""
    from edgesmith.compress import prune

    model = _tiny("sequence-classification", minilm_tokenizer, 5, init=0.5)
    pruned = prune(model, Context(progress=False), heads=0.5, ffn=0.5)
    assert pruned.structure  # the heads changed: reloading needs the structure record
    out = early_exit(pruned, Context(texts=texts[:160], progress=False), steps=4, eval_every=2, validation=60,
                     budget="accuracy=0.05", thresholds="shared")
    model = load(out.save(tmp_path / "ee-pruned"))
    assert json.loads((model.folder / "torch" / "edgesmith.json").read_text())["structure"] == pruned.structure
    feeds = tokenize(model.tokenizer, texts[300:306], input_names=model.input_names)
    a = get_runtime("onnxruntime").load(model).run(feeds)
    b = get_runtime("torch").load(model).run(feeds)
    assert a["exit_layer"].tolist() == b["exit_layer"].tolist()
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4)


def test_cli_early_exit_then_profile_and_compare(capsys, tiny_classifier_dir, texts, tmp_path):
    """The user's path: early-exit on labelled data, profile the artifact, compare it with the full model."""
    from edgesmith.cli.app import main

    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(texts[:160])))

    def cli(*args: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(list(args))
        out = capsys.readouterr()
        assert info.value.code == 0, out.err
        return out.out

    out = cli("early-exit", str(tiny_classifier_dir), "--data", str(data), "--label-field", "label", "--budget",
              "accuracy=0.05", "--exits", "1", "--steps", "4", "--validation", "60", "--max-length", "32",
              "-o", str(tmp_path / "ee"),
              "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--json")
    result = json.loads(out)
    report = result["report"]
    assert report["calibration"]["labels"] is True and report["calibration"]["accuracy_drop"] <= 0.05 + 1e-9
    assert len(report["thresholds"]) == len(report["exit_layers"]) - 1  # per-exit by default
    policy = json.loads((tmp_path / "ee" / "policy.json").read_text())
    assert policy["thresholds"] == report["thresholds"]
    common = ("--batch", "2", "--seq", "16", "--warmup", "1", "--iterations", "6")
    cli("export", str(tiny_classifier_dir), "-o", str(tmp_path / "full"), "--runs-dir", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache"), "--json")
    cli("profile", str(tmp_path / "full"), *common, "--output", str(tmp_path / "full.json"))
    shown = cli("profile", str(tmp_path / "ee"), *common, "--output", str(tmp_path / "ee.json"))
    assert "early exit:" in shown and "expected from the calibration histogram" in shown
    compared = cli("compare", str(tmp_path / "full.json"), str(tmp_path / "ee.json"))
    assert "early exit," in compared and "measured mean" in compared
