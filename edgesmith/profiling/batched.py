"""Batched generation profiles: static batches of prompts of different lengths, one profile per
batch size (``edgesmith profile ART --batch 1,2,4,8``, ``es.profile(art, batch=[1, 2, 4, 8])``).

What a batch is here: the seed's "batched inference" serving pattern without a scheduler. All
requests arrive together and are served as one static batch, so

- every request's time to first token is the batch's: the prefill of every row plus choosing the
  first token (``GenerationStats.ttft_ms`` at the center length);
- after it every step gives each request one token, so each request's time per output token is the
  step's latency (the profile's raw ``latencies_ms``), and the aggregate decode throughput is
  batch x steps / their time (``GenerationStats.decode_tokens_per_s``, the profile's throughput).

The prompts differ in length, as requests do: for batch B around a center length C (the first
``prompt_tokens``, default 128) the rows hold C x (1 - spread) .. C x (1 + spread) tokens, evenly
spaced (spread 0.5: 64..192 at C = 128, mean C), each cut from other sentences of the shipped
corpus. Each runtime runs them as it runs batches: edgesmith's loop left-pads them and runs
``prefill``/``step`` (ONNX Runtime, PyTorch); llama.cpp decodes every row as a sequence of its own
in the same ``llama_decode`` calls; a session with a batched loop of its own runs that
(:meth:`~edgesmith.runtimes.decoder.DecoderSession.decode_rows`). Every batch size runs in the same
worker process, on one session with room for the largest batch made before anything is timed;
rounds rotate over the batch sizes. ``compare`` puts the profiles side by side: between batch
sizes, the decode ratio is the aggregate throughput's (per-token latency over batch).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.profiling.generation import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_ROUNDS,
    DEFAULT_WARMUP,
    check_generation_arguments,
    check_max_batch,
    generation_profile,
    is_decoder,
    parse_counts,
    parse_prompt_tokens,
    progress_bar,
    token_rows,
)
from edgesmith.profiling.measure import artifact_info
from edgesmith.profiling.schema import BatchedGeneration, Profile, RuntimeInfo
from edgesmith.profiling.worker import artifact_location, run_worker
from edgesmith.runtimes.generation import decoder_runtime

log = logging.getLogger(__name__)

#: prompt lengths spread over center x (1 - SPREAD) .. center x (1 + SPREAD)
DEFAULT_SPREAD = 0.5


def is_batch_list(value: Any) -> bool:
    """Whether ``batch`` asks for batched profiles: a list of sizes, or text with a comma ("1,2,4,8")."""
    return (isinstance(value, str) and "," in value) or isinstance(value, list | tuple)


def parse_batches(value: str | int | Sequence[int]) -> list[int]:
    """"1,2,4,8" (or a list) -> [1, 2, 4, 8]: positive, each once, in the order given."""
    return parse_counts(value, flag="--batch", name="batch sizes", noun="batch size", example="1,2,4,8",
                        how="give batch sizes separated by commas")


def mixed_lengths(center: int, batch: int, spread: float = DEFAULT_SPREAD) -> list[int]:
    """The prompt lengths of a batch: ``center`` for one row; else evenly spaced from
    center x (1 - spread) to center x (1 + spread), at least 1 token each."""
    if not 0 <= spread < 1:
        raise BadInput(f"spread must be in [0, 1) (got {spread})")
    if batch == 1:
        return [center]
    return [max(1, round(center * (1 - spread + 2 * spread * i / (batch - 1)))) for i in range(batch)]


def batch_rows(tokenizer, center: int, batches: Sequence[int], *, spread: float = DEFAULT_SPREAD,
               texts: Sequence[str] | None = None) -> dict[int, list[list[int]]]:
    """{batch size: its rows' token ids}: row i of every batch is cut from the same corpus
    sentences (the tokenizer's special tokens kept), to its mixed length."""
    lengths = {b: mixed_lengths(center, b, spread) for b in batches}
    longest = max(max(v) for v in lengths.values())
    pool = token_rows(tokenizer, longest, max(batches), texts)
    return {b: [pool[i, :n].tolist() for i, n in enumerate(lengths[b])] for b in batches}


def _center(prompt_tokens: Sequence[int] | str | None) -> int:
    if prompt_tokens is None:
        return DEFAULT_PROMPT_TOKENS[0]
    lengths = parse_prompt_tokens(prompt_tokens)
    if len(lengths) != 1:
        raise BadInput(f"prompt tokens {lengths}: a batched profile takes one prompt length, the center of the "
                       "mixed lengths (e.g. --prompt-tokens 128)")
    return lengths[0]


def profile_batched(artifact: Artifact, runtime: str | None = None, *, batch: str | Sequence[int],
                    prompt_tokens: Sequence[int] | str | None = None, new_tokens: int = DEFAULT_NEW_TOKENS,
                    warmup: int = DEFAULT_WARMUP, rounds: int = DEFAULT_ROUNDS, threads: int | None = None,
                    label: str | None = None, texts: Sequence[str] | None = None, progress: bool = False,
                    target: str = "cpu-local", spread: float = DEFAULT_SPREAD, **runtime_options: Any) -> list[Profile]:
    """One generation profile per batch size of ``batch``: static batches of mixed-length prompts
    around ``prompt_tokens`` (one length, default 128), ``new_tokens`` greedy tokens each (EOS
    ignored), ``rounds`` timed rounds after ``warmup``, every size in one worker process."""
    if not is_decoder(artifact):
        raise BadInput(f"{artifact.name} is a {artifact.task} model; batched generation profiles are for causal LMs "
                       "(text-generation): profile it with one --batch and --seq")
    batches = parse_batches(batch)
    center = _center(prompt_tokens)
    check_generation_arguments(new_tokens, max(batches), warmup, rounds)
    chosen = decoder_runtime(artifact, runtime)
    chosen.check_decoder_options(runtime_options)
    check_max_batch(chosen, max(batches))
    longest = max(max(mixed_lengths(center, b, spread)) for b in batches)
    try:
        runtime_options = chosen.generation_options(artifact, [longest], new_tokens, runtime_options)
    except BadInput as exc:  # the runtime checked the longest prompt against the context: say where it came from
        raise BadInput(f"the batch's longest prompt has {longest} tokens (--prompt-tokens {center} +{spread:.0%}): "
                       f"{exc}") from None
    info = artifact_info(artifact)
    own_file = chosen.decoder_location(artifact)
    if own_file is not None:
        info = info.model_copy(update={"size_bytes": own_file.stat().st_size})
    spec: dict[str, Any] = {"name": artifact.name, "runtime": chosen.name, "options": runtime_options,
                            "threads": threads, "batches": batches, "new_tokens": new_tokens, "warmup": warmup,
                            "rounds": rounds, "rows": None, "seed": 0, "pad_id": None,
                            "row_lengths": {str(b): mixed_lengths(center, b, spread) for b in batches}}
    if artifact.tokenizer is not None:
        rows = batch_rows(artifact.tokenizer, center, batches, spread=spread, texts=texts)
        spec["rows"] = {str(b): r for b, r in rows.items()}
        spec["pad_id"] = getattr(artifact.tokenizer, "pad_token_id", None)
    raw = _run(artifact, chosen.name, spec, rounds * len(batches), progress)
    return [_profile_of(raw, b, artifact=artifact, info=info, runtime=chosen.name, center=center, spread=spread,
                        new_tokens=new_tokens, warmup=warmup, threads=threads, label=label, target=target,
                        source="tokenizer" if spec["rows"] is not None else "random ids") for b in batches]


def _run(artifact: Artifact, runtime: str, spec: dict[str, Any], total: int, progress: bool) -> dict[str, Any]:
    bar = progress_bar(progress)
    task = bar.add_task("rounds", total=total) if bar else None
    with tempfile.TemporaryDirectory(prefix="edgesmith-profile-") as scratch:
        spec["path"] = str(artifact_location(artifact, runtime, Path(scratch)))
        if bar:
            bar.start()
        try:
            return run_worker(spec, on_round=(lambda: bar.advance(task)) if bar else None)
        finally:
            if bar:
                bar.stop()


def _profile_of(raw: dict[str, Any], batch: int, *, artifact: Artifact, info, runtime: str, center: int,
                spread: float, new_tokens: int, warmup: int, threads: int | None, label: str | None, target: str,
                source: str) -> Profile:
    part = raw["batches"][str(batch)]
    steps = new_tokens - 1
    batched = BatchedGeneration(
        row_prompt_tokens=[int(n) for n in part["row_prompt_tokens"]], spread=spread, loop=raw["loop"],
        time_per_output_token_ms=[sum(r) / steps for r in part["decode_ms"]])
    used_threads = raw["options"].get("threads", threads)
    prof = generation_profile(
        label=f"{label or f'{artifact.name} ({runtime})'} batch {batch}", artifact=info,
        runtime=RuntimeInfo(name=runtime, providers=raw["providers"], options=raw["options"]), target=target,
        threads=int(used_threads) if used_threads else None, batch=batch, new_tokens=new_tokens, warmup=warmup,
        ttft_ms={center: part["ttft_ms"]}, decode_ms=part["decode_ms"], load_s=raw["load_s"],
        peak_rss_mb=raw["peak_rss_mb"], rss_source=raw["rss_source"], prompt_source=source, batched=batched)
    log.info("%s batch %d: aggregate decode %.1f tokens/s, TTFT %.1f ms", artifact.name, batch, prof.throughput,
             float(np.median(part["ttft_ms"])))
    return prof
