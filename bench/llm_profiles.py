"""Decoder benchmark results as edgesmith generation Profiles, so ``edgesmith compare`` reads them.

Each measured contender of an ``llm_peers`` / ``llm_backends`` document becomes one Profile
(``edgesmith.profiling.generation_profile``, kind ``generation``): TTFT per prompt length and round,
the per-token decode latencies of each round at the first prompt length, load time and the worker's
peak RSS, the environment from the run's machine record. Written beside the results:

    profiles/bench-llm/<stem>/<key>.json        # edgesmith compare profiles/bench-llm/llm_peers/*.json
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.llm_profiles")

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles" / "bench-llm"
#: the artifact kind a contender's family ships
KINDS = {"llama.cpp": "gguf", "pytorch": "torch", "onnxruntime-genai": "genai-folder", "optimum": "onnx",
         "edgesmith": "onnx"}
WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".safetensors", ".gguf", ".data")


def artifact_hash(path: Path) -> str:
    """sha256 over the weight files (their names and contents): the artifact's identity."""
    from edgesmith.storage import sha256_file, sha256_json

    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return sha256_json({f.name: sha256_file(f) for f in files})


def environment(rec: dict[str, Any], threads: int):
    """The Environment of a machine record (``bench.core.machine``); None for a record too old to hold one."""
    from edgesmith.profiling.environment import Environment

    keys = ("cpu_model", "cores", "os", "kernel", "python", "libraries")
    if not all(k in rec for k in keys):
        return None
    return Environment(cpu_model=rec["cpu_model"], cores=rec["cores"], threads=threads, os=rec["os"],
                       kernel=rec["kernel"], machine=rec.get("arch") or "unknown", python=rec["python"],
                       libraries=rec["libraries"])


def contender_profile(key: str, res: dict[str, Any], settings: dict[str, Any], model_path: str | None, env):
    """One contender's generation Profile, or None when it has no complete rounds."""
    from edgesmith.profiling import ArtifactInfo, RuntimeInfo
    from edgesmith.profiling.generation import generation_profile

    runs = res.get("runs") or {}
    lengths = [str(n) for n in settings["lengths"]]
    if res.get("status") != "ok" or not all(runs.get(n) for n in lengths):
        return None
    count = min(len(runs[n]) for n in lengths)
    path = Path(model_path) if model_path else None
    info = res.get("info") or {}
    artifact = ArtifactInfo(name=key, kind=KINDS.get(res.get("family", ""), "unknown"),
                            hash=artifact_hash(path) if path and path.exists() else "unknown",
                            size_bytes=int(res.get("size_bytes") or 0), task="text-generation")
    providers = info.get("providers") or [info.get("provider") or "CPU"]
    runtime = RuntimeInfo(name=str(info.get("runtime") or res.get("family")), providers=[str(p) for p in providers],
                          options={"threads": settings["threads"], "mode": res.get("mode"), "worker": res.get("worker")})
    prof = generation_profile(
        label=res.get("label", key), artifact=artifact, runtime=runtime, threads=settings["threads"], batch=1,
        new_tokens=settings["new_tokens"], warmup=1,
        ttft_ms={int(n): [r["ttft_ms"] for r in runs[n][:count]] for n in lengths},
        decode_ms=[r["token_ms"] for r in runs[lengths[0]][:count]], load_s=float(res.get("load_s") or 0.0),
        peak_rss_mb=res.get("peak_rss_mb"), rss_source="VmHWM of the contender's worker process")
    if env is not None:
        prof.environment = env
    return prof


def write_profiles(doc: dict[str, Any], stem: str, folder: Path = PROFILES) -> list[Path]:
    """One Profile per measured contender of ``doc`` under ``folder/stem``; paths written."""
    env = environment(doc.get("machine") or {}, doc["settings"]["threads"])
    out = []
    for key, res in doc["contenders"].items():
        prof = contender_profile(key, res, doc["settings"], (doc.get("models") or {}).get(key), env)
        if prof is not None:
            out.append(prof.save(folder / stem / f"{key}.json"))
    log.info("wrote %d generation profiles under %s", len(out), folder / stem)
    return out
