"""llama.cpp as a runtime (edgesmith.runtimes.llamacpp) and on devices (the agent's ``llamacpp`` command).

A tiny F32 GGUF (the tiny Llama of tests/tiny_lm.py written by edgesmith.gguf.writer) checks the
session's mechanics tightly: its logits equal the torch model's, prefill + steps equal one full
pass, chunked prompts, state reset, the context limit. The packaged SmolLM2 Q4_1 file checks the
same on a real quantized model, where llama.cpp's one-token kernels and its batched kernels differ
(measured: up to 4 % of the logit range, top-1 equal on 95 % of 101 positions), so the tolerance
there is looser. No timing asserts. The remote tests reuse tests/test_remote.py's sshd on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import test_remote
import torch
from tiny_lm import tiny_llama, train_tokenizer

from edgesmith.artifacts import TorchModel
from edgesmith.cli.app import main
from edgesmith.errors import BadInput
from edgesmith.profiling import Profile
from edgesmith.profiling.ssh import AGENT_PATH

pytestmark = pytest.mark.llamacpp
#: the sshd on 127.0.0.1 and its device venv, shared with tests/test_remote.py
device_python, loopback, needs_sshd = test_remote.device_python, test_remote.loopback, test_remote.needs_sshd

LENGTHS = (12, 40)
NEW = 6
REPO = Path(__file__).resolve().parents[1]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama (vocab 400, context 256), its tokenizer, and the same model as an F32 GGUF."""
    from edgesmith.gguf.writer import write_gguf

    base = tmp_path_factory.mktemp("tiny-gguf")
    tokenizer = train_tokenizer(base / "tokenizer")
    module = tiny_llama()
    path = base / "tiny.gguf"
    write_gguf(module, tokenizer, path, quant="f32", name="tiny-llama")
    return module, tokenizer, path


@pytest.fixture(scope="module")
def session(tiny):
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession

    s = LlamaCppDecoderSession(tiny[2], threads=1, n_batch=16)
    yield s
    s.close()


def _ids(tokenizer, n: int) -> np.ndarray:
    from edgesmith.data import builtin_corpus

    ids = tokenizer(" ".join(builtin_corpus(limit=40)))["input_ids"][:n]
    assert len(ids) == n
    return np.array([ids], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The session's mechanics
# ---------------------------------------------------------------------------------------------


def test_tiny_f32_logits_equal_torch_and_gguf_tokenizer_equals_hf(tiny, session):
    from edgesmith.runtimes.llamacpp import load_gguf_file

    module, tokenizer, path = tiny
    ids = _ids(tokenizer, 40)  # longer than n_batch 16: decoded in three chunks
    with torch.no_grad():
        ref = module(torch.from_numpy(ids)).logits.numpy()
    got = session.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    art = load_gguf_file(path)
    assert art.kind == "gguf" and art.task == "text-generation" and art.name == "tiny"
    text = "The quick brown fox jumps over the lazy dog."
    assert art.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert session.vocab_size == 400 and session.num_layers == 2 and session.eos_token_ids == [2]
    assert session.max_positions == 256 and session.options["n_ctx_train"] == 256
    assert session.options["threads"] == 1 and session.options["version"] and "CPU" in session.options["build"]


def test_prefill_and_steps_equal_the_full_pass(tiny, session):
    ids = _ids(tiny[1], 40)
    full = session.logits(ids)
    outs = [session.prefill(ids[:, :20])]  # 20 > n_batch 16: chunked prefill
    outs += [session.step(ids[:, i]) for i in range(20, 40)]
    for i, out in enumerate(outs[:-1]):
        assert out.shape == (1, 400)
        np.testing.assert_allclose(out[0], full[0, 19 + i], atol=1e-3)
    assert session.past_length == 40


def test_logits_mid_sequence_leaves_the_sequence_as_it_was(tiny, session):
    ids = _ids(tiny[1], 30)
    session.prefill(ids[:, :10])
    before = session.step(ids[:, 10])
    session.logits(ids[:, :5])  # another sequence in between
    after = session.step(ids[:, 11])
    session.prefill(ids[:, :10])
    session.step(ids[:, 10])
    np.testing.assert_allclose(after, session.step(ids[:, 11]), atol=1e-5)
    assert before.shape == (1, 400)


def test_state_reset_between_prompts(tiny, session):
    ids = _ids(tiny[1], 30)
    first = session.prefill(ids[:, 10:30])
    session.prefill(ids[:, :10])
    for i in range(10, 15):
        session.step(ids[:, i])
    again = session.prefill(ids[:, 10:30])  # a new sequence: nothing of the previous one stays
    np.testing.assert_allclose(first, again, atol=1e-5)
    session.reset()
    with pytest.raises(BadInput, match="before prefill"):
        session.step(ids[:, 0])


def test_extend_and_rollback_for_speculative_decoding(tiny, session):
    ids = _ids(tiny[1], 30)
    full = session.logits(ids)
    session.prefill(ids[:, :10])
    several = session.extend(ids[:, 10:20], keep=10)  # draft tokens verified in one call
    np.testing.assert_allclose(several[0], full[0, 10:20], atol=1e-3)
    session.rollback(15)  # the last five rejected
    assert session.past_length == 15
    np.testing.assert_allclose(session.step(ids[:, 15]), full[:, 15], atol=1e-3)


def test_context_overflow_batch_and_bad_options_are_one_line(tiny):
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession

    path = tiny[2]
    ids = np.random.default_rng(0).integers(3, 400, size=(1, 257))
    with LlamaCppDecoderSession(path, threads=1, n_ctx=100) as small:
        assert small.max_positions == 256  # llama.cpp pads its KV cache to a multiple of 256 positions
        with pytest.raises(BadInput, match="257 tokens exceed the llama.cpp context of 256"):
            small.prefill(ids)
        small.prefill(ids[:, :256])
        with pytest.raises(BadInput, match="exceed the model's context of 256"):
            small.step(ids[:, 256])
        with pytest.raises(BadInput, match="batch 257 is more than LlamaCppDecoderSession runs at once"):
            small.reserve(257, 8)  # llama.cpp's LLAMA_MAX_SEQ sequences at most
    with pytest.raises(BadInput, match="training context of 256"):
        LlamaCppDecoderSession(path, n_ctx=1024)
    with pytest.raises(BadInput, match="not a GGUF file"):
        LlamaCppDecoderSession(Path(__file__))
    with pytest.raises(BadInput, match="runs GGUF files"):
        LlamaCppDecoderSession(TorchModel(task="text-generation", name="m", module=tiny[0]))


def test_packaged_smollm2_q4_1_mechanics():
    from edgesmith.gguf.source import smollm2_gguf_path
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession, load_gguf_file

    art = load_gguf_file("smollm2")
    assert art.name == "smollm2" and art.path == smollm2_gguf_path()
    ids = np.array([art.tokenizer("The capital of France is Paris. The capital of Italy is Rome. The capital "
                                  "of Germany is")["input_ids"]])
    with LlamaCppDecoderSession(art, threads=2, n_ctx=128) as s:
        assert s.vocab_size == 49152 and s.num_layers == 30 and 2 in s.eos_token_ids
        assert s.options["n_ctx_train"] == 8192 and "Q4_1" in s.options["model"]
        n = ids.shape[1]
        full = s.logits(ids)
        first = s.prefill(ids[:, :n - 4])
        np.testing.assert_array_equal(first[0], full[0, n - 5])  # both batched: the same kernels
        steps = [s.step(ids[:, i]) for i in range(n - 4, n)]
        for i, out in enumerate(steps):  # one-token kernels: close, not equal (Q8 activations per call)
            ref = full[0, n - 4 + i]
            assert np.abs(out[0] - ref).max() < 0.08 * np.ptp(ref)
        assert art.tokenizer.decode([int(steps[-1][0].argmax())]).strip() == "Berlin"


# ---------------------------------------------------------------------------------------------
# Profiles, registry and CLI
# ---------------------------------------------------------------------------------------------


def test_runtime_is_registered_and_usable():
    from edgesmith.artifacts import GgufModel
    from edgesmith.runtimes.base import get_runtime

    runtime = get_runtime("llamacpp")
    avail = runtime.availability()
    assert avail.usable and avail.version and avail.devices == ["cpu"]
    assert runtime.accepts(GgufModel(folder=Path("."), file="x.gguf")) and not runtime.accepts(TorchModel())


def test_cli_profile_gguf_on_llamacpp_and_compare_with_onnxruntime(tiny, tmp_path, capsys):
    from edgesmith.export.decoder import export_decoder

    module, tokenizer, path = tiny
    onnx_model = export_decoder(TorchModel(task="text-generation", name="tiny-llama", module=module,
                                           tokenizer=tokenizer), tmp_path / "onnx", steps=4)
    lcpp, ort = tmp_path / "lcpp.json", tmp_path / "ort.json"
    common = ["--prompt-tokens", ",".join(map(str, LENGTHS)), "--new-tokens", str(NEW), "--rounds", "2",
              "--threads", "1"]
    code, out, err = _cli(capsys, "profile", str(path), "--runtime", "llamacpp", *common, "-o", str(lcpp))
    assert code == 0, err
    assert "runtime llamacpp" in out and "TTFT @12 tokens" in out and "TTFT @40 tokens" in out and "peak RSS" in out
    prof = Profile.load(lcpp)
    gen = prof.generation
    assert prof.is_generation and prof.runtime.name == "llamacpp" and prof.artifact.kind == "gguf"
    assert gen.prompt_tokens == list(LENGTHS) and gen.rounds == 2 and gen.decode_steps == NEW - 1
    assert all(len(v) == 2 for v in gen.ttft_ms.values()) and len(prof.latencies_ms) == 2 * (NEW - 1)
    assert gen.prompt_source == "tokenizer" and gen.peak_rss_mb and gen.peak_rss_mb > 0
    options = prof.runtime.options
    assert options["threads"] == 1 and prof.environment.threads == 1
    assert options["n_ctx"] == 256 and options["version"] and options["build"]  # 40 asked, padded by llama.cpp
    code, _, err = _cli(capsys, "profile", str(onnx_model.folder), *common, "-o", str(ort))
    assert code == 0, err
    code, out, err = _cli(capsys, "compare", str(ort), str(lcpp), "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["verdict"] == "baseline" for r in rows] == [True, False]
    assert all(r["generation"]["decode_tokens_per_s"] > 0 for r in rows)


def test_cli_llamacpp_bad_inputs_are_one_line_exit_2(tiny, tmp_path, capsys):
    out_file = tmp_path / "never.json"
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not a gguf")
    for args, message in (
        ([str(tiny[2]), "--prompt-tokens", "300", "--new-tokens", "4"], "longer than the model's context of 256"),
        ([str(tiny[2]), "--prompt-tokens", "200", "--new-tokens", "100"], "exceed the model's context of 256"),
        ([str(tiny[2]), "--batch", "300", "--prompt-tokens", "8", "--new-tokens", "4"],
         "batch 300 is more than runtime 'llamacpp' runs at once (256 rows)"),
        ([str(onnx_file)], "not a GGUF file"),
        ([str(tiny[2]), "--seq", "64"], "--seq applies to one-forward-pass profiles"),
        ([str(tiny[2]), "--timeout", "5"], "need --target"),
    ):
        code, _, err = _cli(capsys, "profile", *args, "--runtime", "llamacpp", "-o", str(out_file))
        assert code == 2, err
        assert message in " ".join(err.split()) and "Traceback" not in err
        assert not out_file.exists()


def test_python_profile_of_a_model_loaded_from_gguf_runs_its_file(tiny):
    from edgesmith.profiling import profile
    from edgesmith.runtimes.llamacpp import load_gguf_file

    art = load_gguf_file(tiny[2])
    prof = profile(art, prompt_tokens=[8], new_tokens=3, rounds=1, warmup=0, threads=1)
    assert prof.runtime.name == "llamacpp" and prof.generation.decode_steps == 2
    torch_model = TorchModel(task="text-generation", name="t", module=tiny[0], tokenizer=tiny[1],
                             meta={"gguf": {"path": str(tiny[2])}})
    prof = profile(torch_model, "llamacpp", prompt_tokens=[8], new_tokens=3, rounds=1, warmup=0, threads=1)
    assert prof.runtime.name == "llamacpp" and prof.artifact.kind == "torch"
    with pytest.raises(BadInput, match="use --runtime llamacpp"):
        profile(art, "onnxruntime", prompt_tokens=[8], new_tokens=3)
    with pytest.raises(BadInput, match="take no option"):
        profile(art, prompt_tokens=[8], new_tokens=3, allow_spinning=True)


# ---------------------------------------------------------------------------------------------
# The device agent: llama-bench's JSON and the llama-cpp-python loop
# ---------------------------------------------------------------------------------------------

#: a stand-in for llama.cpp's llama-bench: prints the ``-o json`` document (the format of
#: llama.cpp's tools/llama-bench README) for the tests asked, ``-r`` samples each; with
#: FAKE_NO_DEPTH set it rejects ``-d`` as a llama-bench older than --n-depth does
FAKE_LLAMA_BENCH = r'''#!/usr/bin/env python3
import json, os, sys
a = sys.argv[1:]
def opt(flag, default=None):
    return a[a.index(flag) + 1] if flag in a else default
if "-d" in a and os.environ.get("FAKE_NO_DEPTH"):
    print("error: invalid parameter for argument: -d", file=sys.stderr)
    sys.exit(1)
if os.environ.get("FAKE_LOG"):  # not over ssh: the device's environment is its own
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(" ".join(a) + "\n")
reps = int(opt("-r", "5"))
tests = []
for p in [int(x) for x in opt("-p", "512").split(",")]:
    for n in [int(x) for x in opt("-n", "128").split(",")]:
        if (p == 0) == (n == 0):
            continue
        tokens = p or n
        ns = [int(1e9 * tokens / (100.0 + i)) for i in range(reps)]
        test = {"build_commit": "8cf427ff", "build_number": 5163, "cpu_info": "Fake CPU", "gpu_info": "",
                "backends": "CPU", "model_filename": opt("-m"), "model_type": "llama 135M Q4_1",
                "n_batch": 2048, "n_ubatch": 512, "n_threads": int(opt("-t", "4")), "type_k": "f16",
                "type_v": "f16", "flash_attn": False, "n_prompt": p, "n_gen": n,
                "test_time": "2025-04-24T11:58:50Z", "avg_ns": sum(ns) // reps, "stddev_ns": 1,
                "avg_ts": 101.0, "stddev_ts": 1.0, "samples_ns": ns,
                "samples_ts": [tokens * 1e9 / x for x in ns]}
        if "-d" in a:
            test["n_depth"] = int(opt("-d"))
        tests.append(test)
print(json.dumps(tests, indent=2))
'''


@pytest.fixture()
def fake_llama_bench(tmp_path, monkeypatch) -> tuple[Path, Path]:
    script = tmp_path / "bin" / "llama-bench"
    script.parent.mkdir()
    script.write_text(FAKE_LLAMA_BENCH.replace("/usr/bin/env python3", sys.executable, 1))
    script.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    return script, log


def _agent(*args: str, env: dict | None = None) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, str(AGENT_PATH), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_agent_parses_llama_bench_json(tiny, fake_llama_bench):
    script, log = fake_llama_bench
    args = ["llamacpp", "--model", str(tiny[2]), "--prompt-tokens", "128,512", "--new-tokens", "64", "--rounds", "3",
            "--threads", "2", "--tool", "llama-bench", "--llama-bench", str(script)]
    result = _agent(*args)
    assert result["ok"] and result["tool"] == "llama-bench" and result["decode_depth"] == 128
    assert set(result["ttft_ms"]) == {"128", "512"} and all(len(v) == 3 for v in result["ttft_ms"].values())
    assert result["ttft_ms"]["128"][0] == pytest.approx(128 / 100.0 * 1000, rel=1e-6)
    assert len(result["decode_ms"]) == 3 and all(len(r) == 63 for r in result["decode_ms"])
    assert result["decode_ms"][1][0] == pytest.approx(1000 / 101.0, rel=1e-6)
    assert result["build"]["build_commit"] == "8cf427ff" and result["threads"] == 2
    calls = log.read_text().splitlines()
    assert "-p 128,512 -n 0" in calls[0] and "-p 0 -n 63 -d 128" in calls[1] and "-r 3" in calls[0]
    old = _agent(*args, env={"FAKE_NO_DEPTH": "1"})  # a llama-bench without -d: decode after an empty context
    assert old["ok"] and old["decode_depth"] == 0
    missing = _agent(*args[:-1], str(script.parent / "nowhere"))
    assert not missing["ok"] and missing["kind"] == "runtime-missing"


def test_agent_llama_cpp_python_loop(tiny, tmp_path):
    from edgesmith.data import builtin_corpus

    text = tmp_path / "prompt.txt"
    text.write_text(" ".join(builtin_corpus(limit=60)))
    result = _agent("llamacpp", "--model", str(tiny[2]), "--prompt-tokens", "8,24", "--new-tokens", "5",
                    "--rounds", "2", "--warmup", "0", "--threads", "1", "--prompt-text", str(text))
    assert result["ok"] and result["tool"] == "llama-cpp-python" and result["threads"] == 1
    assert all(len(v) == 2 for v in result["ttft_ms"].values()) and [len(r) for r in result["decode_ms"]] == [4, 4]
    assert result["peak_host_memory_mb"] > 0 and result["environment"]["libraries"]["llama-cpp-python"]


# ---------------------------------------------------------------------------------------------
# On a device over ssh (tests/test_remote.py's sshd on 127.0.0.1)
# ---------------------------------------------------------------------------------------------

@needs_sshd
def test_remote_generation_profile_with_llama_bench_and_llama_cpp_python(loopback, tiny, fake_llama_bench):
    from edgesmith.profiling.remote import profile_remote_generation
    from edgesmith.runtimes.llamacpp import load_gguf_file

    script, _ = fake_llama_bench
    art = load_gguf_file(tiny[2])
    # the device venv has no llama-cpp-python: the agent falls back to llama-bench
    bench = profile_remote_generation(art, loopback.target(), prompt_tokens=[16, 32], new_tokens=5, rounds=2,
                                      llama_bench=str(script))
    assert bench.is_generation and bench.runtime.name == "llamacpp" and bench.target == "loopback"
    assert bench.runtime.options["tool"] == "llama-bench" and bench.generation.prompt_source == "random ids"
    assert bench.generation.rounds == 2 and bench.runtime.options["remote"]["artifact_copied"]
    assert bench.environment.cpu_model and bench.artifact.kind == "gguf"
    # a device Python with llama-cpp-python: the measured loop, raw per-token latencies
    own = profile_remote_generation(art, loopback.target(python=sys.executable), prompt_tokens=[16, 32],
                                    new_tokens=5, rounds=2, warmup=0)
    assert own.runtime.options["tool"] == "llama-cpp-python" and own.generation.prompt_source == "tokenizer"
    assert not own.runtime.options["remote"]["artifact_copied"]  # found in the device cache
    assert len(own.latencies_ms) == 2 * 4 and own.generation.peak_rss_mb > 0
    with pytest.raises(BadInput, match="neither llama-cpp-python"):
        profile_remote_generation(art, loopback.target(), prompt_tokens=[16], new_tokens=3, rounds=1)


@needs_sshd
def test_cli_profile_llamacpp_on_a_target(loopback, tiny, tmp_path, capsys):
    import yaml

    targets = tmp_path / "targets"
    targets.mkdir()
    target = loopback.target(name="loopback-llama", python=sys.executable)
    (targets / "loopback-llama.yaml").write_text(yaml.safe_dump(target.model_dump(mode="json", exclude_none=True)))
    out_file = tmp_path / "remote.json"
    code, out, err = _cli(capsys, "profile", str(tiny[2]), "--runtime", "llamacpp", "--target", "loopback-llama",
                          "--targets-dir", str(targets), "--prompt-tokens", "16", "--new-tokens", "4", "--rounds", "1",
                          "--timeout", "120", "-o", str(out_file))
    assert code == 0, err
    prof = Profile.load(out_file)
    assert prof.target == "loopback-llama" and prof.runtime.name == "llamacpp" and "TTFT @16 tokens" in out
    assert prof.runtime.options["remote"]["destination"] and prof.generation.decode_steps == 3


def test_generate_on_llamacpp_matches_torch_greedy(tiny):
    """es.generate(..., runtime="llamacpp") runs the F32 GGUF as it is; greedy tokens equal PyTorch's."""
    import edgesmith as es

    module, tokenizer, path = tiny
    torch_model = TorchModel(task="text-generation", module=module, tokenizer=tokenizer, name="tiny")
    prompt = "The river flows"
    on_cpp = es.generate(str(path), prompt, runtime="llamacpp", max_new_tokens=8, chat=False, ignore_eos=True)
    on_torch = es.generate(torch_model, prompt, max_new_tokens=8, chat=False, ignore_eos=True)
    assert on_cpp.providers == ["llama.cpp-cpu"]
    assert on_cpp.token_ids == on_torch.token_ids
    with pytest.raises(BadInput, match="runs on torch, not onnxruntime"):
        es.generate(torch_model, prompt, runtime="onnxruntime", max_new_tokens=2)


def test_gguf_tokenizer_renders_the_files_chat_template_as_transformers_does(tiny, tmp_path):
    import copy

    from edgesmith.gguf.writer import write_gguf
    from edgesmith.runtimes.llamacpp import load_gguf_file

    module, tokenizer, _ = tiny
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    write_gguf(module, tok, tmp_path / "chat.gguf", quant="f32")
    gguf = load_gguf_file(tmp_path / "chat.gguf")
    messages = [{"role": "user", "content": "Name three rivers."}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert gguf.tokenizer.chat_template == tok.chat_template
    assert gguf.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == list(expected)


def test_head_pruned_llama_written_to_gguf_runs_in_llama_cpp(tiny, tmp_path):
    """heads × head_dim ≠ hidden after head pruning: attention.key_length lets llama.cpp load it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import edgesmith as es
    from edgesmith.gguf.writer import write_gguf
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession

    tokenizer = tiny[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      attn_implementation="eager")
    module = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    pruned = es.compress.prune(TorchModel(task="text-generation", module=module, tokenizer=tokenizer, name="t"),
                               heads=0.5, check_latency=False)
    assert pruned.module.config.num_attention_heads == 4 and not pruned.structure
    write_gguf(pruned.module, tokenizer, tmp_path / "hp.gguf", quant="f32")
    session = LlamaCppDecoderSession(tmp_path / "hp.gguf", threads=1)
    ids = _ids(tokenizer, 12)
    ours = session.logits(ids)[0]
    with torch.no_grad():
        ref = pruned.module(torch.tensor(ids)).logits[0].numpy()
    session.close()
    assert np.abs(ours - ref).max() < 0.01 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
