"""Speculative decoding of SmolLM2-135M on edgesmith's ONNX Runtime loop, against HF assisted generation.

The target is edgesmith's FP32 ONNX export of SmolLM2-135M-Instruct (``OrtDecoderSession``,
threads = 2, spinning off); every contender is measured by
:func:`edgesmith.profiling.speculative.profile_speculative` (plain greedy and speculative greedy of
the same target, in pairs whose order alternates, net decode speedup as the median of the pairs'
ratios with a bootstrap interval, acceptance, tokens per target call, token-for-token identity):

- ``prompt lookup``: n-gram lookup over the prompt and output (no draft model), on two
  input-grounded tasks built from the shipped corpus: *summarise* a passage (the model paraphrases)
  and *repeat* it (the model copies: the best case for lookup);
- ``self-draft``: a depth-pruned copy of the target (``--self-draft-layers``, no distillation; its
  ONNX export is the draft), or any draft folder given with ``--draft`` (e.g. a pruned and distilled
  student: ``--draft FOLDER``, an edgesmith ONNX decoder or a Hugging Face folder);
- ``INT4 target`` (``--int4``): the same target quantized (``quantize mode=int4 method=gguf``)
  with prompt lookup.

The peer: Hugging Face transformers ``generate`` on the FP32 PyTorch model (threads = 2, PyTorch's
own OpenMP defaults: until issue 23 this script set ``OMP_WAIT_POLICY=PASSIVE``, which slows what
PyTorch's users get), plain greedy against ``prompt_lookup_num_tokens=k`` and
``assistant_model=`` (the self-draft's PyTorch module); timed end to end per prompt (HF does not
split prefill from decode), in alternating pairs as well.

    .venv/bin/python bench/llm_speculative.py                 # bench/results/llm_speculative.{json,md}
    .venv/bin/python bench/llm_speculative.py --draft FOLDER  # a distilled student as the draft
    .venv/bin/python bench/llm_speculative.py --build-only    # exports only
    .venv/bin/python bench/llm_speculative.py --render-only   # the .md again from the .json

Artifacts are built once under ``bench/.cache/llm/speculative/`` (the target's export takes a few
minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent))  # as a script: the repo root, so `bench` imports

from bench import llm_sources
from bench.core import machine, results

log = logging.getLogger("bench.llm_speculative")
RESULTS = BENCH / "results"
DEFAULT_SELF_DRAFT = "0-9,20-29"


def parse_layers(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _export(model, folder: Path) -> Path:
    import edgesmith as es

    if not (folder / "edgesmith.json").exists():
        t0 = time.perf_counter()
        log.info("exporting %s to %s", model.name, folder)
        tmp = folder.with_name(folder.name + ".tmp")
        es.export.to_onnx(model).save(tmp)
        tmp.rename(folder)
        log.info("exported in %.0f s", time.perf_counter() - t0)
    return folder


def build(cache: Path, self_layers: list[int], int4: bool) -> dict[str, Any]:
    """The target's FP32 export, the self-draft (torch module and export), the INT4 target."""
    import edgesmith as es
    from edgesmith.artifacts import TorchModel
    from edgesmith.compress.distillation.layers import depth_reduced

    cache.mkdir(parents=True, exist_ok=True)
    source = es.load("smollm2")
    out: dict[str, Any] = {"source": source, "target": _export(source, cache / "target-fp32")}
    name = "self-draft-" + "_".join(map(str, self_layers[:1] + self_layers[-1:])) + f"-{len(self_layers)}l"
    draft = depth_reduced(source, self_layers)  # the package's layer cut, no retraining
    draft.module.eval()
    out["self_module"] = draft.module
    out["self_draft"] = _export(TorchModel(task="text-generation", name=name, module=draft.module,
                                           tokenizer=source.tokenizer), cache / name)
    if int4:
        folder = cache / "target-int4-gguf"
        if not (folder / "edgesmith.json").exists():
            tmp = folder.with_name(folder.name + ".tmp")
            es.compress.quantize(es.load(str(out["target"])), mode="int4", method="gguf").save(tmp)
            tmp.rename(folder)
        out["target_int4"] = folder
    return out


def verify_drift(folder: Path, threads: int) -> float:
    """Max abs difference of the logits of 5 tokens scored in one call and in 5 single steps."""
    import numpy as np

    import edgesmith as es
    from edgesmith.profiling.speculative import grounded_prompts
    from edgesmith.runtimes.generation import prompt_ids
    from edgesmith.runtimes.onnxruntime import OrtDecoderSession

    model = es.load(str(folder))
    session = OrtDecoderSession(model, threads=threads)
    ids = prompt_ids(model.tokenizer, grounded_prompts(1)[0])
    extra = model.tokenizer.encode(" The text conveys a message")[:5]
    session.prefill(np.asarray([ids]))
    together = session.extend(np.asarray([extra]), keep=len(extra))[0]
    session.prefill(np.asarray([ids]))
    apart = np.stack([session.step(np.asarray([t]))[0] for t in extra])
    session.close()
    return float(np.abs(together - apart).max())


def hf_peer(module, tokenizer, prompts: list[str], *, new_tokens: int, rounds: int, num_tokens: int,
            assistant_tokens: int = 2, assistants: dict[str, Any] | None = None,
            prompt_lookup: bool = True) -> list[dict[str, Any]]:
    """HF generate: plain greedy against prompt lookup and assisted generation, end to end, in pairs."""
    import numpy as np
    import torch

    from edgesmith.profiling.speculative import paired_interval
    from edgesmith.runtimes.generation import prompt_ids

    torch.set_num_threads(2)
    rows = [torch.tensor([prompt_ids(tokenizer, p)]) for p in prompts]
    eos = module.generation_config.eos_token_id
    base = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
    variants = {f"prompt_lookup_num_tokens={num_tokens}": dict(prompt_lookup_num_tokens=num_tokens)} if prompt_lookup else {}
    for name, assistant in (assistants or {}).items():
        assistant.generation_config.num_assistant_tokens = assistant_tokens
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        variants[f"assistant_model={name} (k={assistant_tokens})"] = dict(assistant_model=assistant)

    def gen(ids, extra):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = module.generate(ids, **base, **extra)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    results = []
    for name, extra in variants.items():
        gen(rows[0], {})
        gen(rows[0], extra)
        ratios, plain_tps, spec_tps, identical = [], [], [], True
        for r in range(rounds):
            for i, ids in enumerate(rows):
                order = ("plain", "spec") if (r + i) % 2 == 0 else ("spec", "plain")
                res = {k: gen(ids, {} if k == "plain" else extra) for k in order}
                (pt, ps), (st, ss) = res["plain"], res["spec"]
                identical &= pt == st
                plain_tps.append(len(pt) / ps)
                spec_tps.append(len(st) / ss)
                ratios.append(spec_tps[-1] / plain_tps[-1])
        results.append({"name": f"HF {name}",
                        "plain_tokens_per_s": float(np.median(plain_tps)),
                        "speculative_tokens_per_s": float(np.median(spec_tps)),
                        "speedup": paired_interval(ratios), "identical": identical, "rounds": rounds,
                        "load_average": machine.load_average()[0]})
        log.info("%s: %s", results[-1]["name"], results[-1]["speedup"])
    return results


def render(data: dict[str, Any]) -> str:
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    def ci(t):
        return f"{t[0]:.2f}× [{t[1]:.2f}, {t[2]:.2f}]"

    lines = [
        "# Speculative decoding (SmolLM2-135M, edgesmith's ORT loop)", "",
        *([machine.line(data["machine"]), ""] if data.get("machine") else []),
        f"Command: `{data['command']}`. Threads {data['threads']}, greedy, up to {data['new_tokens']} new tokens "
        f"(stop at EOS), {data['prompts']} input-grounded prompts from the shipped corpus, each measured in rounds "
        "of pairs (plain, speculative) whose order alternates (rounds per row below). Net speedup: speculative / plain decode tokens/s "
        "(the draft's whole cost included, TTFT excluded), median of the pairs with a 95% bootstrap interval; "
        "identical: the speculative tokens equal plain greedy's on every prompt and round.",
        f"Machine load (1-minute average): {data['load_average'][0]:.2f} at the start, "
        f"{data['load_average'][1]:.2f} at the end (2 cores shared with other jobs).", "",
        "| target | draft | task | k | rounds | acceptance | tokens / target call | draft ms / call | verify ms / call "
        "| verify / plain step "
        "| plain tok/s | speculative tok/s | net speedup [95% CI] | end-to-end | identical | gate ≥ "
        f"{data['min_speedup']:.2f} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in data["edgesmith"]:
        lines.append(f"| {r['label']} | {draft_name(r)} | {r['task']} | {r['num_tokens']} | {r['rounds']} | "
                     f"{f(100 * r['acceptance_rate'] if r['acceptance_rate'] is not None else None, 0)}% | "
                     f"{f(r['tokens_per_call'])} | {f(r['draft_ms_per_call'], 1)} | {f(r['verify_ms_per_call'], 1)} | "
                     f"{f(r['verify_ms_per_call'] * r['plain_tokens_per_s'] / 1000.0)} | "
                     f"{f(r['plain_tokens_per_s'], 1)} | {f(r['speculative_tokens_per_s'], 1)} | {ci(r['speedup'])} | "
                     f"{ci(r['end_to_end_speedup'])} | {'yes' if r['identical'] else 'NO'} | "
                     f"{'pass' if r['passed'] else 'refused'} |")
    if data.get("hf"):
        lines += ["", "HF transformers `generate` on the FP32 PyTorch model (the peer; end to end per prompt, "
                  "prefill included; acceptance not reported by HF):", "",
                  "| peer | rounds | plain tok/s | speculative tok/s | speedup [95% CI] | identical |",
                  "|---|---:|---:|---:|---|---|"]
        for r in data["hf"]:
            lines.append(f"| {r['name']} | {r['rounds']} | {f(r['plain_tokens_per_s'], 1)} | {f(r['speculative_tokens_per_s'], 1)} | "
                         f"{ci(r['speedup'])} | {'yes' if r['identical'] else 'NO'} |")
    lines += ["", *data.get("notes", []), "", *goal_lines(data)]
    if data.get("verify_drift"):
        lines += ["", "Verify drift (max abs logit difference between 5 tokens scored in one target call and in 5 "
                     "single steps, one corpus prompt): "
                     + ", ".join(f"{k} {v:.3g}" for k, v in data["verify_drift"].items())
                     + ". Where it is large, greedy output can change under speculation, and the gate refuses."]
    return "\n".join(lines) + "\n"


def draft_name(row: dict[str, Any]) -> str:
    """The draft as the table shows it: a --draft folder is named as such (its artifact may keep its source's name)."""
    return f"--draft folder ({row['draft']})" if row.get("key") == "draft" else row["draft"]


def goal_lines(data: dict[str, Any]) -> list[str]:
    """The issue's goal (>= min speedup net, identical output) row by row, and what would reach it."""
    goal = data["min_speedup"]
    met = [r for r in data["edgesmith"] if r["passed"]]
    out = [f"**Goal** (≥ {goal:.1f}× net on edgesmith's ORT loop, identical output): "
           + ("met by " + "; ".join(f"{r['label']} {draft_name(r)} on *{r['task']}* ({r['speedup'][0]:.2f}×, interval "
                                    f"from {r['speedup'][1]:.2f})" for r in met) if met else "not met by any row")
           + ". Refused: " + "; ".join(f"{r['label']} {draft_name(r)} on *{r['task']}* ({r['reason']})"
                                      for r in data["edgesmith"] if not r["passed"]) + "."]
    out += ["", "What the numbers say: a round costs one verify call (the *verify / plain step* column: scoring k + 1 "
               "tokens in one call costs about that many plain steps) plus drafting, and yields *tokens / target "
               "call* tokens; the net speedup is about tokens per call / (verify cost + draft cost), each in plain "
               "steps. Prompt lookup drafts for free, so it pays when the output copies the input (tokens per call "
               "well above the verify cost) and breaks even when it paraphrases. A draft model pays only when it "
               "costs a small fraction of the target per token and agrees often: the undistilled depth-pruned draft "
               "costs most of a target step per drafted token and agrees on few, so it loses. An INT4 target needs "
               "a kernel that scores k + 1 tokens as it scores one (see the verify drift) before its output can stay "
               "identical."]
    return out


def speculative_runs(args, built: dict[str, Any], target) -> tuple[list[tuple], dict[str, Any]]:
    """(key, label, target, options) of every edgesmith row, and the HF assistants of the draft rows."""
    import edgesmith as es

    runs = [("pl-summarise", "FP32", target, dict(prompt_lookup=3, num_tokens=args.num_tokens, task="summarise")),
            ("pl-repeat", "FP32", target, dict(prompt_lookup=3, num_tokens=args.num_tokens, task="repeat")),
            ("self-draft", "FP32", target, dict(draft=str(built["self_draft"]), num_tokens=args.draft_num_tokens,
                                                task="summarise"))]
    assistants = {"self-draft": built["self_module"]}
    if args.draft:
        given = es.load(str(args.draft))
        draft_folder = args.draft
        if given.kind == "torch":  # a Hugging Face folder (a distilled student): export it, and assist HF with it
            if not args.draft_in_torch:
                draft_folder = _export(given, args.cache / f"draft-{args.draft.name}")
            assistants[args.draft.name] = given.module
        runs.append(("draft", "FP32", target, dict(draft=str(draft_folder), num_tokens=args.draft_num_tokens,
                                                   task="summarise")))
    if args.int4:
        runs.append(("int4-pl", "INT4 (gguf repack)", es.load(str(built["target_int4"])),
                     dict(prompt_lookup=3, num_tokens=args.num_tokens, task="summarise")))
    return runs, assistants


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=llm_sources.CACHE / "speculative")
    p.add_argument("--draft", type=Path, help="a draft folder (edgesmith ONNX decoder or HF folder) to add")
    p.add_argument("--draft-in-torch", action="store_true", help="run a Hugging Face --draft in PyTorch "
                   "(TorchDecoderSession) instead of exporting it to ONNX first")
    p.add_argument("--self-draft-layers", default=DEFAULT_SELF_DRAFT, help="target layers the self-draft keeps")
    p.add_argument("--num-tokens", type=int, default=4, help="k for prompt lookup")
    p.add_argument("--draft-num-tokens", type=int, default=2, help="k for draft models")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="rounds for prompt lookup (the close calls)")
    p.add_argument("--draft-rounds", type=int, default=2, help="rounds for draft models")
    p.add_argument("--hf-rounds", type=int, default=2, help="rounds for the HF peer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-speedup", type=float, default=1.3)
    p.add_argument("--int4", action="store_true", help="add the INT4 target (prompt lookup)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--only", default="", help="comma-separated contender keys to run (pl-summarise, pl-repeat, "
                   "self-draft, draft, int4-pl)")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--render-only", action="store_true", help="render --out's .json again into its .md")
    p.add_argument("--out", type=Path, default=RESULTS / "llm_speculative.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render_only:
        data = results.read(args.out)
        data["notes"] = [n for n in data.get("notes", []) if not n.startswith("Verify drift")]
        results.write_text(args.out, render(data))
        return 0

    import edgesmith as es
    from edgesmith.profiling.speculative import grounded_prompts, profile_speculative

    built = build(args.cache, parse_layers(args.self_draft_layers), args.int4)
    if args.build_only:
        return 0
    rec = machine.record(args.threads)
    target = es.load(str(built["target"]))
    prompts = {t: grounded_prompts(args.prompts, task=t) for t in ("summarise", "repeat")}
    common = dict(new_tokens=args.new_tokens, threads=args.threads, min_speedup=args.min_speedup)
    runs, assistants = speculative_runs(args, built, target)
    only = {k for k in args.only.split(",") if k}
    rows = []
    for key, label, artifact, options in runs:
        if only and key not in only:
            continue
        log.info("%s (load %.2f)", key, machine.load_average()[0])
        rounds = args.draft_rounds if "draft" in options else args.rounds
        report = profile_speculative(artifact, count=args.prompts, rounds=rounds, **common, **options)
        rows.append({"key": key, "label": label, **report.model_dump()})
        log.info("%s: %.2fx [%.2f, %.2f], acceptance %s, identical %s", key, *report.speedup,
                 report.acceptance_rate, report.identical)
    drift = {"FP32": verify_drift(built["target"], args.threads)}
    if args.int4:
        drift["INT4 (gguf repack)"] = verify_drift(built["target_int4"], args.threads)
    hf = []
    if not args.skip_hf and (not only or "hf" in only):
        source = built["source"]
        if only:  # the HF counterparts of the rows asked for
            assistants = {k: v for k, v in assistants.items() if ("self-draft" if k == "self-draft" else "draft") in only}
        hf = hf_peer(source.module, source.tokenizer, prompts["summarise"], new_tokens=args.new_tokens,
                     rounds=args.hf_rounds, num_tokens=args.num_tokens,
                     assistant_tokens=args.draft_num_tokens, assistants=assistants,
                     prompt_lookup=not only or "pl-summarise" in only)
    machine.finish(rec)
    data = {"command": results.command_line("llm_speculative.py", argv), "machine": rec,
            "threads": args.threads, "new_tokens": args.new_tokens, "prompts": args.prompts, "min_speedup": args.min_speedup,
            "load_average": [rec["load_average"]["start"][0], rec["load_average"]["end"][0]],
            "created": results.now(), "edgesmith": rows, "hf": hf,
            "verify_drift": drift,
            "notes": [f"Self-draft: target layers {args.self_draft_layers} kept, no distillation (HF assisted "
                      "generation uses the same module as assistant_model)."]}
    results.write(args.out, data, render)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
