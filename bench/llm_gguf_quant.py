"""Making SmolLM2's fast-format GGUFs (issue 23): ``gguf-quantize`` by method, format and steps.

Each spec ``LABEL:FORMAT:METHOD[:STEPS[:KEEP_Q8]]`` runs the pass on the FP32 source (the packaged
Q4_1 file dequantized) exactly as ``edgesmith quantize smollm2 --to gguf ...`` would, records how long
it took on this machine (with the load average), its verdict in llama.cpp (KL, top-1, perplexity on
the held-out passages against the FP32 source), the validation KL curve of quantization-aware
training, the per-tensor sensitivity ranking, and keeps the file in ``bench/.cache/gguf-quant/LABEL.gguf``
for ``bench/llm_gguf.py --variant LABEL=...`` to time beside the shipped file.

    .venv/bin/python bench/llm_gguf_quant.py gptq:q4_0:gptq qat200:q4_0:qat:200 iq4-gptq:iq4_nl:gptq

Method ``imatrix`` is the anchor: llama.cpp's own ``llama-imatrix`` on the same calibration text
(corpus sentences 0-1,999 as one text file) and ``llama-quantize --imatrix`` from an F32 GGUF, with
the tools built from the llama.cpp that llama-cpp-python vendors (bench/llamacpp_tools.py).

Appends to bench/results/llm_gguf_quant.json (one entry per spec; a label run again is replaced) and
renders bench/results/llm_gguf_quant.md from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports
from bench.core import machine, results

OUT = HERE / ".cache" / "gguf-quant"
RESULTS = HERE / "results" / "llm_gguf_quant.json"


def _load() -> float:
    return machine.load_average()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="LABEL:FORMAT:METHOD[:STEPS[:KEEP_Q8]]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--calibration", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import edgesmith as es
    from edgesmith.compress import quantize_gguf
    from edgesmith.passes import Context

    source = es.load("smollm2")
    OUT.mkdir(parents=True, exist_ok=True)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for spec in args.specs:
        parts = spec.split(":")
        label, fmt, method = parts[:3]
        steps = int(parts[3]) if len(parts) > 3 else 200
        keep = int(parts[4]) if len(parts) > 4 else 0
        load_start, t0 = _load(), time.perf_counter()
        target = OUT / f"{label}.gguf"
        if method == "imatrix":
            report = llamacpp_imatrix(source, fmt, target, threads=args.threads)
        else:
            options = {"steps": steps, "lr": args.lr} if method == "qat" else {}
            out = quantize_gguf(source, Context(progress=sys.stderr.isatty()), format=fmt, method=method,
                                keep_q8=keep, calibration=args.calibration, threads=args.threads, **options)
            report = out.lineage[-1]["report"]
            shutil.copyfile(out.path, target)
        seconds = time.perf_counter() - t0
        entry = {"label": label, "spec": spec, "learn_scales": False, "format": fmt, "method": method, "steps": steps if method == "qat" else 0,
                 "keep_q8": keep, "lr": args.lr if method == "qat" else None, "seconds": round(seconds, 1),
                 "load_start": load_start, "load_end": _load(), "cpu_count": os.cpu_count(),
                 "machine": machine.finish(machine.record(args.threads)),
                 "file": str(target.relative_to(HERE.parent)), "size_mb": target.stat().st_size / 1e6,
                 **{k: report.get(k) for k in ("verdict", "q8_tensors", "sensitivity", "val_kl_before",
                                               "val_kl_after", "history", "train_seconds", "tensor_types")}}
        done = [d for d in done if d["label"] != label] + [entry]
        results.write(RESULTS, done, render)  # a list of runs, one entry per label
        v = report["verdict"]
        print(f"{label}: {fmt} {method} steps {entry['steps']} keep_q8 {keep}: KL {v['kld']:.4f} top-1 {v['top1']:.3f} "
              f"ppl {v['perplexity']:.1f} in {seconds:.0f} s (load {load_start:.1f} -> {entry['load_end']:.1f})",
              flush=True)


def llamacpp_imatrix(source, fmt: str, target: Path, *, threads: int) -> dict:
    """llama.cpp's best for ``fmt``: llama-imatrix on the calibration text, llama-quantize --imatrix."""
    import subprocess
    import tempfile

    from bench.llamacpp_tools import ensure
    from edgesmith.artifacts import GgufModel
    from edgesmith.gguf.writer import write_gguf
    from edgesmith.lm_quality import calibration_texts, gguf_logits, lm_fidelity

    tools = ensure()
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_gguf(source.module, source.tokenizer, f32, quant="f32", name="smollm2",
                   origin=source.meta["gguf"]["path"])
        text = Path(tmp) / "calibration.txt"
        text.write_text(" ".join(calibration_texts(2000, 0)))
        imatrix = Path(tmp) / "imatrix.gguf"
        subprocess.run([tools["llama-imatrix"], "-m", str(f32), "-f", str(text), "-o", str(imatrix), "-c", "128",
                        "-t", str(threads), "--no-ppl"], check=True, capture_output=True)
        subprocess.run([tools["llama-quantize"], "--imatrix", str(imatrix), str(f32), str(target), fmt.upper(),
                        str(threads)], check=True, capture_output=True)
    folder = target.parent / target.stem
    folder.mkdir(exist_ok=True)
    (folder / "model.gguf").unlink(missing_ok=True)
    (folder / "model.gguf").symlink_to(target.resolve())
    fn, where = gguf_logits(GgufModel(task="text-generation", name=target.stem, folder=folder), "llamacpp",
                            threads=threads)
    verdict = {**lm_fidelity(fn, source, tokenizer=source.tokenizer), "measured_in": where}
    from edgesmith.gguf.file import open_gguf

    types: dict[str, int] = {}
    for t in open_gguf(target).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"verdict": verdict, "tensor_types": types}


def _cpu() -> str:
    name, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
        if line.startswith("model name") and name == "unknown CPU":
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa)})"


def render(entries: list[dict]) -> str:
    lines = [
        "# Making the fast-format GGUFs: gguf-quantize on SmolLM2-135M (issue 23)",
        "",
        "Command: `.venv/bin/python bench/llm_gguf_quant.py "
        + " ".join(e.get("spec") or f"{e['label']}:{e['format']}:{e['method']}" for e in entries) + "`",
        "",
        f"Machine: {_cpu()}, {entries[0]['cpu_count']} cores, threads 2. Each row is one run of the pass as "
        "`edgesmith quantize smollm2 --to gguf --format F --method M` runs it (64 calibration passages of ~128 "
        "tokens; QAT batches of 4 x 128 tokens, AdamW, cosine schedule), timed end to end with its load average: "
        "a load above 2 means other jobs shared the 2 cores and the minutes are an upper bound. Verdict in "
        "llama.cpp against the FP32 source on the held-out passages (the shipped Q4_1 file: KL 0.0040, top-1 "
        "0.963). Speeds of these files against the shipped one: § GGUF in llama.cpp.",
        "",
        "| file | format | method | QAT steps | Q8_0 tensors | KL | top-1 | perplexity | val KL before → after QAT | "
        "size MB | minutes (load) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for e in entries:
        v = e["verdict"]
        curve = (f"{e['val_kl_before']:.4f} → {e['val_kl_after']:.4f}" if e.get("val_kl_before") is not None else "-")
        method = e["method"] + (" (+scales)" if e.get("learn_scales") else "")
        lines.append(f"| {e['label']} | {e['format']} | {method} | {e['steps'] or '-'} | {len(e['q8_tensors'] or [])}"
                     f" | {v['kld']:.4f} | {v['top1']:.3f} | {v['perplexity']:.1f} | {curve} | {e['size_mb']:.1f} | "
                     f"{e['seconds'] / 60:.1f} ({e['load_start']:.1f}→{e['load_end']:.1f}) |")
    lines += [f"- {e['label']}: {e['note']}" for e in entries if e.get("note")]
    sens = next((e["sensitivity"] for e in reversed(entries) if e.get("sensitivity")), None)
    if sens:
        lines += ["", "Costliest tensors alone in the 4-bit format (KL to FP32 on calibration text): "
                  + ", ".join(f"`{k}` {v:.4f}" for k, v in list(sens.items())[:8]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
