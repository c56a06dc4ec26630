"""Speculative decoding (edgesmith.runtimes.speculative, edgesmith.profiling.speculative, the
``speculate`` verb and ``generate --draft/--prompt-lookup``) on the tiny Llama of tests/tiny_lm.py:
the output equals plain greedy decoding token for token (ONNX Runtime and PyTorch sessions, draft
models and prompt lookup, several k), cache rollback, the vocabulary check and the refusal gate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny_lm import tiny_llama, train_tokenizer

import edgesmith as es
from edgesmith.artifacts import TorchModel
from edgesmith.cli.app import main
from edgesmith.errors import BadInput, GateFailed
from edgesmith.export.decoder import export_decoder
from edgesmith.profiling.speculative import SpeculativeReport, check_speedup, grounded_prompts, refusal
from edgesmith.runtimes.generation import GenerationConfig, decode_loop, generate, prompt_ids
from edgesmith.runtimes.onnxruntime import OrtDecoderSession
from edgesmith.runtimes.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    check_vocabulary,
    make_drafter,
    speculative_generate,
    speculative_loop,
)
from edgesmith.runtimes.torch import TorchDecoderSession

PROMPTS = ["The cocks crowed all morning and the cocks crowed", "she looked meek but had the heart of a lion",
           "a signal too loud to be erasable in a single pass"]
NEW = 40


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _pruned(module, keep):
    draft = copy.deepcopy(module)
    draft.model.layers = torch.nn.ModuleList([draft.model.layers[i] for i in keep])
    for j, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = j
    draft.config.num_hidden_layers = len(keep)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [draft.config.layer_types[i] for i in keep]
    return draft.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and OpenMP's spinning threads crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """The target (torch and ONNX), a depth-pruned draft (ONNX), a foreign draft of the same vocabulary
    (another seed: low acceptance, many rollbacks) and a draft with another vocabulary (a folder)."""
    base = tmp_path_factory.mktemp("speculative")
    tokenizer = train_tokenizer(base / "tokenizer")
    module = tiny_llama(seed=0, vocab=len(tokenizer))
    target = TorchModel(task="text-generation", name="tiny-target", module=module, tokenizer=tokenizer)
    target_onnx = export_decoder(target, base / "target")
    pruned = TorchModel(task="text-generation", name="tiny-pruned", module=_pruned(module, [0]), tokenizer=tokenizer)
    pruned_onnx = export_decoder(pruned, base / "pruned")
    foreign = TorchModel(task="text-generation", name="tiny-other", module=tiny_llama(seed=1, vocab=len(tokenizer)),
                         tokenizer=tokenizer)
    alien_folder = base / "alien"
    alien = tiny_llama(seed=2, vocab=300)
    alien.save_pretrained(alien_folder)
    tokenizer.save_pretrained(alien_folder)
    return {"tokenizer": tokenizer, "target": target, "target_onnx": target_onnx, "pruned": pruned,
            "pruned_onnx": pruned_onnx, "foreign": foreign, "alien_folder": alien_folder}


def _session(lm, kind: str):
    return OrtDecoderSession(lm["target_onnx"]) if kind == "ort" else TorchDecoderSession(lm["target"])


def _drafter(lm, kind: str):
    if kind == "prompt-lookup":
        return PromptLookupDrafter(3)
    if kind == "pruned-onnx":
        return ModelDrafter(OrtDecoderSession(lm["pruned_onnx"]))
    return ModelDrafter(TorchDecoderSession(lm["foreign"]))


def _plain(session, ids, cfg, stops=()):
    run = decode_loop(session, np.asarray([ids]), None, cfg, stop_ids=stops)
    session.reset()
    return run.tokens[0, :run.lengths[0]].tolist()


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    drafter = PromptLookupDrafter(3)
    assert drafter.propose([5, 1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]  # the 3-gram 1 2 3 occurred before
    assert drafter.propose([5, 1, 2, 3, 4, 9, 7, 3], 2) == [4, 9]  # falls back to the 1-gram 3
    assert drafter.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert drafter.propose([7, 7, 7, 7, 7], 3) == [7, 7]  # the occurrence with the most tokens after it
    with pytest.raises(BadInput, match="at least 1"):
        PromptLookupDrafter(0)


@pytest.mark.parametrize("session_kind", ["ort", "torch"])
@pytest.mark.parametrize("draft_kind", ["prompt-lookup", "pruned-onnx", "foreign-torch"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_output_equals_plain_greedy(lm, session_kind, draft_kind, k):
    session = _session(lm, session_kind)
    drafter = _drafter(lm, draft_kind)
    cfg = GenerationConfig(max_new_tokens=NEW, ignore_eos=True)
    drafted = accepted = calls = 0
    for text in PROMPTS:
        ids = prompt_ids(lm["tokenizer"], text)
        reference = _plain(session, ids, cfg)
        run = speculative_loop(session, drafter, ids, max_new_tokens=NEW, num_tokens=k, ignore_eos=True)
        assert run.tokens == reference
        assert len(run.tokens) == NEW and run.finish_reason == "length"
        # the target's cache ends exactly after the accepted sequence (prompt + every token but the last)
        assert session.past_length == len(ids) + NEW - 1
        assert run.target_calls == len(run.accepted_per_call) and max(run.accepted_per_call) <= k
        assert len(run.tokens) - 1 == run.accepted + run.target_calls  # each call: accepted + its own token
        drafted, accepted, calls = drafted + run.drafted, accepted + run.accepted, calls + run.target_calls
        session.reset()
    assert calls < NEW * len(PROMPTS) or draft_kind == "foreign-torch"
    if draft_kind == "foreign-torch":  # a draft that disagrees often: the rollbacks are exercised
        assert accepted < drafted
    drafter.close()
    session.close()


@pytest.mark.parametrize("session_kind", ["ort", "torch"])
def test_stop_tokens_end_the_speculative_run_where_plain_greedy_ends(lm, session_kind):
    session = _session(lm, session_kind)
    cfg = GenerationConfig(max_new_tokens=NEW)
    ids = prompt_ids(lm["tokenizer"], PROMPTS[0])
    plain = _plain(session, ids, cfg)
    stop = plain[len(plain) // 2]  # a token of the plain output stops both at its first occurrence
    reference = _plain(session, ids, cfg, stops=[stop])
    run = speculative_loop(session, PromptLookupDrafter(2), ids, max_new_tokens=NEW, num_tokens=4, stop_ids=[stop])
    assert run.tokens == reference and run.finish_reason == "stop_token" and run.tokens[-1] == stop


@pytest.mark.parametrize("session_kind", ["ort", "torch"])
def test_extend_and_rollback_keep_the_cache_exact(lm, session_kind):
    session = _session(lm, session_kind)
    ids = prompt_ids(lm["tokenizer"], PROMPTS[1])
    extra = [11, 42, 7, 99]
    # extend: several tokens in one run give the logits of stepping them one by one
    session.prefill(np.asarray([ids]))
    together = session.extend(np.asarray([extra]), keep=len(extra))[0]
    session.prefill(np.asarray([ids]))
    one_by_one = np.stack([session.step(np.asarray([t]))[0] for t in extra])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)
    # rollback: after dropping three tokens the cache is the prompt + the first one, nothing else
    session.prefill(np.asarray([ids]))
    session.extend(np.asarray([extra]), keep=1)
    session.rollback(len(ids) + 1)
    assert session.past_length == len(ids) + 1
    after = session.step(np.asarray([123]))[0]
    fresh = session.prefill(np.asarray([ids + [extra[0], 123]]))[0]
    np.testing.assert_allclose(after, fresh, atol=1e-4)
    with pytest.raises(BadInput, match="roll back to 1"):
        session.rollback(session.past_length + 1)
    session.reset()
    with pytest.raises(BadInput, match="before prefill"):
        session.rollback(3)


def test_speculative_generate_gives_generates_text(lm):
    session = OrtDecoderSession(lm["target_onnx"])
    cfg = GenerationConfig(max_new_tokens=NEW)
    for text in PROMPTS:
        plain = generate(session, lm["tokenizer"], text, cfg)
        pieces: list[str] = []
        result, run = speculative_generate(session, lm["tokenizer"], text, PromptLookupDrafter(3), cfg,
                                           num_tokens=3, on_token=pieces.append)
        assert result.token_ids == plain.token_ids and result.text == plain.text == "".join(pieces)
        assert result.finish_reason == plain.finish_reason and run.target_calls <= len(result.token_ids)
    with pytest.raises(BadInput, match="greedy only"):
        speculative_generate(session, lm["tokenizer"], PROMPTS[0], PromptLookupDrafter(3),
                             GenerationConfig(temperature=0.7))


def test_a_draft_with_another_vocabulary_is_refused_before_anything_runs(lm):
    target = OrtDecoderSession(lm["target_onnx"])
    alien = es.load(str(lm["alien_folder"]))
    with pytest.raises(BadInput, match="vocabulary of 300 tokens and the target"):
        make_drafter(target, draft=alien, target_tokenizer=lm["tokenizer"])
    other_tokenizer = copy.deepcopy(lm["tokenizer"])
    other_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(BadInput, match="maps 1 token"):
        check_vocabulary(target, TorchDecoderSession(lm["foreign"]), lm["tokenizer"], other_tokenizer)
    with pytest.raises(BadInput, match="exactly one draft"):
        make_drafter(target)


def test_profile_measures_identity_acceptance_and_speedup(lm):
    report = es.speculate(lm["target_onnx"], prompt_lookup=3, num_tokens=3, count=2, sentences=2, new_tokens=24,
                          rounds=2, warmup=0, ignore_eos=True, min_speedup=1000.0)
    assert report.identical and report.mismatches == []
    assert report.mode == "prompt-lookup" and report.runtime == "onnxruntime" and report.prompts == 2
    assert report.generated_tokens == [24, 24] and 0 <= report.acceptance_rate <= 1
    assert report.tokens_per_call >= 1.0 and report.target_calls <= 2 * 23
    assert [len(r) for r in report.pair_speedups] == [2, 2]  # raw samples: one per prompt and round
    point, low, high = report.speedup
    assert low <= point <= high and report.passed is False and "below --min-speedup 1000.00" in report.reason
    with pytest.raises(GateFailed, match="net decode speedup"):
        check_speedup(report, 1000.0)


def test_refusal_when_the_output_differs():
    fields = dict(target="t", draft="d", mode="draft-model", num_tokens=2, runtime="onnxruntime", providers=[],
                  threads=2, task="summarise", prompts=2, prompt_tokens=[5, 5], new_tokens=8, ignore_eos=False,
                  rounds=1, generated_tokens=[8, 8], plain_tokens_per_s=10.0, speculative_tokens_per_s=20.0,
                  speedup=[2.0, 1.8, 2.2], end_to_end_speedup=[1.8, 1.6, 2.0], acceptance_rate=0.9,
                  tokens_per_call=2.5, target_calls=6, draft_share=0.1, draft_ms_per_call=1.0,
                  verify_ms_per_call=9.0, identical=True, load_average=[1.0, 1.0], created="now")
    assert refusal(SpeculativeReport(**fields), 1.3) is None
    assert "differs from plain greedy on prompt(s) [1]" in refusal(
        SpeculativeReport(**{**fields, "identical": False, "mismatches": [1]}), 1.3)
    assert "a slowdown is not excluded" in refusal(SpeculativeReport(**{**fields, "speedup": [1.4, 0.9, 1.9]}), 1.3)


def test_grounded_prompts_hold_corpus_text():
    prompts = grounded_prompts(2, task="repeat", sentences=3)
    assert len(prompts) == 2 and all(p.startswith("Repeat the following text exactly.") for p in prompts)
    assert prompts[0] != prompts[1]
    with pytest.raises(BadInput, match="task 'translate' is unknown"):
        grounded_prompts(1, task="translate")


def test_cli_speculate_refuses_a_speculation_that_does_not_pay(capsys, lm, tmp_path):
    out = tmp_path / "report.json"
    code, stdout, err = _cli(capsys, "speculate", str(lm["target_onnx"].folder), "--prompt-lookup", "3",
                             "--num-tokens", "3", "--prompts", "2", "--sentences", "2", "--new-tokens", "16",
                             "--rounds", "2", "--min-speedup", "1000", "-o", str(out))
    assert code == 3, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "net decode speedup" in lines[0] and "below --min-speedup 1000.00" in lines[0]
    assert "identical on 2 prompt(s)" in stdout
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["identical"] is True and len(report["speedup"]) == 3


def test_cli_speculate_with_a_foreign_vocabulary_is_one_line_exit_2(capsys, lm):
    code, _, err = _cli(capsys, "speculate", str(lm["target_onnx"].folder), "--draft", str(lm["alien_folder"]))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "vocabulary of 300 tokens" in lines[0]
    code, _, err = _cli(capsys, "speculate", str(lm["target_onnx"].folder))
    assert code == 2 and "exactly one draft" in err


def test_cli_generate_with_a_draft_prints_the_same_text(capsys, lm):
    folder = str(lm["target_onnx"].folder)
    code, plain, err = _cli(capsys, "generate", folder, "-p", PROMPTS[0], "-n", "24", "--json")
    assert code == 0, err
    code, spec, err = _cli(capsys, "generate", folder, "-p", PROMPTS[0], "-n", "24", "--json",
                           "--draft", str(lm["pruned_onnx"].folder), "--num-tokens", "3")
    assert code == 0, err
    plain, spec = json.loads(plain), json.loads(spec)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["speculative"]["draft"] == "tiny-pruned" and spec["speculative"]["tokens_per_call"] >= 1.0
    code, looked_up, err = _cli(capsys, "generate", folder, "-p", PROMPTS[0], "-n", "24", "--json",
                                "--prompt-lookup", "2")
    assert code == 0, err
    assert json.loads(looked_up)["token_ids"] == plain["token_ids"]


def _recipe(lm, **options):
    return {"name": "spec", "model": str(lm["target_onnx"].folder), "evaluate": {"enabled": False}, "profile": None,
            "steps": [{"speculate": {"prompt_lookup": 3, "num_tokens": 3, "prompts": 2, "sentences": 2,
                                     "new_tokens": 16, "rounds": 2, **options}}]}


def test_recipe_step_records_the_measurement_and_gates(lm, tmp_path, cache_dir):
    result = es.run(_recipe(lm, min_speedup=None), runs_dir=tmp_path / "runs", progress=False)
    out = result.artifacts["speculate"]
    assert out.kind == "onnx" and out.meta["speculative"]["mode"] == "prompt-lookup"
    assert out.meta["speculative"]["identical"] is True and out.meta["speculative"]["num_tokens"] == 3
    step = result.manifest["steps"][0]
    assert step["pass"] == "speculate" and step["report"]["identical"] is True and len(step["report"]["speedup"]) == 3
    with pytest.raises(GateFailed, match="speculate: net decode speedup .* below --min-speedup 1000.00"):
        es.run(_recipe(lm, min_speedup=1000), runs_dir=tmp_path / "runs", progress=False)
    with pytest.raises(BadInput, match="exactly one of draft"):
        es.run(_recipe(lm, draft=str(lm["pruned_onnx"].folder)), runs_dir=tmp_path / "runs", progress=False)
