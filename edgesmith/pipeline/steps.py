"""Running a run's steps: each one computed under its cache key (or reused from the cache, or waited
for while another process computes it), then materialised into the run folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from edgesmith.artifacts import Artifact, load
from edgesmith.cache import StepCache
from edgesmith.faults import point
from edgesmith.passes import Context
from edgesmith.pipeline.planning import PlannedStep
from edgesmith.pipeline.run_folder import RunState
from edgesmith.storage import atomic_dir, link_or_copy_tree, sha256_json


def run_steps(steps: list[PlannedStep], source: Artifact, ctx: Context, data_hash: str, cache: StepCache,
              state: RunState, console: Console) -> tuple[dict[str, Artifact], list[dict]]:
    """({step id: artifact}, one record per step), the source included under its id by the caller."""
    source_hash = source.content_hash()
    artifacts: dict[str, Artifact] = {}
    records: list[dict] = []
    current = source
    for i, step in enumerate(steps, 1):
        config_json = step.config.key_dump()
        extra = dict(step.pass_cls.environment_key())
        files = referenced_files_key(config_json)
        if files:
            extra["files"] = files  # a data or teacher file edited in place must not reuse a stale step
        if "data" in step.pass_cls.uses:
            extra["data"] = data_hash
        if "source" in step.pass_cls.uses:
            extra["source"] = source_hash
        input_hash = current.content_hash()
        key = cache.key(input_hash, step.pass_cls.name, config_json, extra)
        label = f"[{i}/{len(steps)}] {step.id}"
        state.set("running", step=step.id, index=i, cache_key=key)
        t0 = time.perf_counter()
        out, cached = _computed_or_cached(step, current, ctx, cache, key, label, console)
        artifacts[step.id] = out
        entry = out.lineage[-1] if out.lineage else {}
        records.append({
            "id": step.id, "pass": step.pass_cls.name, "config": config_json, "cache_key": key, "cached": cached,
            "seconds": round(time.perf_counter() - t0, 3), "pass_seconds": entry.get("seconds"),
            "input_hash": input_hash, "output_hash": out.content_hash(), "kind": out.kind,
            "report": entry.get("report", {}),
        })
        current = out
    return artifacts, records


def _computed_or_cached(step: PlannedStep, current: Artifact, ctx: Context, cache: StepCache, key: str, label: str,
                        console: Console) -> tuple[Artifact, bool]:
    """The step's output, loaded back from the cache, and whether it was there already."""
    t0 = time.perf_counter()

    def waiting() -> None:
        console.print(f"{label}: another edgesmith process is computing this step; waiting for it "
                      f"({cache.lock_path(key)})", soft_wrap=True)

    with cache.lock(key, on_wait=waiting):
        if cache.usable(key, label=step.id):
            console.print(f"{label}: reused from cache ({key[:12]})")
            return load(cache.path(key)), True
        point(f"step:{step.id}:start")
        ctx.workdir = cache.scratch(key)
        try:
            with console.status(f"{label}: {step.pass_cls.name} …"):
                out = step.pass_cls(step.config)(current, ctx)
            point(f"step:{step.id}:computed")
            cache.store(key, out)
        finally:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
        point(f"step:{step.id}:stored")
        out = load(cache.path(key))
        console.print(f"{label}: done in {time.perf_counter() - t0:.1f}s")
        return out, False


def materialise(records: list[dict], cache: StepCache, run_dir: Path, state: RunState) -> dict[str, str]:
    """Each step's cached folder linked (or copied) into ``run_dir/artifacts/<id>``; {id: folder}."""
    folders = {}
    for record in records:
        dest = run_dir / "artifacts" / record["id"]
        state.check()
        with atomic_dir(dest) as tmp:
            link_or_copy_tree(cache.path(record["cache_key"]), tmp)
        folders[record["id"]] = str(dest)
    return folders


def referenced_files_key(config: Any) -> dict[str, str]:
    """Content hashes of the local files and folders a step's options name (data, calibration, teacher)."""
    from edgesmith.storage import sha256_file

    found: dict[str, str] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value and not value.startswith("builtin:") and len(value) < 4096:
            path = Path(value).expanduser()
            try:
                if path.is_file():
                    found[value] = sha256_file(path)
                elif path.is_dir():
                    found[value] = sha256_json({str(f.relative_to(path)): sha256_file(f)
                                                for f in sorted(path.rglob("*")) if f.is_file()})
            except OSError:
                return

    visit(config)
    return found
