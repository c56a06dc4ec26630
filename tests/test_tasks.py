"""Task accuracy for decoders (edgesmith.tasks): the session scorer, the lm-eval adapter against
lm-eval's own Hugging Face backend, the paired statistics, the shipped task set, the CLI, the gates
and the bad inputs. Tiny models from tests/tiny_lm.py (seconds); one SmolLM2 run is marked slow.
No timing asserts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lm import tiny_llama, train_tokenizer

import edgesmith as es
from edgesmith.cli.app import main
from edgesmith.errors import BadInput

#: tests that run lm-eval itself; the rest (paired statistics, the missing-extra error) run without it
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="edgesmith[tasks] (lm-eval) is not installed")

DATA = Path(__file__).resolve().parents[1] / "edgesmith" / "tasks" / "data"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with its tokenizer (what lm-eval's HF backend loads)."""
    folder = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = train_tokenizer(folder)
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_folder(llm_folder, tmp_path_factory):
    """The same architecture with other weights: a 'compressed' model that answers differently."""
    folder = tmp_path_factory.mktemp("tiny-llm-other")
    tokenizer = es.load(str(llm_folder)).tokenizer
    model = tiny_llama(seed=1, vocab=len(tokenizer))
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The scorer on a session
# ---------------------------------------------------------------------------------------------


def _reference_logprob(module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = module(ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)[len(context) - 1:-1]
    cont = torch.tensor(continuation)
    return float(lp[torch.arange(len(cont)), cont].sum()), bool((lp.argmax(-1) == cont).all())


def test_scorer_groups_contexts_and_reuses_the_cache(llm_folder):
    from edgesmith.runtimes.generation import open_decoder
    from edgesmith.tasks.scoring import SessionScorer

    artifact, session = open_decoder(str(llm_folder))
    rng = np.random.default_rng(0)
    ctx_a, ctx_b = rng.integers(3, 300, 17).tolist(), rng.integers(3, 300, 9).tolist()
    requests = [(ctx_a, [5]), (ctx_a, [7]), (ctx_b, [11]),            # single-token choices: batched last logits
                (ctx_b, [12, 13, 14]), (ctx_b, [15]), (ctx_a, [20, 21])]  # multi-token: prefill + extend/rollback
    scorer = SessionScorer(session, batch_size=4)
    scores = scorer.loglikelihoods(requests)
    for (context, continuation), score in zip(requests, scores):
        logprob, greedy = _reference_logprob(artifact.module, context, continuation)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy
    # both contexts have a multi-token choice: each is prefilled once, then one extend per multi-token choice
    assert scorer.forward_calls == 2 + 2
    # a context whose choices are all single tokens runs in one batched prefill with other such contexts
    scorer = SessionScorer(session, batch_size=4)
    scorer.loglikelihoods([(ctx_a, [5]), (ctx_a, [6]), (ctx_b, [5]), (ctx_b, [9])])
    assert scorer.forward_calls == 1
    # one sequence at a time (llama.cpp's case): contexts sharing a prefix keep its cache, same scores
    shared = ctx_a[:10] + [7, 8, 9]
    requests += [(shared, [5]), (shared, [30, 31]), (ctx_a[:5], [6])]  # ctx_a[:5] is a prefix of both
    scorer = SessionScorer(session, batch_size=1)
    for (context, continuation), score in zip(requests, scorer.loglikelihoods(requests)):
        logprob, greedy = _reference_logprob(artifact.module, context, continuation)
        assert score.logprob == pytest.approx(logprob, abs=1e-4) and score.greedy == greedy
    # a context longer than the model's window keeps its last tokens (as lm-eval's HF backend)
    scorer = SessionScorer(session, max_length=8)
    long = scorer.loglikelihoods([(ctx_a, [5, 6])])[0]
    assert long.logprob == pytest.approx(_reference_logprob(artifact.module, ctx_a[-7:], [5, 6])[0], abs=1e-4)
    session.close()


# ---------------------------------------------------------------------------------------------
# lm-eval's Hugging Face backend and edgesmith's adapter agree
# ---------------------------------------------------------------------------------------------


def _per_item(output: dict, task: str) -> list[list[float]]:
    rows = sorted(output["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]] for s in rows]


@needs_lm_eval
def test_hf_backend_and_adapter_agree_on_per_item_loglikelihoods(llm_folder):
    """lm-eval's own HFLM on the FP32 model and edgesmith's adapter over the torch decoder session:
    the same documents, per-item log-likelihoods within 1e-4 (multiple choice with single- and
    multi-token choices, and rolling perplexity)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from edgesmith.tasks.adapter import EdgesmithLM
    from edgesmith.tasks.harness import select_tasks

    tasks = ["smoke-mc", "smoke-abcd", "smoke-ppl"]
    selection = select_tasks(tasks)
    hf = HFLM(pretrained=str(llm_folder), tokenizer=str(llm_folder), device="cpu", batch_size=4, dtype="float32")
    ours = EdgesmithLM(artifact=str(llm_folder), runtime="torch", batch_size=4)
    outputs = [simple_evaluate(model=m, tasks=tasks, task_manager=selection.manager, bootstrap_iters=0,
                               log_samples=True, verbosity="ERROR") for m in (hf, ours)]
    for task in tasks:
        theirs, mine = _per_item(outputs[0], task), _per_item(outputs[1], task)
        assert len(theirs) == len(mine) == 6
        np.testing.assert_allclose(np.array(mine), np.array(theirs), atol=1e-4, rtol=0)
    assert outputs[0]["results"]["smoke-mc"]["acc,none"] == outputs[1]["results"]["smoke-mc"]["acc,none"]


@needs_lm_eval
def test_onnx_decoder_in_onnxruntime_scores_as_torch(llm_folder, tmp_path):
    """The same adapter over an edgesmith decoder ONNX (ONNX Runtime session: batched prefill,
    extend + rollback on the KV cache) gives torch's per-item log-likelihoods."""
    from lm_eval import simple_evaluate

    from edgesmith.tasks.adapter import EdgesmithLM
    from edgesmith.tasks.harness import select_tasks

    onnx_model = es.export.to_onnx(es.load(str(llm_folder)), decode_steps=4)
    onnx_model.save(tmp_path / "onnx")
    tasks = ["smoke-mc", "smoke-abcd"]
    manager = select_tasks(tasks).manager
    outputs = [simple_evaluate(model=EdgesmithLM(artifact=str(path), runtime=runtime, batch_size=3), tasks=tasks,
                               task_manager=manager, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
               for path, runtime in ((llm_folder, "torch"), (tmp_path / "onnx", "onnxruntime"))]
    for task in tasks:
        np.testing.assert_allclose(np.array(_per_item(outputs[1], task)), np.array(_per_item(outputs[0], task)),
                                   atol=1e-3, rtol=0)


@needs_lm_eval
def test_generate_until_is_greedy_decoding_on_the_session(llm_folder):
    from lm_eval.api.instance import Instance

    from edgesmith.runtimes.generation import GenerationConfig, generate
    from edgesmith.tasks.adapter import EdgesmithLM

    lm = EdgesmithLM(artifact=str(llm_folder))
    prompt = "Question: Which animal barks?\nAnswer:"
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), 0)
    text = lm.generate_until([request])[0]
    expected = generate(lm.session, lm.tokenizer, prompt, GenerationConfig(max_new_tokens=6, chat=False,
                                                                           stop_strings=["\n"]))
    assert text == expected.text and "\n" not in text


@needs_lm_eval
def test_registered_with_lm_eval_by_name(llm_folder):
    from lm_eval import simple_evaluate

    from edgesmith.tasks import register
    from edgesmith.tasks.harness import select_tasks

    register()
    register()  # idempotent
    output = simple_evaluate(model="edgesmith", model_args=f"artifact={llm_folder},runtime=torch,batch_size=2",
                             tasks=["smoke-abcd"], task_manager=select_tasks(["smoke-abcd"]).manager,
                             bootstrap_iters=0, verbosity="ERROR")
    assert output["results"]["smoke-abcd"]["alias"] == "smoke-abcd"
    assert output["config"]["model"] == "edgesmith"
    assert 0.0 <= output["results"]["smoke-abcd"]["acc,none"] <= 1.0


@needs_lm_eval
def test_edgesmith_lm_eval_is_lm_evals_command_line_with_the_model(capsys, llm_folder, monkeypatch):
    from edgesmith.tasks.harness import main as lm_eval_main

    monkeypatch.setattr(sys, "argv", ["edgesmith-lm-eval"])  # main() hands lm-eval its own argv
    lm_eval_main(["--model", "edgesmith", "--model_args", f"artifact={llm_folder},runtime=torch",
                  "--tasks", "smoke-abcd", "--limit", "2", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert "smoke-abcd" in out and "acc" in out
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main(["--model", "edgesmith", "--model_args", "artifact=/no/such/model", "--tasks", "smoke-abcd"])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------


def test_paired_delta_counts_flips_and_mcnemar():
    from edgesmith.tasks.paired import accuracy, mcnemar_exact, paired_delta

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)       # all 6 flips one way: 2 * 0.5^6
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # (C(10,0) + C(10,1)) / 2^10, two-sided
    reference = {str(i): float(i % 2 == 0) for i in range(100)}
    candidate = dict(reference)
    for i in ("0", "2", "4", "6", "8", "10"):  # six items the source got right, lost
        candidate[i] = 0.0
    candidate["1"] = 1.0  # one gained
    d = paired_delta(reference, candidate)
    assert (d.lost, d.gained, d.n) == (6, 1, 100)
    assert d.lost_items == ["0", "10", "2", "4", "6", "8"] and d.gained_items == ["1"]
    assert d.delta == pytest.approx(-0.05) and d.low < d.delta < d.high
    assert d.p_value == pytest.approx(mcnemar_exact(6, 1)) and d.verdict == "within noise"
    acc = accuracy([1.0] * 30 + [0.0] * 70)
    assert acc.value == 0.3 and acc.low < 0.3 < acc.high and acc.stderr == pytest.approx((0.21 / 99) ** 0.5)
    with pytest.raises(BadInput, match="same documents"):
        paired_delta({"0": 1.0}, {"1": 1.0})


# ---------------------------------------------------------------------------------------------
# The shipped task set
# ---------------------------------------------------------------------------------------------


@needs_lm_eval
def test_shipped_tasks_load_offline_with_their_documents(monkeypatch):
    from edgesmith.tasks.harness import build_tasks, select_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    built = build_tasks(select_tasks("mmlu-mini,wordnet-mc"))
    mmlu, wordnet = built["mmlu-mini"], built["wordnet-mc"]
    docs = list(mmlu.test_docs())
    assert len(docs) == 570 and len({d["subject"] for d in docs}) == 57
    first = docs[0]
    assert mmlu.doc_to_text(first).endswith("\nD. " + first["choices"][3] + "\nAnswer:")
    assert "about abstract algebra" in mmlu.fewshot_context(first, 0)
    words = list(wordnet.test_docs())
    assert len(words) == 500
    for doc in words:
        answer = doc["choices"][doc["answer"]]
        assert len(set(doc["choices"])) == 4 and answer not in doc["gloss"].lower()
    assert (DATA / "MMLU-LICENSE.txt").read_text().startswith("MIT License")
    assert "Princeton" in (DATA / "WORDNET-LICENSE.txt").read_text()


# ---------------------------------------------------------------------------------------------
# The CLI, the Python API and the gates
# ---------------------------------------------------------------------------------------------


@needs_lm_eval
def test_cli_tasks_with_paired_delta_and_gate(capsys, llm_folder, other_folder, cache_dir):
    code, out, err = _cli(capsys, "evaluate", str(other_folder), "--reference", str(llm_folder),
                          "--tasks", "smoke-mc,smoke-abcd", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["fidelity"]["kld"] > 0 and set(report["tasks"]) == {"smoke-mc", "smoke-abcd"}
    for name, task in report["tasks"].items():
        cand, ref, paired = task["candidate"], task["reference"], task["paired"]
        assert cand["n"] == ref["n"] == paired["n"] == 6
        assert paired["delta"] == pytest.approx(cand["value"] - ref["value"])
        assert paired["lost"] - paired["gained"] == round((ref["value"] - cand["value"]) * 6)
        assert report["metrics"][f"task.{name}"] == cand["value"]
    # the reference's results were cached: a second candidate reuses them
    assert len(list((cache_dir / "tasks").glob("*.json"))) == 4
    # --limit, and a gate on the paired drop (the source against itself: no drop, passes)
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--reference", str(llm_folder),
                          "--tasks", "smoke-mc", "--limit", "3", "--gate", "task.smoke-mc=0", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tasks"]["smoke-mc"]["candidate"]["n"] == 3
    assert report["tasks"]["smoke-mc"]["paired"]["lost"] == 0 and report["gate_failures"] == []
    # a gate that fails: exit 3 (the other model must lose at least one item the source got right)
    smoke = json.loads(_cli(capsys, "evaluate", str(other_folder), "--reference", str(llm_folder), "--tasks",
                            "smoke-mc,smoke-abcd", "--json")[1])
    worst = max(smoke["tasks"], key=lambda t: -smoke["tasks"][t]["paired"]["delta"])
    if smoke["tasks"][worst]["paired"]["delta"] < 0:
        code, out, err = _cli(capsys, "evaluate", str(other_folder), "--reference", str(llm_folder),
                              "--gate", f"task.{worst}=0")
        assert code == 3 and f"task.{worst}" in err
    # the human-readable table
    code, out, err = _cli(capsys, "evaluate", str(other_folder), "--reference", str(llm_folder), "--tasks", "smoke-mc")
    assert code == 0 and "paired delta" in out and "McNemar" in out


@needs_lm_eval
def test_python_api_evaluate_with_tasks(llm_folder, other_folder, cache_dir):
    report = es.evaluate(es.load(str(other_folder)), es.load(str(llm_folder)), tasks=["smoke-abcd"], fidelity=False)
    comp = report.tasks["smoke-abcd"]
    assert comp.paired is not None and comp.paired.n == 6 and report.fidelity == {}
    assert report.metrics() == {"task.smoke-abcd": comp.candidate.value}
    # without tasks, es.evaluate is the fidelity evaluation it always was
    metrics = es.evaluate(es.load(str(other_folder)), es.load(str(llm_folder)), [])
    assert metrics["kld"] > 0


@needs_lm_eval
def test_recipe_gate_on_task_accuracy(llm_folder, other_folder, tmp_path, cache_dir):
    from edgesmith.quality import check_gates

    failures = check_gates({"task.mmlu-mini": 0.25}, {"task.mmlu-mini": 0.30}, {"task.mmlu-mini": 0.02})
    assert failures and failures[0]["drop"] == pytest.approx(0.05)
    assert not check_gates({"task.mmlu-mini": 0.29}, {"task.mmlu-mini": 0.30}, {"task.mmlu-mini": 0.02})
    recipe = {"name": "tasks", "model": str(llm_folder), "steps": [], "profile": None,
              "tasks": {"names": ["smoke-abcd"], "limit": 4}, "gates": {"task.smoke-mc": 0.0}}
    result = es.run(recipe, runs_dir=tmp_path / "runs", progress=False)
    assert {"task.smoke-abcd", "task.smoke-mc"} <= set(result.metrics["source"])
    assert 0.0 <= result.metrics["source"]["task.smoke-abcd"] <= 1.0
    assert json.loads((result.run_dir / "manifest.json").read_text())["gates"]["passed"]
    with pytest.raises(BadInput, match="unknown task 'nope'"):
        es.run({**recipe, "gates": {"task.nope": 0.1}}, runs_dir=tmp_path / "runs2", progress=False)
    assert not (tmp_path / "runs2").exists()


def test_sweeps_can_name_task_accuracy_as_objective_and_constraint():
    from edgesmith.sweep.objectives import parse_constraint

    constraint = parse_constraint("task.mmlu-mini >= 0.25")
    assert constraint.metric == "task.mmlu-mini" and constraint.holds(0.3) and not constraint.holds(0.2)
    from edgesmith.sweep.objectives import _parse_objectives

    assert _parse_objectives({"task.wordnet-mc": "max"}, "search.objectives")[0].direction == "maximize"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@needs_lm_eval
def test_bad_inputs_are_one_line_exit_2(capsys, llm_folder, tiny_bert_dir, tmp_path, cache_dir):
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--tasks", "no-such-task")
    assert code == 2 and "unknown task 'no-such-task'" in err and "mmlu-mini" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: broken\noutput_type: multiple_choice\n")
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--tasks", str(bad))
    assert code == 2 and "missing field(s) doc_to_text" in err and len(err.strip().splitlines()) == 1
    bad.write_text(": not yaml : [")
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--tasks", str(bad))
    assert code == 2 and "cannot be read as YAML" in err
    code, out, err = _cli(capsys, "evaluate", str(tiny_bert_dir), "--reference", str(tiny_bert_dir),
                          "--tasks", "smoke-mc")
    assert code == 2 and "not a causal LM" in err and len(err.strip().splitlines()) == 1
    assert not (cache_dir / "tasks").exists()  # nothing half-written


@needs_lm_eval
def test_a_local_task_yaml_runs_and_a_task_without_data_is_one_line(capsys, llm_folder, tmp_path, cache_dir,
                                                                     monkeypatch):
    rows = tmp_path / "mine.jsonl"
    rows.write_text('{"q": "Is ice cold?", "choices": ["yes", "no"], "label": 0}\n'
                    '{"q": "Is fire cold?", "choices": ["yes", "no"], "label": 1}\n')
    task = tmp_path / "mine.yaml"
    task.write_text(f"task: my-yes-no\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {rows}}}}}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}\\nAnswer:'\n"
                    "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list: [{metric: acc}]\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--reference", str(llm_folder),
                          "--tasks", str(task), "--json")
    assert code == 0, err
    assert json.loads(out)["tasks"]["my-yes-no"]["candidate"]["n"] == 2
    # a task whose data is not here (the file is gone): one line naming the task
    rows.unlink()
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--tasks", str(task))
    assert code == 2 and "task my-yes-no: its data cannot be loaded here" in err


def test_without_lm_eval_exit_2_names_the_extra(capsys, llm_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, out, err = _cli(capsys, "evaluate", str(llm_folder), "--tasks", "mmlu-mini")
    assert code == 2 and "edgesmith[tasks]" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# llama.cpp: the GGUF as it is
# ---------------------------------------------------------------------------------------------


@pytest.mark.llamacpp
def test_gguf_in_llamacpp_scores_as_torch(llm_folder, tmp_path):
    """The tiny model written as an F32 GGUF, scored in llama.cpp (one sequence: shared prefixes kept
    in its cache, extend + rollback for longer choices) against the same requests on torch."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from edgesmith.gguf.writer import write_gguf
    from edgesmith.runtimes.generation import open_decoder
    from edgesmith.tasks.scoring import SessionScorer

    source = es.load(str(llm_folder))
    path = tmp_path / "tiny.gguf"
    write_gguf(source.module, source.tokenizer, path, quant="f32", name="tiny-llama")
    _, session = open_decoder(str(path), runtime="llamacpp", threads=1)
    rng = np.random.default_rng(1)
    base = rng.integers(3, 300, 12).tolist()
    requests = [(base, [5]), (base, [6]), (base + [40, 41], [7]), (base + [40, 41], [8, 9, 10]),
                (base[:6] + [50], [11, 12]), (base[:6] + [50], [13])]
    scores = SessionScorer(session).loglikelihoods(requests)
    session.close()
    for (context, continuation), score in zip(requests, scores):
        logprob, _ = _reference_logprob(source.module, context, continuation)
        assert score.logprob == pytest.approx(logprob, abs=0.05 * len(continuation))


# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow): a GGUF in llama.cpp against its FP32 source
# ---------------------------------------------------------------------------------------------


@needs_lm_eval
@pytest.mark.slow
@pytest.mark.llamacpp
def test_smollm2_gguf_in_llamacpp_paired_against_fp32(capsys, cache_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    code, out, err = _cli(capsys, "evaluate", "smollm2", "--runtime", "llamacpp", "--threads", "1", "--tasks",
                          "mmlu-mini,wordnet-mc", "--limit", "6", "--json")
    assert code == 0, err
    report = json.loads(out)
    for name in ("mmlu-mini", "wordnet-mc"):
        task = report["tasks"][name]
        assert task["candidate"]["runtime"] == "llamacpp" and task["reference"]["runtime"] == "torch"
        assert task["paired"]["n"] == 6
    assert report["fidelity"]["kld"] > 0
