"""The Optimum side of the benchmark. Runs INSIDE bench/.venv-optimum; never imports edgesmith.

Two commands, each writing JSON to stdout's last line and files to a folder:

``produce MODEL OUT``: what a Hugging Face Optimum user does to make MiniLM fast on a CPU —
export with optimum-onnx (``ORTModelForFeatureExtraction.from_pretrained(export=True)``), optimize
with ``ORTOptimizer`` at O2, quantize dynamic INT8 with ``ORTQuantizer`` and the
``AutoQuantizationConfig`` that fits this CPU (from /proc/cpuinfo flags). Each variant lands in its
own folder with its wall time; a step that fails is recorded with its error message, and the
dynamic quantization then falls back to the plain export (what a user would do next).

``interop FOLDER FEEDS OUT``: load an ONNX folder (edgesmith's export) with
``ORTModelForFeatureExtraction`` and save its ``last_hidden_state`` on the feeds in ``FEEDS`` (npz).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def quantization_config(per_channel: bool):
    """Optimum's dynamic INT8 config for this CPU: avx512_vnni > avx512 > avx2 > arm64."""
    import platform

    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64", AutoQuantizationConfig.arm64(is_static=False, per_channel=per_channel)
    if "avx512_vnni" in flags:
        return "avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel)
    if "avx512f" in flags:
        return "avx512", AutoQuantizationConfig.avx512(is_static=False, per_channel=per_channel)
    return "avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=per_channel)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".strip()


def _keep_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES + ("config.json",):
        if (src / name).exists() and not (dest / name).exists():
            shutil.copy2(src / name, dest / name)


def produce(model_dir: Path, out: Path) -> dict:
    """Export, O2-optimize and dynamically quantize ``model_dir``; record files, seconds and errors."""
    import optimum.onnxruntime as ort_optimum
    from optimum.onnxruntime import (
        ORTModelForFeatureExtraction,
        ORTOptimizer,
        ORTQuantizer,
    )
    from optimum.onnxruntime.configuration import AutoOptimizationConfig
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"variants": {}, "errors": {}, "optimum_module": ort_optimum.__name__}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    export_dir = out / "export"
    t0 = time.perf_counter()
    model = ORTModelForFeatureExtraction.from_pretrained(str(model_dir), export=True)
    model.save_pretrained(str(export_dir))
    tokenizer.save_pretrained(str(export_dir))
    export_s = time.perf_counter() - t0
    result["variants"]["fp32"] = {"folder": str(export_dir), "file": "model.onnx", "seconds": export_s,
                                  "steps": ["export"]}

    o2_dir = out / "o2"
    try:
        t0 = time.perf_counter()
        optimizer = ORTOptimizer.from_pretrained(model)
        optimizer.optimize(save_dir=str(o2_dir), optimization_config=AutoOptimizationConfig.O2())
        _keep_tokenizer(export_dir, o2_dir)
        result["variants"]["o2"] = {"folder": str(o2_dir), "file": "model_optimized.onnx",
                                    "seconds": export_s + time.perf_counter() - t0, "steps": ["export", "O2"]}
    except Exception as exc:
        result["errors"]["o2"] = _error(exc)
        traceback.print_exc(file=sys.stderr)

    isa, qconfig = quantization_config(per_channel=True)
    result["quantization_config"] = {"isa": isa, "per_channel": True, "is_static": False}
    bases = [("o2", "model_optimized.onnx")] if "o2" in result["variants"] else []
    bases.append(("fp32", "model.onnx"))
    for base, file_name in bases:
        q_dir = out / f"int8-{base}"
        try:
            t0 = time.perf_counter()
            quantizer = ORTQuantizer.from_pretrained(result["variants"][base]["folder"], file_name=file_name)
            quantizer.quantize(save_dir=str(q_dir), quantization_config=qconfig)
            _keep_tokenizer(export_dir, q_dir)
            produced = sorted(p.name for p in q_dir.glob("*quantized*.onnx"))
            if not produced:
                raise RuntimeError(f"ORTQuantizer wrote no *quantized*.onnx into {q_dir}")
            result["variants"][f"int8-{base}"] = {
                "folder": str(q_dir), "file": produced[0],
                "seconds": result["variants"][base]["seconds"] + time.perf_counter() - t0,
                "steps": result["variants"][base]["steps"] + [f"dynamic INT8 ({isa}, per-channel)"]}
            break  # quantized the best graph that quantizes; the plain export is only the fallback
        except Exception as exc:
            result["errors"][f"int8-{base}"] = _error(exc)
            traceback.print_exc(file=sys.stderr)
    return result


def interop(folder: Path, feeds_path: Path, out: Path) -> dict:
    """Run ``folder`` through ORTModelForFeatureExtraction on saved feeds; save last_hidden_state."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    t0 = time.perf_counter()
    model = ORTModelForFeatureExtraction.from_pretrained(str(folder), file_name="model.onnx")
    load_s = time.perf_counter() - t0
    feeds = dict(np.load(feeds_path))
    with torch.inference_mode():
        output = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    hidden = output.last_hidden_state
    hidden = hidden.numpy() if hasattr(hidden, "numpy") else np.asarray(hidden)
    np.save(out, hidden)
    return {"class": type(model).__name__, "load_seconds": load_s, "shape": list(hidden.shape),
            "providers": list(model.providers) if hasattr(model, "providers") else None}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "produce":
        result = produce(Path(argv[1]), Path(argv[2]))
    elif len(argv) >= 4 and argv[0] == "interop":
        result = interop(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    else:
        print("usage: optimum_side.py produce MODEL_DIR OUT_DIR | interop ONNX_FOLDER FEEDS.npz OUT.npy",
              file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
