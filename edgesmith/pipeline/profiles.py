"""Profiling a run's artifacts (one profile per target, compared against the first) and flagging
each that is slower than its nearest profiled ancestor ("compressed but not faster")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from edgesmith.artifacts import Artifact
from edgesmith.recipe import Recipe


def profile_all(recipe: Recipe, artifacts: dict[str, Artifact], metrics: dict[str, dict[str, float]],
                run_dir: Path, console: Console):
    """(profiles in the recipe's target order, their comparison against the first)."""
    from edgesmith.profiling import compare, is_decoder, profile, profile_generation
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    spec = recipe.profile
    assert spec is not None
    profiles = []
    for target in recipe.profile_targets():
        art = artifacts[target.artifact]
        runtime = target.runtime or default_runtime_for(art)
        label = f"{target.artifact} ({get_runtime(runtime).short_name or runtime} {precision_of(art, runtime)})"
        progress = console.is_terminal and not console.quiet
        if is_decoder(art) and isinstance(spec.batch, list):  # batched generation: a profile per batch size
            console.print(f"profiling {label} (batched generation: batch {','.join(map(str, spec.batch))}, prompts "
                          f"around {spec.prompt_tokens[0]} tokens, {spec.new_tokens} new tokens, {spec.rounds} rounds) …")
            options = {"provider": target.provider} if target.provider != "cpu" else {}
            batched = profile(art, runtime, prompt_tokens=spec.prompt_tokens[:1], new_tokens=spec.new_tokens,
                              batch=spec.batch, rounds=spec.rounds, threads=spec.threads, target=spec.target,
                              label=label, progress=progress, **options)
            for prof in batched:
                prof.quality = dict(metrics.get(target.artifact, {}))
                prof.save(run_dir / "profiles" / profile_filename(prof.label))
            profiles.extend(batched)
            continue
        if is_decoder(art):
            lengths = ",".join(map(str, spec.prompt_tokens))
            console.print(f"profiling {label} (generation: prompts {lengths} tokens, {spec.new_tokens} new tokens, "
                          f"{spec.rounds} rounds) …")
            options = {"provider": target.provider} if target.provider != "cpu" else {}
            prof = profile_generation(art, runtime, prompt_tokens=spec.prompt_tokens, new_tokens=spec.new_tokens,
                                      batch=spec.batch, rounds=spec.rounds, threads=spec.threads, target=spec.target,
                                      label=label, progress=progress, **options)
        else:
            console.print(f"profiling {label} (batch {spec.batch}, seq {spec.seq}) …")
            prof = profile(art, runtime, batch=spec.batch, seq=spec.seq, warmup=spec.warmup,
                           iterations=spec.iterations, time_budget_s=spec.time_budget_s, threads=spec.threads,
                           provider=target.provider, target=spec.target, label=label, progress=progress)
        prof.quality = dict(metrics.get(target.artifact, {}))
        prof.save(run_dir / "profiles" / profile_filename(label))
        profiles.append(prof)
    comparison = compare(profiles, baseline=0)
    return profiles, comparison


def profiles_manifest(recipe: Recipe, profiles: list, comparison: Any) -> dict[str, Any]:
    """The manifest's ``profiles``, ``comparison`` and ``warnings``."""
    pairs = _per_target(recipe, profiles)
    return {
        "profiles": [{"artifact": t.artifact, "file": f"profiles/{profile_filename(p.label)}",
                      "runtime": p.runtime.name, "providers": p.runtime.providers,
                      "stats": p.stats.model_dump() if hasattr(p.stats, "model_dump") else p.stats}
                     for t, p in pairs],
        "comparison": json.loads(comparison.to_json()),
        # a target profiled at several batch sizes is set against its parent at the first
        "warnings": slower_than_parent(recipe, *map(list, zip(*_first_per_target(pairs)))) if pairs else [],
    }


def _per_target(recipe: Recipe, profiles: list) -> list[tuple[Any, Any]]:
    """(target, profile) pairs in order: a decoder profiled at a list of batch sizes has one profile per size."""
    spec = recipe.profile
    sizes = len(spec.batch) if spec is not None and isinstance(spec.batch, list) else 1
    pairs, at = [], 0
    for target in recipe.profile_targets():
        if at >= len(profiles):
            break
        batched = profiles[at].generation is not None and profiles[at].generation.batched is not None
        count = sizes if batched else 1
        pairs += [(target, p) for p in profiles[at:at + count]]
        at += count
    return pairs


def _first_per_target(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    seen: dict[str, tuple[Any, Any]] = {}
    for target, prof in pairs:
        seen.setdefault(target.artifact, (target, prof))
    return list(seen.values())


def slower_than_parent(recipe: Recipe, targets: list, profiles: list) -> list[str]:
    """"Compressed but not faster": flag each profiled artifact slower than the nearest profiled ancestor."""
    from edgesmith.stats import bootstrap_speedup, verdict_of

    order = recipe.artifact_ids()
    by_id = {t.artifact: p for t, p in zip(targets, profiles)}
    warnings = []
    for art_id, prof in by_id.items():
        ancestors = [a for a in order[:order.index(art_id)] if a in by_id]
        if not ancestors:
            continue
        parent = by_id[ancestors[-1]]
        if parent.is_generation and prof.is_generation:
            from edgesmith.profiling import generation_slowdowns

            slower = generation_slowdowns(parent, prof)
            if slower:
                warnings.append(f"{prof.label} is slower than its parent {parent.label}: {'; '.join(slower)} "
                                "(compressed but not faster)")
            continue
        if (parent.shapes.batch, parent.shapes.seq) != (prof.shapes.batch, prof.shapes.seq):
            continue
        speedup, low, high = bootstrap_speedup(parent.latencies_ms, prof.latencies_ms)
        if verdict_of(low, high) == "slower":
            warnings.append(f"{prof.label} is slower than its parent {parent.label}: {speedup:.2f}x "
                            f"[{low:.2f}-{high:.2f}] (compressed but not faster)")
    return warnings


def profile_filename(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label).strip("_") + ".json"


def precision_of(art: Artifact, runtime: str | None = None) -> str:
    """The precision a profile's label names: the artifact's, or a GGUF source's main quant on llama.cpp."""
    from edgesmith.runtimes.base import get_runtime

    if art.kind in ("onnx", "tensorrt", "early-exit"):
        return str(art.meta.get("precision", "fp32")).removesuffix("-dynamic")
    if art.kind == "gguf":
        return str((art.meta.get("gguf_export") or {}).get("quant", "gguf"))
    summary = (art.meta.get("gguf") or {}).get("quant_summary") or {}
    if summary and runtime is not None and "gguf" in get_runtime(runtime).decoder_kinds:
        # a model read from a GGUF runs its original file on a runtime of GGUF files (llama.cpp)
        return max(summary, key=lambda kind: summary[kind]).lower()
    return "fp32"
