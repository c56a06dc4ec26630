"""edgesmith's decoder export backends side by side on SmolLM2-135M: which graph makes INT4 decode fast.

Contenders (threads = 2, ONNX Runtime intra-op spinning off — edgesmith's decoder default — greedy,
forced length, EOS ignored; every ONNX graph runs through edgesmith's own ``OrtDecoderSession``
loop, so the graphs differ and the loop does not):

- ``dynamo-gguf``: edgesmith's dynamo export (eager attention, ~2,200 nodes per token) with the
  shipped GGUF's Q4_1 blocks repacked exactly into MatMulNBits (``quantize --method gguf``): what
  ``recipes/smollm2-cpu.yaml`` ships today;
- ``genai-gguf``: the export with ``backend: genai`` (ORT GenAI's model builder, FP32:
  GroupQueryAttention, SkipSimplifiedLayerNormalization; q/k/v unfused) with the same exact repack;
- ``genai-gguf-fused`` (``--fused``, a prototype): the builder's graph with q/k/v and gate/up
  fused, repacked by a matcher that also takes a weight whose columns come from several GGUF
  tensors (``_concat_match`` below; not in ``edgesmith.gguf.repack`` yet);
- ``builder-int4``: ORT GenAI's builder ``-p int4`` with its defaults (RTN of the dequantized
  weights, INT4 LM head): the speed reference, not exact;
- ``ortgenai-int4``: the same folder through ORT GenAI's own runtime (``og.Generator``), and
  ``llamacpp-q4_1``: llama.cpp on the shipped Q4_1 file, and ``torch-fp32``: the FP32 source (the
  reference of every KL / top-1 / greedy-agreement number) — the peers' workers of
  ``bench/llm_peers.py``, unchanged.

Each contender is a worker process (``llm_worker`` protocol; edgesmith's graphs are served by
``llm_peer_edgesmith.py``, the one edgesmith decoder worker), all loaded at once; the contenders are
entries of ``llm_contenders.TABLE`` and ``llm_peers.measure`` runs the rounds in a rotating order.
Generation Profiles of every contender land in ``profiles/bench-llm/llm_backends/``. KL / top-1 / perplexity: teacher-forced logits of the held-out passage in ``prompts.json``
(batch 1, unpadded: valid for the builder's graphs) against the FP32 source's, the same numbers
``llm_peers.md`` gives for llama.cpp.

    .venv/bin/python bench/llm_backends.py                          # bench/results/llm_backends.{json,md}
    .venv/bin/python bench/llm_backends.py --fused --rounds 3
    .venv/bin/python bench/llm_backends.py --dynamo-fp32 /path/to/an/edgesmith/export   # skip the slow export
    .venv/bin/python bench/llm_backends.py --folder mine=ortgenai:/path/to/folder   # any prebuilt folder
    .venv/bin/python bench/llm_backends.py --render-only

Artifacts are built once under ``bench/.cache/llm/backends/`` (the dynamo export takes 100-250 s
on 2 shared cores, the builder ~20 s, each repack ~15 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# as a script: the repo root, so `bench` imports; appended, so edgesmith still comes from the venv (or
# PYTHONPATH, to bench a patched copy)
sys.path.append(str(REPO))

from bench import llm_contenders, llm_peers, llm_profiles, llm_report, llm_sources
from bench.core import cli
from bench.core import machine as machine_record
from bench.core import results as results_io
from bench.core.rounds import Timed, paired_speedup

log = logging.getLogger("bench.llm_backends")

EDGESMITH = ("dynamo-gguf", "genai-gguf", "builder-int4")
PEERS = ("torch-fp32", "llamacpp-q4_1", "ortgenai-int4")
BASELINE = "llamacpp-q4_1"


# ---------------------------------------------------------------------------------------------
# Building the artifacts
# ---------------------------------------------------------------------------------------------


def _concat_match():
    """Prototype: let the repack match a weight whose output columns are rows of several GGUF
    tensors side by side (a fused q/k/v or gate/up MatMul), exactly, in this process only."""
    import numpy as np

    from edgesmith.gguf import repack as R

    original = R.RowIndex.match

    def match(self, matrix):
        found = original(self, matrix)
        if found is not None:
            return found
        n, k = matrix.shape
        parts, prev = [], None
        for r in range(n):
            cands = {t: row for t, row in self.rows.get(hash(matrix[r].tobytes()), {}).items()
                     if self.weights[t].cols == k}
            if not cands:
                return None
            t = prev if prev in cands else min(cands)
            parts.append((t, cands[t]))
            prev = t
        tensors = sorted({t for t, _ in parts}, key=[t for t, _ in parts].index)
        if len(tensors) < 2 or len({self.weights[t].qtype for t in tensors}) != 1:
            return None
        blocks = np.stack([self.weights[t].blocks[row] for t, row in parts])
        weight = R.GgufWeight("+".join(self.weights[t].name for t in tensors), self.weights[tensors[0]].qtype,
                              n, k, blocks)
        if not np.array_equal(weight.dequantize(), matrix):
            return None
        return R.Match(weight, np.arange(n))

    R.RowIndex.match = match


def build(keys: list[str], cache: Path, *, dynamo_fp32: Path | None, fp32_folder: Path) -> dict[str, str]:
    """Folders of the edgesmith contenders, built once under ``cache`` (each atomically)."""
    import edgesmith as es
    from edgesmith.artifacts import load
    from edgesmith.compress.quantization.weight_only import quantize_weight_only
    from edgesmith.gguf.source import smollm2_gguf_path
    from edgesmith.passes import Context

    cache.mkdir(parents=True, exist_ok=True)
    gguf = str(smollm2_gguf_path())
    out: dict[str, str] = {}
    source = None

    def source_model():
        nonlocal source
        if source is None:
            source = es.load("smollm2")
        return source

    def fp32(name: str, backend: str, options: dict | None = None):
        folder = cache / name
        if name == "dynamo-fp32" and dynamo_fp32 is not None:
            return load(dynamo_fp32)
        if not (folder / "edgesmith.json").exists():
            from edgesmith.export import decoder_genai

            saved = dict(decoder_genai.BUILDER_OPTIONS)
            decoder_genai.BUILDER_OPTIONS.update(options or {})
            try:
                t0 = time.perf_counter()
                es.export.to_onnx(source_model(), backend=backend).save(folder)
                log.info("%s: exported in %.0f s", name, time.perf_counter() - t0)
            finally:
                decoder_genai.BUILDER_OPTIONS.clear()
                decoder_genai.BUILDER_OPTIONS.update(saved)
        return load(folder)

    def repacked(name: str, parent) -> str:
        folder = cache / name
        if not (folder / "edgesmith.json").exists():
            t0 = time.perf_counter()
            ctx = Context()
            q = quantize_weight_only(parent, {"method": "gguf", "gguf_file": gguf}, ctx)
            q.save(folder)
            log.info("%s: repacked in %.0f s (%s; not matched: %d)", name, time.perf_counter() - t0,
                     ctx.report["gguf"]["types"], len(ctx.report["gguf"]["not_matched"]))
        return str(folder)

    def built(name: str) -> bool:
        return (cache / name / "edgesmith.json").exists()

    for backend in ("dynamo", "genai"):
        if f"{backend}-fp32" in keys or (f"{backend}-gguf" in keys and not built(f"{backend}-gguf")):
            parent = fp32(f"{backend}-fp32", backend)
            out[f"{backend}-fp32"] = str(parent.folder)
            if f"{backend}-gguf" in keys:
                out[f"{backend}-gguf"] = repacked(f"{backend}-gguf", parent)
        elif f"{backend}-gguf" in keys:
            out[f"{backend}-gguf"] = str(cache / f"{backend}-gguf")
    if "genai-gguf-fused" in keys:
        if not built("genai-gguf-fused"):
            _concat_match()
            parent = fp32("genai-fp32-fused", "genai", {"fuse_qkv": "true", "fuse_mlp_gate_up": "true"})
            repacked("genai-gguf-fused", parent)
        out["genai-gguf-fused"] = str(cache / "genai-gguf-fused")
    if "builder-int4" in keys:
        out["builder-int4"] = llm_contenders.genai_builder(fp32_folder, cache.parent / "ortgenai-int4")["folder"]
    return out


# ---------------------------------------------------------------------------------------------
# The run and the table
# ---------------------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    s, m, la = doc["settings"], doc["machine"], doc["load_average"]
    lengths = [str(n) for n in s["lengths"]]
    first = lengths[0]
    base = doc["contenders"].get(BASELINE, {})
    base_runs = (base.get("runs") or {}).get(first) or []
    head = ["contender", f"decode tok/s @{first} [95% CI], best", "× llama.cpp decode [95% CI]"]
    head += [f"TTFT @{n} ms [95% CI], best" for n in lengths]
    head += ["KL to FP32", "top-1", "ppl", f"greedy = FP32 ({s['new_tokens']} tok @{first})", "size MB", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, r in doc["contenders"].items():
        sm = r.get("summary") or {}
        runs = (r.get("runs") or {}).get(first) or []
        ratio = "-"
        if key == BASELINE:
            ratio = "1.00x (baseline)"
        elif runs and len(runs) == len(base_runs):
            lo = paired_speedup(Timed(BASELINE, [x["token_ms"] for x in base_runs]), Timed(key, [x["token_ms"] for x in runs]))
            ratio = "{:.2f}x [{:.2f}–{:.2f}]".format(*lo)
        q = r.get("quality") or {}
        ag = (r.get("agreement") or {}).get(first)
        cells = [r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
                 llm_report.fmt_ci((sm.get(first) or {}).get("decode_tps"), 1, (sm.get(first) or {}).get("best_decode_tps")),
                 ratio]
        cells += [llm_report.fmt_ci((sm.get(n) or {}).get("ttft_ms"), 0, (sm.get(n) or {}).get("best_ttft_ms"))
                  for n in lengths]
        cells += [f"{q['kld']:.4f}" if q else "-", f"{q['top1']:.3f}" if q else "-", f"{q['ppl']:.2f}" if q else "-",
                  ("reference" if key == llm_report.REFERENCE else
                   f"{ag['identical_prefix']}/{ag['of']} prefix, {ag['matches']}/{ag['of']} equal") if ag else "-",
                  f"{r['size_bytes'] / 1e6:.0f}" if r.get("size_bytes") else "-",
                  f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- `{k}`: " + "; ".join(r["notes"]) for k, r in doc["contenders"].items() if r.get("notes")]
    return "\n".join([
        "# Decoder export backends: SmolLM2-135M-Instruct INT4 on the CPU",
        "",
        f"Command: `{doc['command']}` ({doc['created']})",
        "",
        f"Machine: {m['cpu_model']} ({machine_record.isa_of(m)}), {m['cores']} logical cores; threads = {s['threads']} for every contender, "
        f"ONNX Runtime spinning off; load average (1 min) at start {la['start'][0]:.2f}, end {la['end'][0]:.2f}, "
        f"during the rounds {min(la['rounds']):.2f}–{max(la['rounds']):.2f}.",
        f"{s['rounds']} rounds in a rotating order; per round and contender a warm-up of {s['warmup_tokens']} "
        f"tokens, then one greedy generation of {s['new_tokens']} tokens (EOS ignored) per prompt length "
        f"({', '.join(lengths)} tokens of held-out text, the same ids for all). Medians over rounds with 95 % "
        "bootstrap intervals and the best round; × llama.cpp is the per-round ratio of median per-token "
        "latencies. KL / top-1 / perplexity: teacher-forced logits of a held-out passage of "
        f"{doc.get('heldout_tokens', '?')} tokens against the FP32 source (PyTorch).",
        "",
        *lines,
        "",
        *(["Notes:", *notes, ""] if notes else []),
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated contenders (default: {','.join(EDGESMITH + PEERS)})")
    p.add_argument("--fused", action="store_true", help="add genai-gguf-fused (prototype concatenated-weight matcher)")
    p.add_argument("--fp32", action="store_true", help="add the FP32 graphs of both backends")
    p.add_argument("--dynamo-fp32", type=Path, help="an existing edgesmith dynamo export of smollm2 to reuse")
    p.add_argument("--backends-dir", type=Path, help="where the edgesmith artifacts are built (default: CACHE/backends)")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=FOLDER[=LABEL]",
                   help="also measure a prebuilt edgesmith ONNX decoder folder (e.g. one made by a patched edgesmith)")
    p.add_argument("--folder", action="append", default=[], metavar="KEY=RUNTIME:PATH[=LABEL]",
                   help="also measure a prebuilt folder in a runtime's worker (edgesmith, ortgenai, llamacpp, torch)")
    p.add_argument("--build-only", action="store_true", help="build the edgesmith artifacts and stop")
    cli.add_timing_args(p, rounds=3, threads=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--cache", type=Path, default=llm_sources.CACHE)
    p.add_argument("--json-out", type=Path, default=BENCH / "results" / "llm_backends.json")
    p.add_argument("--md-out", type=Path, default=BENCH / "results" / "llm_backends.md")
    p.add_argument("--profiles-dir", type=Path, default=llm_profiles.PROFILES,
                   help="generation Profiles go to PROFILES_DIR/llm_backends/KEY.json")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.new_tokens < 2:
        p.error("--threads and --rounds must be at least 1, --new-tokens at least 2")
    return args


def contender_keys(args: argparse.Namespace) -> tuple[list[str], dict[str, llm_contenders.Contender]]:
    """The keys in table order, and the prebuilt folders of --extra / --folder as contenders."""
    keys = args.only.split(",") if args.only else list(EDGESMITH + PEERS)
    if args.fused and "genai-gguf-fused" not in keys:
        keys.insert(2, "genai-gguf-fused")
    if args.fp32:
        keys += [k for k in ("dynamo-fp32", "genai-fp32") if k not in keys]
    extra = {c.key: c for c in map(llm_contenders.folder_contender, [*args.extra, *args.folder])}
    llm_contenders.check_keys(keys, extra)
    return keys + list(extra), extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render_only:
        doc = results_io.read(args.json_out)
        results_io.write_text(args.md_out, markdown(doc) + "\n")
        print(markdown(doc))
        return 0
    keys, extra = contender_keys(args)
    sources = llm_contenders.Sources(args.cache, args.threads, backends_dir=args.backends_dir,
                                     dynamo_fp32=args.dynamo_fp32)
    if args.build_only:
        mine = [k for k in keys if llm_contenders.TABLE.get(k) and llm_contenders.TABLE[k].family == "edgesmith"]
        print(json.dumps(build(mine, args.backends_dir or args.cache / "backends", dynamo_fp32=args.dynamo_fp32,
                               fp32_folder=sources.fp32_folder()), indent=1))
        return 0
    rec = machine_record.record(args.threads)
    lengths = tuple(x.strip() for x in args.lengths.split(","))
    contenders, models = llm_peers.specs(keys, sources, threads=args.threads, extra=extra)
    prompts = str(llm_sources.prompts(sources.fp32_folder(), lengths=tuple(int(n) for n in lengths), cache=args.cache))
    results = llm_peers.measure(contenders, prompts, rounds=args.rounds, new_tokens=args.new_tokens,
                                lengths=lengths, warmup_tokens=args.warmup_tokens, quality=True,
                                work=args.cache / "run-backends")
    llm_peers.summarize(results, prompts, args.threads)
    machine_record.finish(rec)
    doc = {
        "schema": 2, "command": results_io.command_line("llm_backends.py", argv), "created": results_io.now(),
        "machine": rec,
        "settings": {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
                     "lengths": [int(n) for n in lengths], "warmup_tokens": args.warmup_tokens},
        "heldout_tokens": len(json.loads(Path(prompts).read_text())["prompts"]["heldout"]), "folders": models,
        "models": models,
        "load_average": {**rec["load_average"], "rounds": [x["load1"] for r in results.values()
                                                           for rs in r.get("runs", {}).values() for x in rs]},
        "contenders": results,
    }
    results_io.write_text(args.json_out, json.dumps(doc, indent=1) + "\n")
    results_io.write_text(args.md_out, markdown(doc) + "\n")
    llm_profiles.write_profiles(doc, "llm_backends", args.profiles_dir)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
