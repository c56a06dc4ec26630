"""Generation profiles of decoders: time to first token per prompt length, prefill and decode
tokens/s, the raw per-token decode latencies, peak RSS and load time, in the versioned Profile.

Why two speeds and not one latency: prefill is GEMM-bound and decode bandwidth-bound, and they
rank runtimes differently. On SmolLM2-135M with 2 threads (FIELD-NOTES § Decoders) PyTorch FP32
eager reaches the first token of a 128-token prompt in 370-410 ms but decodes 13-14 tokens/s;
llama.cpp on the Q4_1 file needs 485-512 ms and decodes 100-119 tokens/s. A profile keeps both, per
prompt length, with every sample raw so that ``compare`` can put bootstrap intervals on each.

How one profile is measured, on :func:`edgesmith.runtimes.generation.decode_loop` (the loop
``generate`` runs, so what is timed is what users get):

- prompts of exactly N tokens: the shipped corpus through the artifact's tokenizer (or ``texts``),
  cut to N; random ids within the vocabulary when there is no tokenizer. The same prompts in every
  round and for every artifact with the same tokenizer, so two profiles time the same work;
- a round prefills every prompt length once (time to first token = prefill + choosing the first
  token) and, after the first length, generates ``new_tokens`` greedily with EOS ignored (a forced
  length: a model that stops early would otherwise look fast); ``warmup`` untimed rounds first;
- the session's providers and options are read back from it, never copied from what was asked.

Peak RSS: on Linux the kernel's high-water mark (VmHWM) is reset to the current RSS before loading
(``/proc/self/clear_refs``), so the peak covers the load and the generation and not whatever the
process did before; where that cannot be done it is ``getrusage``'s ``ru_maxrss`` (the process's
lifetime peak) or psutil's. The profile says which.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.profiling.environment import fingerprint
from edgesmith.profiling.measure import artifact_info
from edgesmith.profiling.schema import (
    ArtifactInfo,
    BatchedGeneration,
    GenerationStats,
    Profile,
    RuntimeInfo,
    Shapes,
    Stats,
)
from edgesmith.profiling.worker import artifact_location, run_worker
from edgesmith.runtimes.generation import decoder_runtime
from edgesmith.stats import summarize

log = logging.getLogger(__name__)

GENERATION_TASK = "text-generation"
DEFAULT_PROMPT_TOKENS = (128, 512)
DEFAULT_NEW_TOKENS = 128
DEFAULT_ROUNDS = 3
DEFAULT_WARMUP = 1
#: corpus sentences read per try when building a long prompt (doubled until the prompt is long enough)
_SENTENCES_PER_TRY = 64


def is_decoder(artifact: Artifact) -> bool:
    """A causal LM (task text-generation): profiled as generation, not as one forward pass."""
    return artifact.task == GENERATION_TASK


def parse_counts(value: str | int | Sequence[int], *, flag: str, name: str, noun: str, example: str,
                 how: str) -> list[int]:
    """"1,2,4,8" (or one number, or a list) -> [1, 2, 4, 8]: positive, each once, in the order given;
    one line naming ``flag`` / ``name`` otherwise (prompt lengths, batch sizes; ``how`` says how to
    write them)."""
    if isinstance(value, str):
        try:
            counts = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise BadInput(f"{flag} '{value}': {how}, e.g. {example}") from None
    elif isinstance(value, int):
        counts = [value]
    else:
        counts = [int(v) for v in value]
    if not counts:
        raise BadInput(f"{name}: give at least one {noun}, e.g. {example}")
    if any(n < 1 for n in counts):
        raise BadInput(f"{name} {counts}: every {noun} must be at least 1")
    if len(set(counts)) != len(counts):
        raise BadInput(f"{name} {counts}: a {noun} is listed twice; list each once")
    return counts


def parse_prompt_tokens(value: str | Sequence[int]) -> list[int]:
    """"128,512" (or a list) -> [128, 512]: positive, distinct, in the order given."""
    return parse_counts(value, flag="--prompt-tokens", name="prompt tokens", noun="prompt length", example="128,512",
                        how="give comma-separated token counts")


def check_generation_arguments(new_tokens: int, batch: int, warmup: int, rounds: int) -> None:
    if new_tokens < 2:
        raise BadInput(f"new tokens must be at least 2 (the first is part of the time to first token, the rest "
                       f"are decode steps); got {new_tokens}")
    if batch < 1:
        raise BadInput(f"batch must be at least 1 (got {batch})")
    if warmup < 0:
        raise BadInput(f"warmup must be 0 or more rounds (got {warmup})")
    if rounds < 1:
        raise BadInput(f"rounds must be at least 1 (got {rounds})")


def check_max_batch(runtime, batch: int) -> None:
    """One line when ``batch`` rows are more than the runtime's decoder sessions run at once (``MAX_BATCH``)."""
    session_class = runtime.decoder_session
    limit = None if session_class is None else session_class.MAX_BATCH
    if limit is not None and batch > limit:
        raise BadInput(f"batch {batch} is more than runtime '{runtime.name}' runs at once ({limit} rows); "
                       f"give batch sizes up to {limit}")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def token_rows(tokenizer, length: int, batch: int, texts: Sequence[str] | None) -> np.ndarray:
    """``batch`` rows of exactly ``length`` ids: consecutive sentences joined and tokenized (special
    tokens such as BOS kept where the tokenizer adds them), each row from other sentences; the
    sentences are read again from the start when there are too few."""
    from edgesmith.data import builtin_corpus

    per_row = _SENTENCES_PER_TRY
    while True:
        pool = [t for t in (texts if texts is not None else builtin_corpus(limit=per_row * batch)) if t]
        if not pool:
            raise BadInput("no texts to build prompts from; give non-empty texts")
        rows = []
        for row in range(batch):
            chosen = [pool[(row * per_row + i) % len(pool)] for i in range(per_row)]
            ids = list(tokenizer(" ".join(chosen), verbose=False)["input_ids"])
            if len(ids) < length:
                break
            rows.append(ids[:length])
        else:
            return np.asarray(rows, dtype=np.int64)
        per_row *= 2


def prompt_batches(tokenizer, lengths: Sequence[int], batch: int, *, vocab_size: int,
                   texts: Sequence[str] | None = None, seed: int = 0) -> tuple[dict[int, np.ndarray], str]:
    """{length: ids [batch, length]} and where they came from ("tokenizer" or "random ids")."""
    if tokenizer is not None:
        return {n: token_rows(tokenizer, n, batch, texts) for n in lengths}, "tokenizer"
    if vocab_size < 1:
        raise BadInput("the model has no tokenizer and no known vocabulary size to draw prompt ids from; save its "
                       "tokenizer beside it")
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, vocab_size, size=(batch, n), dtype=np.int64) for n in lengths}, "random ids"


# ---------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------


def progress_bar(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]generation rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def profile_generation(artifact: Artifact, runtime: str | None = None, *,
                       prompt_tokens: Sequence[int] | str | None = None,
                       new_tokens: int = DEFAULT_NEW_TOKENS, batch: int = 1, warmup: int = DEFAULT_WARMUP,
                       rounds: int = DEFAULT_ROUNDS, threads: int | None = None, label: str | None = None,
                       texts: Sequence[str] | None = None, progress: bool = False, target: str = "cpu-local",
                       **runtime_options: Any) -> Profile:
    """Profile a decoder's generation on ``runtime`` (default: ONNX Runtime for an ONNX export,
    torch for a TorchModel): TTFT and prefill tokens/s per prompt length, decode tokens/s and raw
    per-token latencies over ``new_tokens`` forced greedy tokens after the first prompt length, for
    ``rounds`` timed rounds after ``warmup`` untimed ones. ``runtime_options`` go to the session
    (ONNX Runtime: provider, allow_spinning, graph_optimization).

    One ``batch`` of equal-length rows; for several batch sizes of mixed-length prompts see
    :func:`edgesmith.profiling.batched.profile_batched` (``es.profile(..., batch=[1, 2, 4, 8])``)."""
    if not isinstance(batch, int):
        raise BadInput(f"batch {batch!r}: profile_generation takes one batch size; for a list of batch sizes "
                       "use es.profile or edgesmith.profiling.batched.profile_batched")
    if not is_decoder(artifact):
        raise BadInput(f"{artifact.name} is a {artifact.task} model; generation profiles are for causal LMs "
                       "(text-generation): profile it with --batch/--seq instead")
    lengths = parse_prompt_tokens(DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens)
    check_generation_arguments(new_tokens, batch, warmup, rounds)
    chosen = decoder_runtime(artifact, runtime)
    runtime_name = chosen.name
    chosen.check_decoder_options(runtime_options)
    check_max_batch(chosen, batch)
    info = artifact_info(artifact)
    runtime_options = chosen.generation_options(artifact, lengths, new_tokens, runtime_options)
    own_file = chosen.decoder_location(artifact)
    if own_file is not None:  # the runtime runs its own file (llama.cpp: a model read from a GGUF runs that file)
        info = info.model_copy(update={"size_bytes": own_file.stat().st_size})
    spec: dict[str, Any] = {"name": artifact.name, "runtime": runtime_name, "options": runtime_options,
                            "threads": threads, "lengths": lengths, "new_tokens": new_tokens, "warmup": warmup,
                            "rounds": rounds, "batch": batch, "prompts": None, "seed": 0}
    source = "random ids"
    if artifact.tokenizer is not None:
        prompts, source = prompt_batches(artifact.tokenizer, lengths, batch, vocab_size=0, texts=texts)
        spec["prompts"] = {str(n): ids.tolist() for n, ids in prompts.items()}
    bar = progress_bar(progress)
    task = bar.add_task("rounds", total=rounds) if bar else None
    with tempfile.TemporaryDirectory(prefix="edgesmith-profile-") as scratch:
        spec["path"] = str(artifact_location(artifact, runtime_name, Path(scratch)))
        if bar:
            bar.start()
        try:
            raw = run_worker(spec, on_round=(lambda: bar.advance(task)) if bar else None)
        finally:
            if bar:
                bar.stop()
    session_options = raw["options"]
    used_threads = session_options.get("threads", threads)
    prof = generation_profile(
        label=label or f"{artifact.name} ({runtime_name})", artifact=info,
        runtime=RuntimeInfo(name=runtime_name, providers=raw["providers"], options=session_options), target=target,
        threads=int(used_threads) if used_threads else None, batch=batch, new_tokens=new_tokens, warmup=warmup,
        ttft_ms={int(n): v for n, v in raw["ttft_ms"].items()}, decode_ms=raw["decode_ms"], load_s=raw["load_s"],
        peak_rss_mb=raw["peak_rss_mb"], rss_source=raw["rss_source"], prompt_source=source)
    log.info("%s: decode %.1f tokens/s, TTFT %s", artifact.name, prof.throughput,
             ", ".join(f"@{n} {np.median(v):.1f} ms" for n, v in raw["ttft_ms"].items()))
    return prof


def generation_profile(*, label: str, artifact: ArtifactInfo, runtime: RuntimeInfo, target: str = "cpu-local",
                       threads: int | None, batch: int, new_tokens: int, warmup: int,
                       ttft_ms: Mapping[int, Sequence[float]], decode_ms: Sequence[Sequence[float]], load_s: float,
                       peak_rss_mb: float | None, rss_source: str, prompt_source: str = "tokenizer",
                       batched: BatchedGeneration | None = None) -> Profile:
    """A generation Profile from raw samples, measured here or by another runtime's own loop (a
    benchmark's llama.cpp or ORT GenAI side): ``ttft_ms`` {prompt length: one TTFT per round}, the
    first length being the one decode followed; ``decode_ms`` one list of per-token latencies
    (``new_tokens - 1``) per round. Tokens/s, statistics and the creation time are filled in.
    ``batched``: a static batch of mixed-length prompts (prefill tokens/s counts its real tokens)."""
    lengths = [int(n) for n in ttft_ms]
    steps = new_tokens - 1
    rounds = [list(map(float, r)) for r in decode_ms]
    if not lengths or not rounds or any(len(r) != steps for r in rounds):
        raise BadInput(f"a generation profile needs TTFT samples and {steps} decode latencies per round "
                       f"(new_tokens - 1); got {[len(r) for r in rounds]}")
    if any(len(v) != len(rounds) for v in ttft_ms.values()):
        raise BadInput(f"a generation profile needs one TTFT per round ({len(rounds)}) at every prompt length")
    generation = GenerationStats(
        prompt_tokens=lengths, new_tokens=new_tokens, decode_prompt_tokens=lengths[0], decode_steps=steps,
        batch=batch, rounds=len(rounds),
        ttft_ms={str(n): [float(ms) for ms in v] for n, v in ttft_ms.items()},
        prefill_tokens_per_s={str(n): [(sum(batched.row_prompt_tokens) if batched else batch * int(n)) * 1000.0 / ms
                                       for ms in v] for n, v in ttft_ms.items()},
        decode_tokens_per_s=[batch * steps * 1000.0 / sum(r) for r in rounds],
        load_s=round(load_s, 4), peak_rss_mb=peak_rss_mb, rss_source=rss_source, prompt_source=prompt_source,
        batched=batched)
    latencies = [ms for r in rounds for ms in r]
    return Profile(
        kind="generation",
        label=label,
        artifact=artifact,
        runtime=runtime,
        target=target,
        environment=fingerprint(threads=threads),
        shapes=Shapes(batch=batch, seq=lengths[0]),
        warmup=warmup,
        iterations=len(rounds) * steps,
        latencies_ms=latencies,
        stats=Stats(**summarize(latencies)),
        throughput=float(np.median(generation.decode_tokens_per_s)),
        peak_host_memory_mb=peak_rss_mb,
        generation=generation,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
