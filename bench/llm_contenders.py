"""The decoder contenders, one table entry each: what its worker loads and how that is made once.

A contender is a worker module (``bench/llm_peer_*.py``: a ``Backend`` — info / generate / logits —
behind ``llm_worker.main``, run by the venv its users have) plus one :class:`Contender` entry in
:data:`TABLE`: key, label, family, worker script, venv, and ``make(sources) -> path``, the file or
folder the worker's ``--model`` gets (built once under the cache). ``llm_peers.specs`` turns the
entries into worker processes; nothing else names a key.

Adding a contender: write ``bench/llm_peer_x.py`` (or reuse a worker: every ORT GenAI folder runs in
``llm_peer_ortgenai.py``, every edgesmith ONNX decoder folder in ``llm_peer_edgesmith.py``, every GGUF
in ``llm_peer_llamacpp.py``) and add one entry here — or, for a folder that already exists, no code at
all: ``--folder KEY=RUNTIME:PATH[=LABEL]`` on ``llm_peers.py`` / ``llm_backends.py`` (:func:`folder_contender`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import llamacpp_env, llm_sources, optimum_env

BENCH = Path(__file__).resolve().parent
#: the venvs a worker can run in: its interpreter, found when the run starts
VENVS: dict[str, Callable[[], Path]] = {"edgesmith": lambda: Path(sys.executable), "llamacpp": llamacpp_env.python,
                                        "optimum": optimum_env.python}
#: the worker module of each runtime a prebuilt folder (or file) can be given to
FOLDER_WORKERS = {"edgesmith": ("llm_peer_edgesmith.py", "edgesmith", "edgesmith"),
                  "ortgenai": ("llm_peer_ortgenai.py", "edgesmith", "onnxruntime-genai"),
                  "llamacpp": ("llm_peer_llamacpp.py", "llamacpp", "llama.cpp"),
                  "torch": ("llm_peer_torch.py", "edgesmith", "pytorch")}


class Sources:
    """The inputs every contender is made from, made once (lazily) under ``cache``; ``made`` records
    what was built in this run, ``versions`` the foreign venvs' versions."""

    def __init__(self, cache: Path = llm_sources.CACHE, threads: int = 2, **options: Any) -> None:
        self.cache, self.threads, self.options = cache, threads, options
        self.made: dict[str, Any] = {}
        self.versions: dict[str, Any] = {}
        self.notes: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self._fp32: Path | None = None

    def fp32_folder(self) -> Path:
        if self._fp32 is None:
            self._fp32 = llm_sources.fp32_folder(cache=self.cache)
        return self._fp32

    def venv(self, name: str) -> None:
        """Make sure a foreign venv exists (built once) and record its versions."""
        if name == "llamacpp" and "llamacpp" not in self.versions:
            self.versions["llamacpp"] = llamacpp_env.ensure()
        elif name == "optimum" and "optimum" not in self.versions:
            self.versions["optimum"] = optimum_env.ensure()

    def record(self) -> dict[str, Any]:
        return {"gguf_q4_1": str(llm_sources.smollm2_gguf()), "fp32_folder": str(self.fp32_folder()),
                "made": self.made}


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    family: str
    script: str  # the worker module in bench/
    venv: str  # a VENVS key
    make: Callable[[Sources], Path]
    mode: str | None = None  # a worker serving two modes of one model (PyTorch's loop and generate)
    worker: str | None = None  # contenders naming the same worker share one process; default: the key
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# How each family's artifact is made
# ---------------------------------------------------------------------------------------------


def _fp32(src: Sources) -> Path:
    return src.fp32_folder()


def _gguf(qtype: str) -> Callable[[Sources], Path]:
    """The shipped Q4_1 GGUF, or llama.cpp's own quantizer's ``qtype`` from the dequantized F32 GGUF."""
    def make(src: Sources) -> Path:
        src.venv("llamacpp")
        if qtype == "q4_1":
            return llm_sources.smollm2_gguf()
        f32 = llm_sources.f32_gguf(cache=src.cache)
        dst = src.cache / f"smollm2-{qtype}.gguf"
        if not dst.exists():
            done = subprocess.run([str(llamacpp_env.python()), str(BENCH / "llm_peer_llamacpp.py"), "quantize",
                                   str(f32), str(dst), "--type", qtype, "--threads", str(src.threads)],
                                  capture_output=True, text=True, check=False, cwd=BENCH)
            if done.returncode != 0:
                raise RuntimeError(f"llama.cpp quantize {qtype}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            src.made[f"llamacpp-{qtype}"] = json.loads(done.stdout.strip().splitlines()[-1])
        return dst
    return make


def genai_builder(fp32_folder: str | Path, out: str | Path, *, precision: str = "int4", timeout: int = 1800) -> dict:
    """What a GenAI user runs, ``python -m onnxruntime_genai.models.builder -i <fp32> -o <out> -p int4
    -e cpu`` with its defaults, into ``out`` (skipped when ``out/genai_config.json`` exists)."""
    out = Path(out)
    if (out / "genai_config.json").exists():
        return {"folder": str(out), "seconds": None, "cached": True}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(fp32_folder), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + ".build-cache"))]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.build.log").write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or not (out / "genai_config.json").exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ORT GenAI builder failed (exit {done.returncode}): {tail[:300]}")
    return {"folder": str(out), "seconds": seconds, "cached": False, "command": " ".join(cmd[1:])}


def _builder_int4(src: Sources) -> Path:
    return Path(genai_builder(src.fp32_folder(), src.cache / "ortgenai-int4")["folder"])


def _optimum_export(src: Sources) -> Path:
    """Optimum's ORTModelForCausalLM export in its venv; a failed export makes the row a failed row."""
    src.venv("optimum")
    out = src.cache / "optimum-fp32"
    done = subprocess.run([str(optimum_env.python()), str(BENCH / "llm_peer_optimum.py"), "export",
                           str(src.fp32_folder()), str(out)], capture_output=True, text=True, check=False, cwd=BENCH,
                          timeout=3600)
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        export = json.loads(last)
    except json.JSONDecodeError:
        export = {"ok": False}
    if done.returncode != 0 or not export.get("ok"):
        export = {"ok": False, "error": export.get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]}
        src.errors["optimum-fp32"] = f"export failed: {export['error']}"
    src.made["optimum_export"] = export
    notes = src.notes.setdefault("optimum-fp32", [])
    for change in export.get("config_changes") or []:
        notes.append(f"exported from a copy of the FP32 config with {change}: transformers 4.57 (optimum-onnx's pin) "
                     "does not read transformers 5's `rope_parameters` and would silently export rope_theta 10000")
    if export.get("ok"):
        notes.append(f"export {export.get('export_s', 0):.0f} s; logits max |diff| "
                     f"{export.get('max_abs_logit_diff', float('nan')):.1e} vs transformers 4.57, greedy "
                     f"{'equal' if export.get('greedy_equal') else 'different'}; one model.onnx with the tied "
                     "embedding stored twice (Optimum's weight deduplication needs accelerate)")
    return out


def _edgesmith(key: str) -> Callable[[Sources], Path]:
    """An edgesmith decoder folder of ``llm_backends.build`` (export backend + exact GGUF repack)."""
    def make(src: Sources) -> Path:
        from bench import llm_backends

        folders = llm_backends.build([key], src.options.get("backends_dir") or src.cache / "backends",
                                     dynamo_fp32=src.options.get("dynamo_fp32"), fp32_folder=src.fp32_folder())
        return Path(folders[key])
    return make


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_ENTRIES = [
    Contender("torch-fp32", "PyTorch FP32 eager (KV-cache greedy loop)", "pytorch", "llm_peer_torch.py", "edgesmith",
              _fp32, mode="loop", worker="torch"),
    Contender("torch-fp32-generate", "PyTorch FP32 eager (HF generate)", "pytorch", "llm_peer_torch.py", "edgesmith",
              _fp32, mode="generate", worker="torch"),
    Contender("llamacpp-q4_1", "llama.cpp Q4_1 (the shipped file)", "llama.cpp", "llm_peer_llamacpp.py", "llamacpp",
              _gguf("q4_1")),
    Contender("llamacpp-q8_0", "llama.cpp Q8_0 (llama.cpp's quantizer, from F32)", "llama.cpp",
              "llm_peer_llamacpp.py", "llamacpp", _gguf("q8_0")),
    Contender("llamacpp-q4_k_m", "llama.cpp Q4_K_M (llama.cpp's quantizer, from F32)", "llama.cpp",
              "llm_peer_llamacpp.py", "llamacpp", _gguf("q4_k_m")),
    Contender("ortgenai-int4", "ORT GenAI builder INT4 (defaults)", "onnxruntime-genai", "llm_peer_ortgenai.py",
              "edgesmith", _builder_int4),
    Contender("optimum-fp32", "Optimum ORTModelForCausalLM FP32", "optimum", "llm_peer_optimum.py", "optimum",
              _optimum_export),
    # edgesmith's own decoder folders, in edgesmith's OrtDecoderSession loop (bench/llm_backends.py)
    Contender("dynamo-gguf", "edgesmith dynamo export + exact GGUF repack (Q4_1 blocks, Q8_0 head)", "edgesmith",
              "llm_peer_edgesmith.py", "edgesmith", _edgesmith("dynamo-gguf")),
    Contender("genai-gguf", "edgesmith genai backend + exact GGUF repack (q/k/v unfused)", "edgesmith",
              "llm_peer_edgesmith.py", "edgesmith", _edgesmith("genai-gguf")),
    Contender("genai-gguf-fused", "genai backend, q/k/v + gate/up fused, exact repack (prototype matcher)",
              "edgesmith", "llm_peer_edgesmith.py", "edgesmith", _edgesmith("genai-gguf-fused")),
    Contender("builder-int4", "ORT GenAI builder INT4 RTN (not exact), edgesmith loop", "edgesmith",
              "llm_peer_edgesmith.py", "edgesmith", _builder_int4),
    Contender("dynamo-fp32", "edgesmith dynamo export FP32", "edgesmith", "llm_peer_edgesmith.py", "edgesmith",
              _edgesmith("dynamo-fp32")),
    Contender("genai-fp32", "edgesmith genai backend FP32", "edgesmith", "llm_peer_edgesmith.py", "edgesmith",
              _edgesmith("genai-fp32")),
]
TABLE: dict[str, Contender] = {c.key: c for c in _ENTRIES}


def folder_contender(spec: str) -> Contender:
    """``KEY=RUNTIME:PATH[=LABEL]`` (or ``KEY=PATH[=LABEL]``: an edgesmith ONNX decoder folder) as a
    contender whose artifact already exists; RUNTIME is one of :data:`FOLDER_WORKERS`."""
    key, sep, rest = spec.partition("=")
    if not sep or not key or not rest:
        raise SystemExit(f"--folder {spec!r}: expected KEY=RUNTIME:PATH[=LABEL], e.g. mine=ortgenai:/path/to/folder")
    where, _, label = rest.partition("=")
    runtime, colon, path = where.partition(":")
    if not colon or runtime not in FOLDER_WORKERS:
        runtime, path = "edgesmith", where
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise SystemExit(f"--folder {spec!r}: {folder} does not exist")
    if key in TABLE:
        raise SystemExit(f"--folder {spec!r}: {key} is a contender of the table already; give another key")
    script, venv, family = FOLDER_WORKERS[runtime]
    return Contender(key, label or f"{key} ({runtime}: {folder.name})", family, script, venv, lambda src: folder)


def check_keys(keys: list[str], extra: dict[str, Contender] | None = None) -> None:
    unknown = [k for k in keys if k not in TABLE and k not in (extra or {})]
    if unknown:
        raise SystemExit(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(TABLE)}")
