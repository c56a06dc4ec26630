"""The distill pass and the training loop: losses, determinism, resume after a kill, DDP, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

import edgesmith as es
from edgesmith.artifacts import TorchModel
from edgesmith.cli.app import main
from edgesmith.compress.distillation import DistillPass, find_layers
from edgesmith.data import builtin_corpus
from edgesmith.errors import BadInput
from edgesmith.passes import Context
from edgesmith.training import TextBatches, TrainSettings, lr_factor

VOCAB = 30522


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return builtin_corpus(limit=300)


def bert(tokenizer, *, seed: int, hidden: int = 32, layers: int = 2, heads: int = 4, cls=BertModel,
         **extra) -> TorchModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=128, **extra)
    task = "sequence-classification" if cls is BertForSequenceClassification else "feature-extraction"
    return TorchModel(module=cls(config).eval(), tokenizer=tokenizer, task=task, name=f"bert-{seed}")


def ctx_with(teacher: TorchModel, texts: list[str], labels=None, **extras) -> Context:
    return Context(source=teacher, texts=texts, labels=labels, progress=False, extras=extras)


QUICK = {"steps": 24, "batch_size": 16, "lr": 3e-3, "eval_every": 8, "eval_texts": 40, "checkpoint_every": None,
         "max_length": 32}


def weights(model: TorchModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def distance(a: TorchModel, b: TorchModel) -> float:
    """Mean absolute difference of the shared, same-shaped weights."""
    wa, wb = weights(a), weights(b)
    diffs = [(wa[k] - wb[k]).abs().mean() for k in wa if k in wb and wa[k].shape == wb[k].shape
             and wa[k].is_floating_point()]
    return float(torch.stack(diffs).mean())


def report_of(model: TorchModel) -> dict:
    return model.lineage[-1]["report"]


def assert_learned(model: TorchModel) -> None:
    report = report_of(model)
    history = report["history"]
    assert history[0]["step"] == 0 and "loss" not in history[0]
    assert history[-1]["loss"] < history[1]["loss"], history
    assert report["cosine_after"] > report["cosine_before"] + 0.05, report


# ---------------------------------------------------------------------------------------------
# Each loss makes the loss fall and the student move toward the teacher
# ---------------------------------------------------------------------------------------------


def test_cosine_loss_recovers_an_encoder(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    before = weights(student)
    out = es.compress.distill(student, ctx_with(teacher, texts), **QUICK)
    assert_learned(out)
    report = report_of(out)
    assert report["losses"] == {"cosine": 1.0}
    assert report["recall@10_after"] >= 0.0 and report["eval_texts"] == 40
    assert report["train_texts"] == 260 and report["steps_run"] == 24
    assert out.lineage[-1]["pass"] == "distill"
    # the input is untouched and the output is a new module
    assert all(torch.equal(before[k], v) for k, v in weights(student).items())
    assert out.module is not student.module


def test_kl_loss_on_a_classifier_with_a_narrower_student(minilm_tokenizer, texts):
    teacher = bert(minilm_tokenizer, seed=0, cls=BertForSequenceClassification, num_labels=3)
    student = bert(minilm_tokenizer, seed=1, hidden=16, cls=BertForSequenceClassification, num_labels=3)
    out = es.compress.distill(student, ctx_with(teacher, texts), **{**QUICK, "lr": 5e-3})
    assert_learned(out)
    assert report_of(out)["losses"] == {"kl": 1.0} and report_of(out)["projections"] == []


def test_hidden_mse_with_projection_and_layer_map(minilm_tokenizer, texts):
    teacher = bert(minilm_tokenizer, seed=0, layers=4)
    student = bert(minilm_tokenizer, seed=1, hidden=16, layers=2)
    out = es.compress.distill(student, ctx_with(teacher, texts), losses={"hidden_mse": 1.0},
                              layer_map={0: 1, 1: 3}, **QUICK)
    assert_learned(out)
    assert report_of(out)["projections"] == ["hidden0", "hidden1"]
    assert out.module.config.hidden_size == 16  # the projections are not part of the output


def test_task_loss_uses_labels(minilm_tokenizer, texts):
    teacher = bert(minilm_tokenizer, seed=0, cls=BertForSequenceClassification, num_labels=2)
    student = bert(minilm_tokenizer, seed=1, cls=BertForSequenceClassification, num_labels=2)
    labels = [int(" the " in f" {t.lower()} ") for t in texts]  # a label a bag of tokens can tell
    ctx = ctx_with(teacher, texts, labels=labels)
    out = es.compress.distill(student, ctx, losses={"task": 1.0, "kl": 0.5}, **{**QUICK, "steps": 40})
    assert report_of(out)["losses"] == {"task": 1.0, "kl": 0.5}
    history = report_of(out)["history"]
    assert history[-1]["loss"] < history[1]["loss"]
    assert distance(out, student) > 0


def test_kl_on_a_causal_lm(minilm_tokenizer, texts):
    def gpt2(seed: int) -> TorchModel:
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return TorchModel(module=GPT2LMHeadModel(config).eval(), tokenizer=minilm_tokenizer, task="text-generation")

    teacher, student = gpt2(0), gpt2(1)
    out = es.compress.distill(student, ctx_with(teacher, texts), **{**QUICK, "lr": 5e-3})
    assert_learned(out)


def test_depth_reduced_copy_of_the_teacher(minilm_tokenizer, texts, tmp_path):
    teacher = bert(minilm_tokenizer, seed=0, layers=4)
    out = es.compress.distill(teacher, ctx_with(teacher, texts), every_k=2, **QUICK)
    report = report_of(out)
    assert report["kept_layers"] == [1, 3] and report["student_layers"] == 2
    assert out.module.config.num_hidden_layers == 2 and len(find_layers(out.module)[1]) == 2
    assert report["cosine_after"] >= report["cosine_before"]
    reloaded = es.load(out.save(tmp_path / "student"))
    ids = minilm_tokenizer(["a small test"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded.module(**ids).last_hidden_state, out.module(**ids).last_hidden_state, atol=1e-5)
    kept = es.compress.distill(teacher, ctx_with(teacher, texts), keep_layers=[3, 0], **{**QUICK, "steps": 2})
    assert report_of(kept)["kept_layers"] == [0, 3]


def test_grad_accumulation_cosine_schedule_and_bf16_run(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    out = es.compress.distill(student, ctx_with(teacher, texts), grad_accum=2, schedule="cosine",
                              precision="bf16", **{**QUICK, "batch_size": 8, "steps": 8})
    report = report_of(out)
    assert report["precision"] == "bf16" and report["steps_run"] == 8
    assert next(out.module.parameters()).dtype == torch.float32


def test_early_stop_keeps_the_best_step(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    # validation soon improves by less than min_delta per evaluation: the loop stops
    out = es.compress.distill(student, ctx_with(teacher, texts), patience=2, min_delta=0.01,
                              **{**QUICK, "eval_every": 2, "steps": 40})
    report = report_of(out)
    assert report["stopped_early"] and report["steps_run"] < 40
    best = max(report["history"], key=lambda h: h["metric"])
    assert report["best_step"] == best["step"]
    assert report["cosine_after"] == pytest.approx(best["metric"], abs=1e-4)


def test_data_option_reads_a_file(minilm_tokenizer, texts, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:100]))
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    out = es.compress.distill(student, Context(source=teacher, progress=False), data=str(data),
                              **{**QUICK, "steps": 4})
    assert report_of(out)["train_texts"] + report_of(out)["eval_texts"] <= 100


# ---------------------------------------------------------------------------------------------
# Determinism and resume
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    runs = [es.compress.distill(student, ctx_with(teacher, texts), **{**QUICK, "steps": 10}) for _ in range(2)]
    a, b = weights(runs[0]), weights(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = es.compress.distill(student, ctx_with(teacher, texts), **{**QUICK, "steps": 10, "seed": 1})
    assert distance(other, runs[0]) > 0


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(minilm_tokenizer, texts, tmp_path):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    options = {**QUICK, "steps": 20, "eval_every": 4, "checkpoint_every": 5, "lr": 2e-3}
    full = es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "a")), **options)
    assert not any((tmp_path / "a").iterdir())  # checkpoints are removed after success

    def kill_at_12(step: int) -> None:
        if step == 12:
            raise Killed

    with pytest.raises(Killed):
        es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "b"), on_step=kill_at_12),
                            **options)
    folders = list((tmp_path / "b").iterdir())
    assert len(folders) == 1 and json.loads((folders[0] / "last" / "state.json").read_text())["step"] == 10
    resumed = es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "b")), **options)
    assert report_of(resumed)["resumed_from_step"] == 10
    assert report_of(resumed)["history"] == report_of(full)["history"]
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_inputs_is_not_reused(minilm_tokenizer, texts, tmp_path):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise Killed

    options = {**QUICK, "steps": 10, "checkpoint_every": 5, "checkpoint_dir": str(tmp_path)}
    with pytest.raises(Killed):
        es.compress.distill(student, ctx_with(teacher, texts, on_step=kill_at_5), **options)
    out = es.compress.distill(student, ctx_with(teacher, texts), **{**options, "lr": 1e-3})
    assert report_of(out)["resumed_from_step"] is None


def test_batches_are_bucketed_and_a_function_of_the_step(minilm_tokenizer, texts):
    data = TextBatches(minilm_tokenizer, texts, batch_size=8, max_length=32, seed=3,
                       input_names=["input_ids", "attention_mask", "token_type_ids"], bucket_batches=10)
    again = TextBatches(minilm_tokenizer, texts, batch_size=8, max_length=32, seed=3,
                        input_names=["input_ids", "attention_mask"], bucket_batches=10)
    assert [data.indices(s) for s in (0, 5, 40, 41)] == [again.indices(s) for s in (0, 5, 40, 41)]
    batch = data.batch(0)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())  # dynamic padding
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    # bucketing: the spread of lengths inside a batch is smaller than across the data
    lengths = [len(ids) for ids in data.ids]
    spread = [max(lengths[i] for i in data.indices(s)) - min(lengths[i] for i in data.indices(s)) for s in range(30)]
    assert sum(spread) / len(spread) < (max(lengths) - min(lengths)) / 2
    # rank shares partition the global batch
    rows = data.indices(7)
    assert sorted(rows[0::2] + rows[1::2]) == sorted(rows)


def test_learning_rate_schedule():
    settings = TrainSettings(steps=100, warmup_ratio=0.1)
    assert lr_factor(0, settings) == pytest.approx(0.1) and lr_factor(9, settings) == pytest.approx(1.0)
    assert lr_factor(99, settings) < 0.02
    cosine = TrainSettings(steps=100, warmup_ratio=0.0, schedule="cosine")
    assert lr_factor(50, cosine) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes under torchrun
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_finish_with_identical_weights(minilm_tokenizer, texts, tmp_path):
    from safetensors.torch import load_file

    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    teacher.save(tmp_path / "teacher")
    student.save(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]))
    options = {"teacher": str(tmp_path / "teacher"), "data": str(data), "steps": 6, "batch_size": 8,
               "eval_every": 3, "eval_texts": 20, "checkpoint_every": None, "max_length": 32}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "edgesmith.training", "distill",
           str(tmp_path / "student"), "--options", json.dumps(options), "--output", str(tmp_path / "out"),
           "--rank-weights", str(tmp_path / "ranks")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "ranks" / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    out = es.load(tmp_path / "out")
    report = out.lineage[-1]["report"]
    assert report["world_size"] == 2 and report["steps_run"] == 6
    assert distance(out, student) > 0


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_bad_input(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    with pytest.raises(BadInput, match="distill needs texts"):
        es.compress.distill(student, Context(source=teacher, progress=False), **QUICK)
    wide = bert(minilm_tokenizer, seed=2, hidden=64)
    with pytest.raises(BadInput, match="wider than the teacher"):
        es.compress.distill(wide, ctx_with(teacher, texts), **QUICK)
    with pytest.raises(BadInput, match="keep_layers names layer 5"):
        es.compress.distill(teacher, ctx_with(teacher, texts), keep_layers=[0, 5], **QUICK)
    with pytest.raises(BadInput, match="layer_map names teacher layer 9"):
        es.compress.distill(student, ctx_with(teacher, texts), losses={"hidden_mse": 1}, layer_map={0: 9}, **QUICK)
    with pytest.raises(BadInput, match="the teacher is the student itself"):
        es.compress.distill(student, Context(texts=texts, progress=False), **QUICK)
    with pytest.raises(BadInput, match="kl loss needs logits"):
        es.compress.distill(student, ctx_with(teacher, texts), losses={"kl": 1}, **QUICK)
    with pytest.raises(BadInput, match="at least 10 texts"):
        es.compress.distill(student, ctx_with(teacher, texts[:6]), **QUICK)
    with pytest.raises(BadInput, match="keep_layers or every_k"):
        DistillPass(keep_layers=[0], every_k=2)
    with pytest.raises(BadInput, match="unknown key"):
        es.compress.distill(student, ctx_with(teacher, texts), temprature=2)


def test_wider_student_with_projection_is_allowed(minilm_tokenizer, texts):
    teacher, wide = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=2, hidden=64)
    out = es.compress.distill(wide, ctx_with(teacher, texts), project=True, **{**QUICK, "steps": 4})
    assert report_of(out)["projections"] == ["pooled"]


def _cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_cli_bad_inputs_exit_2(capsys, minilm_tokenizer, tmp_path, cache_dir):
    bert(minilm_tokenizer, seed=0).save(tmp_path / "teacher")
    bert(minilm_tokenizer, seed=2, hidden=64).save(tmp_path / "wide")
    runs = str(tmp_path / "runs")
    cases = [
        (["distill", str(tmp_path / "wide"), "--teacher", str(tmp_path / "teacher"), "--steps", "2"], "wider"),
        (["distill", str(tmp_path / "teacher"), "--keep-layers", "0,7"], "keep_layers names layer 7"),
        (["distill", str(tmp_path / "teacher"), "--every-k", "2", "--data", str(tmp_path / "none.jsonl")],
         "not found"),
        (["distill", str(tmp_path / "teacher")], "give --teacher"),
        (["distill", str(tmp_path / "teacher"), "--every-k", "2", "--loss", "mse"], "unknown loss"),
    ]
    for args, message in cases:
        code, err = _cli(capsys, *args, "--runs-dir", runs)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, err


def test_cli_distill_runs_and_writes_output(capsys, minilm_tokenizer, tmp_path, cache_dir):
    bert(minilm_tokenizer, seed=0).save(tmp_path / "teacher")
    bert(minilm_tokenizer, seed=1).save(tmp_path / "student")
    code, err = _cli(capsys, "distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                     "--steps", "4", "--batch-size", "8", "--eval-texts", "20", "--max-length", "32",
                     "--limit", "200", "--runs-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "out"),
                     "--json")
    assert code == 0, err
    out = es.load(tmp_path / "out")
    assert out.lineage[-1]["pass"] == "distill" and out.lineage[-1]["report"]["steps_run"] == 4


def test_recipe_prune_then_distill(minilm_tokenizer, texts, tmp_path, cache_dir):
    from edgesmith.pipeline import run

    bert(minilm_tokenizer, seed=0, layers=2, hidden=32, heads=4).save(tmp_path / "model")
    recipe = {
        "name": "prune-distill",
        "model": str(tmp_path / "model"),
        "data": {"limit": 120},
        "steps": [{"prune": {"heads": 0.5, "ffn": 0.5}},
                  {"distill": {**QUICK, "steps": 6, "eval_every": 3, "eval_texts": 24, "data": "builtin:wordnet",
                               "limit": 200}}],
        "profile": None,
    }
    result = run(recipe, runs_dir=tmp_path / "runs", progress=False)
    distilled = result.manifest["steps"][-1]
    assert distilled["pass"] == "distill"
    assert distilled["report"]["cosine_after"] >= distilled["report"]["cosine_before"]
    reloaded = es.load(distilled["folder"])
    assert reloaded.structure  # the pruned heads survive the distillation and the reload
    again = run(recipe, runs_dir=tmp_path / "runs", progress=False)
    assert again.manifest["steps"][-1]["cached"]


def test_checkpoint_caught_between_renames_is_recovered(tmp_path):
    from edgesmith.training import Checkpoints

    old = tmp_path / ".old-999999-last"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"key": "k", "step": 5}))
    (tmp_path / ".tmp-999999-last-abc").mkdir()  # a half-written checkpoint of a killed process
    checkpoints = Checkpoints(tmp_path, "k")
    checkpoints.recover()
    assert checkpoints.last_state()["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert Checkpoints(tmp_path, "other").last_state() is None


# ---------------------------------------------------------------------------------------------
# Issue 19: the attention-map loss, and the recovery timeline
# ---------------------------------------------------------------------------------------------


def test_attention_loss_on_a_student_with_fewer_heads(minilm_tokenizer, texts):
    """Different head counts: the maps are compared as their means over heads; the student's own
    attention implementation and dropout come back after training."""
    teacher = bert(minilm_tokenizer, seed=0, attn_implementation="sdpa")
    student = bert(minilm_tokenizer, seed=1, heads=2, attn_implementation="sdpa")
    out = es.compress.distill(student, ctx_with(teacher, texts), losses={"cosine": 1.0, "attention": 1.0},
                              **{**QUICK, "steps": 32})
    assert_learned(out)
    report = report_of(out)
    assert report["losses"] == {"cosine": 1.0, "attention": 1.0}
    assert out.module.config._attn_implementation == "sdpa"
    assert teacher.module.config._attn_implementation == "sdpa"  # the source model is left as it was
    assert all(m.p == 0.1 for n, m in out.module.named_modules() if n.endswith("attention.self.dropout"))
    timeline = report["timeline"]
    assert [e["step"] for e in timeline] == [e["step"] for e in report["history"]]
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(timeline, timeline[1:]))


def test_attention_loss_alone_moves_the_maps(minilm_tokenizer, texts):
    """The attention term alone falls and changes the student (same head count: head to head)."""
    from edgesmith.compress.distillation import DistillObjective

    teacher = bert(minilm_tokenizer, seed=0, attn_implementation="eager")
    student = bert(minilm_tokenizer, seed=1, attn_implementation="eager")
    objective = DistillObjective(student.module, teacher.module, task="feature-extraction",
                                 losses={"attention": 1.0}, temperature=1.0, layer_pairs=[(0, 0), (1, 1)],
                                 project=None, input_names=["input_ids", "attention_mask", "token_type_ids"])
    batch = TextBatches(minilm_tokenizer, texts[:32], batch_size=16, max_length=32, seed=0,
                        input_names=objective.input_names).batch(0)
    first = float(objective(batch)["attention"])
    assert first > 0
    same = DistillObjective(teacher.module, teacher.module, task="feature-extraction", losses={"attention": 1.0},
                            temperature=1.0, layer_pairs=[(0, 0), (1, 1)], project=None,
                            input_names=objective.input_names)
    assert float(same(batch)["attention"]) < 1e-6  # KL of a map with itself
    out = es.compress.distill(student, ctx_with(teacher, texts), losses={"attention": 1.0}, **QUICK)
    history = report_of(out)["history"]
    assert history[-1]["loss"] < history[1]["loss"]


def test_attention_loss_resumes_exactly(minilm_tokenizer, texts, tmp_path):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1, heads=2)
    options = {**QUICK, "steps": 12, "eval_every": 4, "checkpoint_every": 5, "lr": 2e-3,
               "losses": {"cosine": 1.0, "attention": 0.5}}
    full = es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "a")), **options)

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "b"), on_step=kill_at_7),
                            **options)
    resumed = es.compress.distill(student, ctx_with(teacher, texts, checkpoint_dir=str(tmp_path / "b")), **options)
    assert report_of(resumed)["resumed_from_step"] == 5
    assert report_of(resumed)["history"] == report_of(full)["history"]
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_loss_config_errors(minilm_tokenizer, texts):
    teacher, student = bert(minilm_tokenizer, seed=0), bert(minilm_tokenizer, seed=1)
    with pytest.raises(BadInput, match="needs a weight above 0"):
        es.compress.distill(student, ctx_with(teacher, texts), losses={"attention": 0}, **QUICK)
    with pytest.raises(BadInput, match="layer_map names student layer 4"):
        es.compress.distill(student, ctx_with(teacher, texts), losses={"attention": 1}, layer_map={4: 1}, **QUICK)
    with pytest.raises(BadInput, match="attention_map"):
        es.compress.distill(student, ctx_with(teacher, texts), losses={"attention_map": 1}, **QUICK)
    from edgesmith.cli.distill import parse_losses

    assert parse_losses(["cosine", "attention=0.5"]) == {"cosine": 1.0, "attention": 0.5}
    with pytest.raises(BadInput, match="unknown loss 'attn'"):
        parse_losses(["attn=1"])
