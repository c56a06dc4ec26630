"""llama.cpp measured as its users run it (issue 23): edgesmith's profile and generate decode the
packaged SmolLM2 GGUF within 15 % of ``llama_cpp.Llama.generate`` in a clean process.

Until issue 23 edgesmith's CLI set ``OMP_WAIT_POLICY=PASSIVE`` for every command, and llama.cpp,
loaded in that process, decoded at about a quarter of its speed (43-45 against 155-165 tokens/s on
Q4_0). This is the one test that compares speeds: the fault it guards against is a 3.5x slowdown,
the three contenders run in one test in rotating order (3 rounds), each in its own process exactly
as a user starts it, and each is judged by its best round: on a shared 2-core machine a round can
lose most of its speed to another process (llama.cpp's threads meet at a barrier after every op, so
one preempted thread stalls both), which the best of three rounds filters out while a slowdown that
hits every round, as the PASSIVE wait policy did, still shows. Also here: the peak memory
a profile reports is the runtime's (the worker's), not edgesmith's process's, and a folder that
``export --to gguf`` wrote runs with ``generate`` in llama.cpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

THREADS = 2
PROMPT = 128
NEW = 48
ROUNDS = 3
TOLERANCE = 0.15

#: llama-cpp-python's high-level API as a new user would time it: a clean process, the file, the
#: same 128 prompt tokens, greedy generate() for NEW tokens; decode tokens/s over tokens 2..NEW
_REFERENCE = r"""
import json, sys, time
import llama_cpp
path, threads, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
stamps = []
for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
    stamps.append(time.perf_counter())
    if len(stamps) == new:
        break
print(json.dumps({"decode_tokens_per_s": (new - 1) / (stamps[-1] - stamps[0])}))
"""


def _edgesmith(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", "from edgesmith.cli.app import main; main()", *args],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _prompt_ids(path: Path) -> list[int]:
    from edgesmith.profiling.generation import prompt_batches
    from edgesmith.runtimes.llamacpp import load_gguf_file

    art = load_gguf_file(path)
    prompts, _ = prompt_batches(art.tokenizer, [PROMPT], 1, vocab_size=0)
    return prompts[PROMPT][0].tolist()


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    from edgesmith.gguf.source import smollm2_gguf_path

    return smollm2_gguf_path()


def test_profile_and_generate_decode_at_llama_cpps_own_speed(smollm2_file, tmp_path):
    ids = _prompt_ids(smollm2_file)
    prompt_text = (tmp_path / "prompt.txt")
    from edgesmith.runtimes.llamacpp import GgufTokenizer

    prompt_text.write_text(GgufTokenizer(smollm2_file).decode(ids[1:]))  # BOS is added again by generate

    def reference() -> float:
        done = subprocess.run([sys.executable, "-c", _REFERENCE, str(smollm2_file), str(THREADS), str(NEW)],
                              input=json.dumps(ids), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)["decode_tokens_per_s"]

    def profile() -> float:
        doc = _edgesmith("profile", str(smollm2_file), "--runtime", "llamacpp", "--prompt-tokens", str(PROMPT),
                         "--new-tokens", str(NEW), "--rounds", "1", "--warmup", "0", "--threads", str(THREADS),
                         "--json", "-o", str(tmp_path / "profile.json"))
        return float(doc["throughput"])

    def generate() -> float:
        with prompt_text.open() as fh:
            done = subprocess.run([sys.executable, "-c", "from edgesmith.cli.app import main; main()", "generate",
                                   str(smollm2_file), "--runtime", "llamacpp", "--prompt", "-", "--no-chat",
                                   "-n", str(NEW), "--threads", str(THREADS), "--json"],
                                  stdin=fh, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        doc = json.loads(done.stdout)
        assert len(doc["token_ids"]) >= NEW // 2, "generation stopped too early to time its decode"
        return float(doc["decode_tokens_per_s"])

    contenders = {"reference": reference, "profile": profile, "generate": generate}
    speeds: dict[str, list[float]] = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(ROUNDS):  # rotating order: no contender always runs first (or right after another)
        for key in order[r % len(order):] + order[:r % len(order)]:
            speeds[key].append(contenders[key]())
    ref = max(speeds["reference"])
    for key in ("profile", "generate"):
        ratio = max(speeds[key]) / ref
        assert ratio >= 1 - TOLERANCE, (f"edgesmith {key} decodes at {ratio:.2f}x llama_cpp.Llama.generate "
                                        f"(rounds {speeds[key]} vs {speeds['reference']} tokens/s)")
        assert ratio <= 1 + TOLERANCE or key == "generate", (
            f"edgesmith {key} reports {ratio:.2f}x llama_cpp.Llama.generate: faster than llama.cpp itself means "
            f"it does not time what llama.cpp does ({speeds[key]} vs {speeds['reference']} tokens/s)")


def test_profile_memory_is_the_runtimes_not_edgesmiths(smollm2_file):
    """Peak RSS of a llama.cpp profile is the worker's: the 98 MB file mapped, its KV cache and
    compute buffers, Python and numpy; not torch or anything edgesmith's own process loaded."""
    import torch  # noqa: F401 - edgesmith's process holds torch (hundreds of MB); the worker must not

    from edgesmith.profiling import profile_generation
    from edgesmith.runtimes.llamacpp import load_gguf_file

    prof = profile_generation(load_gguf_file(smollm2_file), "llamacpp", prompt_tokens=[32], new_tokens=4,
                              rounds=1, warmup=0, threads=THREADS)
    gen = prof.generation
    assert "worker" in gen.rss_source
    size_mb = smollm2_file.stat().st_size / 2**20
    assert size_mb * 0.5 < gen.peak_rss_mb < size_mb + 400, gen.peak_rss_mb


def test_generate_runs_a_gguf_export_folder_in_llama_cpp(tmp_path):
    """`edgesmith export --to gguf` writes a folder; `generate FOLDER` runs it in llama.cpp."""
    from tiny_lm import tiny_llama, train_tokenizer

    from edgesmith.artifacts import TorchModel
    from edgesmith.export import to_gguf
    from edgesmith.runtimes.generation import generate_text

    tokenizer = train_tokenizer(tmp_path / "tok")
    model = TorchModel(module=tiny_llama(), tokenizer=tokenizer, task="text-generation", name="tiny")
    folder = tmp_path / "gguf"
    to_gguf(model, quant="f32").save(folder)
    result = generate_text(str(folder), "the cat", max_new_tokens=5, chat=False, ignore_eos=True)
    assert result.providers == ["llama.cpp-cpu"] and len(result.token_ids) == 5
