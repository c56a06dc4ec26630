"""Benchmark: SmolLM2-135M pruned (depth by angular blocks or by KL, FFN width), and how far logit
distillation recovers it within a CPU budget (not run in tests).

Phase ``prune``: every level in ``LEVELS`` is pruned from the FP32 model (``es.load("smollm2")``) by
the prune pass, whose report gives its held-out fidelity to the FP32 model (``edgesmith.lm_quality``:
KL of the next-token distributions, top-1 agreement, perplexity on 8 held-out corpus passages,
sentences 30,000 and up). Measured layer importance reads the first 64 corpus sentences.

Phase ``distill``: the chosen level is pruned again (deterministic) and distilled from the FP32
model with the distill pass's objective and training loop (``DistillObjective`` + ``train``:
logit KL at temperature 2, AdamW, constant learning rate) on passages of consecutive corpus
sentences from 1,000 to 30,000 (never the held-out slice) until ``--minutes`` of training wall time
have passed; every ``--eval-minutes`` the student's held-out KL / top-1 / perplexity is measured
(evaluation time is not counted as training time). The final student can be saved as a Hugging
Face folder (``--save``).

Phase ``render``: the Markdown table from the JSON results, with the speed estimate of llama.cpp
decode (bytes of weights read per token, from the shipped Q4_1 GGUF's tensor sizes).

    nice -n 5 .venv/bin/python bench/llm_recovery.py prune
    nice -n 5 .venv/bin/python bench/llm_recovery.py distill --level L8-angular --minutes 15
    .venv/bin/python bench/llm_recovery.py render
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, so `bench` imports

import edgesmith as es
from bench.core import machine as machine_record
from bench.core import results as results_io
from edgesmith.passes import Context

log = logging.getLogger("bench.llm_recovery")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "llm_recovery.json"
MARKDOWN = ROOT / "results" / "llm_recovery.md"
STUDENT = ROOT / "results-cache" / "smollm2-student"
LAYERS = 30

#: name -> prune options
LEVELS: dict[str, dict] = {
    "L4-angular": {"layers": 4 / LAYERS, "layer_importance": "angular", "layer_selection": "block"},
    "L4-kl": {"layers": 4 / LAYERS, "layer_importance": "kl", "layer_texts": 16},
    "L8-angular": {"layers": 8 / LAYERS, "layer_importance": "angular", "layer_selection": "block"},
    "L8-kl": {"layers": 8 / LAYERS, "layer_importance": "kl", "layer_texts": 16},
    "L8-kl-block": {"layers": 8 / LAYERS, "layer_importance": "kl", "layer_selection": "block", "layer_texts": 16},
    "L12-angular": {"layers": 12 / LAYERS, "layer_importance": "angular", "layer_selection": "block"},
    "L12-kl": {"layers": 12 / LAYERS, "layer_importance": "kl", "layer_texts": 16},
    "L8-weights": {"layers": 8 / LAYERS, "importance": "l2"},
    "FFN10": {"ffn": 0.10},
    "FFN25": {"ffn": 0.25},
    "FFN10-taylor": {"ffn": 0.10, "importance": "taylor"},
    "FFN25-taylor": {"ffn": 0.25, "importance": "taylor"},
    "L8-kl+FFN25": {"layers": 8 / LAYERS, "layer_importance": "kl", "ffn": 0.25, "layer_texts": 16},
}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"levels": {}, "recovery": {}}


def save_results(results: dict) -> None:
    results_io.write_text(RESULTS, json.dumps(results, indent=1))


def loadavg() -> float:
    return machine_record.load_average()[0]


def machine() -> dict:
    return machine_record.record(torch.get_num_threads())


def pruned(teacher, name: str):
    options = {**LEVELS[name], "check_latency": False}
    started = time.perf_counter()
    texts = None
    if options.get("importance") == "taylor":  # gradients of the LM loss on calibration sentences
        from edgesmith.lm_quality import calibration_texts

        texts = calibration_texts(64, 0)
    out = es.compress.prune(teacher, Context(texts=texts), **options)
    return out, time.perf_counter() - started


def reuse_kl(teacher, name: str, results: dict):
    """A ``kl`` level with individual selection from the per-layer KL scores another level of the
    same run measured (the pass would measure the same 30 scores again: minutes on a shared CPU):
    the layers of lowest KL are dropped as the pass's plan does, then the pass's own checks run."""
    import copy

    from edgesmith.architectures import arch_spec
    from edgesmith.compress.pruning.checks import lm_fidelity_report
    from edgesmith.compress.pruning.costs import count_params
    from edgesmith.compress.pruning.structured import drop_layers

    scores = next(e["layer_scores"] for e in results["levels"].values()
                  if e["options"].get("layer_importance") == "kl" and e["options"].get("layer_selection") != "block")
    drop = round(LEVELS[name]["layers"] * LAYERS)
    order = sorted(range(LAYERS), key=lambda i: (scores[i], i))
    keep = sorted(set(range(LAYERS)) - set(order[:drop]))
    started = time.perf_counter()
    module = copy.deepcopy(teacher.module)
    drop_layers(module, arch_spec(module), keep)
    out = teacher.derive(module=module)
    report = {"params_after": count_params(module), "params_before": count_params(teacher.module),
              "layers_kept": keep, "ffn_after": [1536], "layer_scores": scores,
              **lm_fidelity_report(teacher, out)}
    return report, time.perf_counter() - started


def phase_prune(args: argparse.Namespace) -> None:
    teacher = es.load("smollm2")
    for name in args.levels or list(LEVELS):
        results = load_results()
        load = loadavg()
        if name in args.reuse_kl:
            report, seconds = reuse_kl(teacher, name, results)
        else:
            out, seconds = pruned(teacher, name)
            report = out.lineage[-1]["report"]
        entry = {"options": LEVELS[name], "params": report["params_after"], "params_before": report["params_before"],
                 "layers_kept": report["layers_kept"], "ffn_after": sorted(set(report["ffn_after"])),
                 "kld": report["fidelity_kld"], "top1": report["fidelity_top1"],
                 "perplexity": report["fidelity_perplexity"], "perplexity_fp32": report["fidelity_perplexity_parent"],
                 "tokens": report["fidelity_tokens"], "layer_scores": report.get("layer_scores"),
                 "prune_seconds": round(seconds, 1), "load": load,
                 "measured_by": "stored KL scores" if name in args.reuse_kl else "prune pass"}
        results["levels"][name] = entry
        log.info("%s: kept %s, KL %.4f, top-1 %.4f, ppl %.2f (%.0f s, load %.2f)", name, entry["layers_kept"],
                 entry["kld"], entry["top1"], entry["perplexity"], seconds, load)
        results = {**load_results(), "levels": {**load_results()["levels"], name: entry}}
        save_results(results)
    results = load_results()
    results["prune_machine"] = machine()
    save_results(results)


def training_texts(start: int, end: int, chars: int) -> list[str]:
    """Consecutive corpus sentences ``[start, end)`` joined into passages of at least ``chars`` characters."""
    from edgesmith.lm_quality import HELDOUT_START, calibration_texts

    assert end <= HELDOUT_START
    out, current = [], []
    for text in calibration_texts(end - start, start):
        text = text.strip()
        current.append(text if text.endswith((".", "!", "?")) else text + ".")
        if sum(len(t) + 1 for t in current) >= chars:
            out.append(" ".join(current))
            current = []
    return out


def phase_distill(args: argparse.Namespace) -> None:
    from edgesmith.artifacts import TorchModel
    from edgesmith.compress.distillation import DistillObjective
    from edgesmith.lm_quality import Reference, heldout_batches, torch_logits
    from edgesmith.training import TextBatches, TrainSettings, train

    teacher = es.load("smollm2")
    student, _ = pruned(teacher, args.level)
    tokenizer = teacher.tokenizer
    batches = heldout_batches(tokenizer)
    reference = Reference.build(torch_logits(teacher), batches)
    texts = training_texts(1000, 30_000, args.chars)
    objective = DistillObjective(student.module, teacher.module.eval(), task="text-generation", losses={"kl": 1.0},
                                 temperature=args.temperature, layer_pairs=[], project=None,
                                 input_names=student.input_names)
    data = TextBatches(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length, seed=0,
                       input_names=objective.input_names)
    settings = TrainSettings(steps=1_000_000, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.0,
                             schedule="constant", precision="fp32", eval_every=1_000_000, checkpoint_every=None,
                             max_length=args.max_length)
    curve: list[dict] = []
    clock = {"train": 0.0, "since": time.perf_counter(), "next": 0.0}

    def evaluate_now(step: int) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        was = objective.training
        objective.eval()
        model = TorchModel(task="text-generation", name="student", module=objective.student, tokenizer=tokenizer)
        scores = reference.compare(torch_logits(model))
        objective.train(was)
        point = {"minutes": round(clock["train"] / 60, 2), "step": step, "texts": step * args.batch_size,
                 "kld": round(scores["kld"], 4), "top1": round(scores["top1"], 4),
                 "perplexity": round(scores["perplexity"], 2), "load": loadavg()}
        curve.append(point)
        log.info("%s step %d (%.1f min): KL %.4f top-1 %.4f ppl %.2f (load %.2f)", args.level, step,
                 point["minutes"], point["kld"], point["top1"], point["perplexity"], point["load"])
        clock["next"] = clock["train"] + args.eval_minutes * 60
        clock["since"] = time.perf_counter()

    class Budget(Exception):
        pass

    def on_step(step: int) -> None:
        elapsed = clock["train"] + time.perf_counter() - clock["since"]
        if elapsed >= clock["next"] or elapsed >= args.minutes * 60:
            evaluate_now(step)
            if clock["train"] >= args.minutes * 60:
                raise Budget

    load = loadavg()
    evaluate_now(0)
    try:
        train(objective, data, settings, evaluate=lambda _: 0.0, on_step=on_step, label="distill")
    except Budget:
        pass
    objective.eval()
    results = load_results()  # the prune phase may have written levels meanwhile
    results["recovery"][args.level] = {
        "curve": curve, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "temperature": args.temperature, "train_passages": len(texts), "eval_minutes": args.eval_minutes, "load_start": load, "load_end": loadavg(),
        "machine": machine()}
    save_results(results)
    if args.save:
        final = student.derive(module=objective.student.to("cpu").eval())
        folder = final.save(args.save)
        results["recovery"][args.level]["saved"] = str(Path(args.save).resolve().relative_to(ROOT.parent))
        save_results(results)
        log.info("student saved to %s", folder)


# ---------------------------------------------------------------------------------------------
# Speed estimate and Markdown
# ---------------------------------------------------------------------------------------------


def gguf_bytes() -> dict:
    """Bytes of one layer and of the tied token embedding / output head in the shipped Q4_1 GGUF."""
    import gguf

    from edgesmith.gguf.source import smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    layer = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.0."))
    ffn = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.0.ffn_") and "norm" not in t.name)
    head = sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    elements = sum(int(t.n_elements) for t in reader.tensors if t.name == "token_embd.weight")
    return {"layer": layer, "ffn": ffn, "head_q8_0": head, "head_q4_1": elements * 20 // 32}


def read_per_token(layers: int, ffn_kept: float, sizes: dict, head: str) -> float:
    per_layer = sizes["layer"] - sizes["ffn"] * (1 - ffn_kept)
    return layers * per_layer + sizes[head]


def render(args: argparse.Namespace) -> None:
    results = load_results()
    sizes = gguf_bytes()
    base = read_per_token(LAYERS, 1.0, sizes, "head_q8_0")
    prune_cmds = [f"    nice -n 5 .venv/bin/python bench/llm_recovery.py {c}"
                  for c in results.get("prune_commands", ["prune"])]
    lines = ["# Pruning SmolLM2-135M and recovering it by distillation", "",
             "Commands:", "",
             *prune_cmds,
             *[f"    nice -n 5 .venv/bin/python bench/llm_recovery.py distill --level {name} --minutes "
               f"{round(rec['curve'][-1]['minutes'])} --eval-minutes {rec.get('eval_minutes', 3.0):g} --lr {rec['lr']}"
               + (f" --save {rec['saved']}" if rec.get("saved") else "")
               for name, rec in results["recovery"].items()],
             "    .venv/bin/python bench/llm_recovery.py render --notes NOTES.md   # the conclusions below", "",
             "Fidelity to the FP32 model (`es.load(\"smollm2\")`) on 8 held-out corpus passages (sentences 30,000 "
             "and up, `edgesmith.lm_quality`): KL(FP32 ‖ pruned) of the next-token distributions (nats/token), "
             "top-1 agreement, perplexity. Layer importance is measured by the prune pass on the first corpus "
             "sentences (64 for `angular`, 16 for `kl`, which needs one forward pass per layer); levels marked * "
             "drop the layers of lowest KL from the per-layer KL scores an earlier `kl` level measured (the same "
             "30 numbers, not measured again). "
             "`est. speedup`: llama.cpp decode time taken as proportional to the bytes of weights read per "
             "token, with the shipped file's tensor types (Q4_1 layers, Q8_0 tied embedding/output head: "
             f"{sizes['layer'] / 1e6:.2f} MB per layer, {sizes['head_q8_0'] / 1e6:.1f} MB head, "
             f"{base / 1e6:.1f} MB per token for the original); `+Q4_1 head` also stores the head in Q4_1.", "",
             "## Before distillation", "",
             "| level | layers removed | FFN kept | params | KL | top-1 | perplexity | est. speedup | +Q4_1 head | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    levels = results["levels"]
    ppl = next(iter(levels.values()))["perplexity_fp32"] if levels else None
    lines.append(f"| FP32 source | - | 1536 | 134.5 M | 0 | 1 | {ppl:.2f} | 1.00x | "
                 f"{base / read_per_token(LAYERS, 1.0, sizes, 'head_q4_1'):.2f}x | - |" if ppl else "")
    for name, e in levels.items():
        removed = sorted(set(range(LAYERS)) - set(e["layers_kept"]))
        ffn = e["ffn_after"][0] if len(e["ffn_after"]) == 1 else "/".join(map(str, e["ffn_after"]))
        kept = (e["ffn_after"][0] / 1536) if len(e["ffn_after"]) == 1 else 1.0
        layers = len(e["layers_kept"])
        speed = base / read_per_token(layers, kept, sizes, "head_q8_0")
        speed_q4 = base / read_per_token(layers, kept, sizes, "head_q4_1")
        star = "*" if e.get("measured_by") == "stored KL scores" else ""
        lines.append(f"| {name}{star} | {','.join(map(str, removed)) or '-'} | {ffn} | {e['params'] / 1e6:.1f} M | "
                     f"{e['kld']:.3f} | {e['top1']:.3f} | {e['perplexity']:.1f} | {speed:.2f}x | {speed_q4:.2f}x | "
                     f"{e['load']:.1f} |")
    for name, rec in results["recovery"].items():
        lines += ["", f"## Recovery of {name} by distillation", "",
                  f"Logit KL at temperature {rec['temperature']}, AdamW lr {rec['lr']} (constant), batch "
                  f"{rec['batch_size']} passages of ≤ {rec['max_length']} tokens ({rec['train_passages']} passages "
                  "from corpus sentences 1,000–30,000), fp32, 2 threads; minutes are training wall time "
                  f"(evaluation excluded). Load average {rec['load_start']:.1f} at the start, "
                  f"{rec['load_end']:.1f} at the end.", "",
                  "| train minutes | steps | passages seen | KL | top-1 | perplexity | load |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in rec["curve"]:
            lines.append(f"| {p['minutes']:.1f} | {p['step']} | {p['texts']} | {p['kld']:.3f} | {p['top1']:.3f} | "
                         f"{p['perplexity']:.1f} | {p['load']:.1f} |")
        if rec.get("saved"):
            lines += ["", f"Student saved (Hugging Face folder, gitignored): `{rec['saved']}`."]
    if args.notes and Path(args.notes).exists():
        lines += ["", Path(args.notes).read_text().strip()]
    results_io.write_text(MARKDOWN, "\n".join(line for line in lines if line is not None) + "\n")
    log.info("wrote %s", MARKDOWN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--levels", nargs="*", help=f"levels to prune (default all: {', '.join(LEVELS)})")
    p.add_argument("--reuse-kl", nargs="*", default=[], help="kl levels built from the per-layer KL scores "
                                                             "an earlier level of the results measured")
    d = sub.add_parser("distill")
    d.add_argument("--level", required=True, choices=list(LEVELS))
    d.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget")
    d.add_argument("--eval-minutes", type=float, default=3.0, help="training minutes between evaluations")
    d.add_argument("--lr", type=float, default=1e-4)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--max-length", type=int, default=96)
    d.add_argument("--chars", type=int, default=240, help="characters per training passage (at least)")
    d.add_argument("--temperature", type=float, default=2.0)
    d.add_argument("--save", type=Path, default=None, help="save the final student here (Hugging Face folder)")
    r = sub.add_parser("render")
    r.add_argument("--notes", default=None, help="a Markdown file appended to the table (conclusions)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    {"prune": phase_prune, "distill": phase_distill, "render": render}[args.phase](args)


if __name__ == "__main__":
    main()
