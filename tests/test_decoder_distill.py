"""Distilling a depth-pruned decoder back towards its teacher: logit KL recovers held-out fidelity,
and a run stopped after N steps resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import edgesmith as es
from edgesmith.artifacts import TorchModel
from edgesmith.data import builtin_corpus
from edgesmith.lm_quality import lm_fidelity
from edgesmith.passes import Context

VOCAB = 30522
QUICK = {"steps": 20, "batch_size": 8, "lr": 3e-3, "eval_every": 4, "eval_texts": 20, "max_length": 32,
         "losses": {"kl": 1.0}, "temperature": 2.0}


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return builtin_corpus(limit=200)


@pytest.fixture(scope="module")
def pair(minilm_tokenizer, texts) -> tuple[TorchModel, TorchModel]:
    """A tiny Llama teacher (3 layers, GQA) and its copy with one layer removed by angular distance."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=128, pad_token_id=0)
    module = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    teacher = TorchModel(module=module, tokenizer=minilm_tokenizer, task="text-generation", name="teacher")
    student = es.compress.prune(teacher, Context(texts=texts[:32]), layers=1 / 3, layer_importance="angular",
                                check_latency=False)
    return teacher, student


def context(teacher: TorchModel, texts: list[str], **extras) -> Context:
    return Context(source=teacher, texts=texts, progress=False, extras=extras)


def report_of(model: TorchModel) -> dict:
    return model.lineage[-1]["report"]


def test_logit_distillation_recovers_held_out_fidelity(pair, texts):
    teacher, student = pair
    before = lm_fidelity(student, teacher, passage_tokens=32)
    out = es.compress.distill(student, context(teacher, texts), **{**QUICK, "steps": 40, "eval_every": 10,
                                                                   "checkpoint_every": None})
    after = lm_fidelity(out, teacher, passage_tokens=32)
    assert report_of(out)["student_layers"] == 2 and report_of(out)["losses"] == {"kl": 1.0}
    assert after["kld"] < 0.8 * before["kld"]
    assert after["top1"] >= before["top1"]


def test_resume_after_a_stop_matches_the_uninterrupted_run(pair, texts, tmp_path):
    teacher, student = pair
    options = {**QUICK, "checkpoint_every": 5}
    full = es.compress.distill(student, context(teacher, texts, checkpoint_dir=str(tmp_path / "a")), **options)

    def stop_at_12(step: int) -> None:
        if step == 12:
            raise Killed

    with pytest.raises(Killed):
        es.compress.distill(student, context(teacher, texts, checkpoint_dir=str(tmp_path / "b"), on_step=stop_at_12),
                            **options)
    folders = list((tmp_path / "b").iterdir())
    assert len(folders) == 1 and json.loads((folders[0] / "last" / "state.json").read_text())["step"] == 10
    resumed = es.compress.distill(student, context(teacher, texts, checkpoint_dir=str(tmp_path / "b")), **options)
    assert report_of(resumed)["resumed_from_step"] == 10
    assert report_of(resumed)["history"] == report_of(full)["history"]
    a, b = full.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.module.config.num_hidden_layers == 2


def test_distilled_student_reloads_with_stock_transformers(pair, texts, tmp_path):
    teacher, student = pair
    out = es.compress.distill(student, context(teacher, texts), **{**QUICK, "steps": 4, "checkpoint_every": None})
    folder = out.save(tmp_path / "student")
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = teacher.tokenizer(["the river ran by the hill"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(stock(**ids).logits, out.module(**ids).logits, atol=1e-5)
