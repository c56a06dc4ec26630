"""``edgesmith prune`` and ``edgesmith quantize``: one-pass shortcuts."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.cli.common import CACHE_DIR, JSON_OUT
from edgesmith.cli.root import app
from edgesmith.cli.shortcut import ONE_PASS_RUNS_DIR, run_one_pass
from edgesmith.compress.quantization.weight_only.methods import methods_help
from edgesmith.errors import BadInput

OUTPUT = typer.Option(None, "--output", "-o", help="Copy the result to this folder.")


@app.command("prune")
def prune_command(
    model: str = typer.Argument("minilm", help="Model folder, or 'minilm' for the packaged default."),
    heads: float = typer.Option(0.0, "--heads", help="Fraction of attention (query) heads removed in each layer."),
    ffn: float = typer.Option(0.0, "--ffn", help="Fraction of FFN channels removed in each layer."),
    layers: float = typer.Option(0.0, "--layers", help="Fraction of whole layers removed (depth pruning)."),
    importance: str = typer.Option("l2", "--importance", help="Importance criterion: l1, l2, taylor (needs --data), random."),
    allocation: str = typer.Option("uniform", "--allocation",
                                   help="uniform (same ratio in every layer) or global (ranked across layers)."),
    layer_importance: str = typer.Option("weights", "--layer-importance",
                                         help="Which layers --layers removes: weights (--importance on their weights), "
                                              "angular (hidden-state change) or kl (output change when skipped), "
                                              "measured on --data or the shipped corpus."),
    layer_selection: str = typer.Option("individual", "--layer-selection",
                                        help="individual layers, or one contiguous block (angular or kl)."),
    budget: str | None = typer.Option(None, "--budget",
                                      help="Keep at most this fraction: params=0.5 or macs=0.5 (searches the ratio)."),
    budget_prunes: str = typer.Option("heads,ffn", "--budget-prunes",
                                      help="What a budget may prune, comma-separated: heads, ffn, layers."),
    sparsity: float = typer.Option(0.0, "--sparsity", help="Unstructured sparsity: fraction of layer weights zeroed."),
    pattern: str | None = typer.Option(None, "--pattern", help="Semi-structured sparsity pattern: 2:4."),
    round_to: int = typer.Option(8, "--round-to", help="Round pruned FFN sizes to a multiple of this."),
    seed: int = typer.Option(0, "--seed", help="Seed of random importance and Taylor projections."),
    data: str | None = typer.Option(None, "--data", help="Text file (jsonl, csv, parquet) for Taylor or measured layer importance."),
    text_field: str = typer.Option("text", "--text-field", help="Field of --data that holds the text."),
    check_latency: bool = typer.Option(True, "--latency-check/--no-latency-check",
                                       help="Time parent and pruned model in torch and warn when pruned is slower."),
    output: Path | None = OUTPUT,
    runs_dir: Path | None = ONE_PASS_RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Prune heads, FFN channels and layers (torch-pruning DepGraph), or add unstructured / 2:4 sparsity."""
    if importance == "taylor" and data is None:
        raise BadInput("prune: --importance taylor needs data to compute gradients on: add --data FILE "
                       "(jsonl/csv/parquet with a 'text' field; --text-field names another)")
    options = {"heads": heads, "ffn": ffn, "layers": layers, "importance": importance, "allocation": allocation,
               "layer_importance": layer_importance, "layer_selection": layer_selection,
               "budget": budget, "budget_prunes": [p.strip() for p in budget_prunes.split(",") if p.strip()],
               "sparsity": sparsity, "pattern": pattern, "round_to": round_to, "seed": seed,
               "check_latency": check_latency}
    run_one_pass(model, "prune", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json,
                 data=data, data_options={"text_field": text_field} if data else None)


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(..., help="ONNX model: an .onnx file or an edgesmith ONNX folder; with --to gguf a "
                                "causal LM ('smollm2', a .gguf file, a Hugging Face folder)."),
    to: str = typer.Option("onnx", "--to", help="onnx (ONNX Runtime quantization) or gguf (llama.cpp's fast 4-bit "
                           "formats: --format q4_0|iq4_nl, --method rtn|search|gptq|qat)."),
    fmt: str = typer.Option("q4_0", "--format", help="--to gguf: block format of the decoder layers (q4_0, iq4_nl)."),
    steps: int | None = typer.Option(None, "--steps", help="--to gguf --method qat: optimizer steps (200)."),
    lr: float | None = typer.Option(None, "--lr", help="--to gguf --method qat: peak learning rate (5e-5)."),
    keep_q8: int | None = typer.Option(None, "--keep-q8", help="--to gguf: the N tensors whose 4-bit rounding costs "
                                       "most KL (measured) stay Q8_0."),
    kl_budget: float | None = typer.Option(None, "--kl-budget", help="--to gguf: keep the costliest tensors at Q8_0 "
                                           "until the rest's summed KL is at most this."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="--to gguf: gate, top-1 agreement in llama.cpp."),
    mode: str = typer.Option("dynamic", "--mode", help="dynamic | static (calibrated QDQ) | fp16 | int4 | "
                             "int8-weight (weight-only MatMulNBits, for decoders)."),
    per_channel: bool | None = typer.Option(None, "--per-channel/--per-tensor",
                                            help="Per-channel weight scales (INT8 default: per channel)."),
    calibration: str | None = typer.Option(None, "--calibration",
                                           help="Static: texts to calibrate on (jsonl/csv/parquet/txt, streamed)."),
    method: str | None = typer.Option(None, "--method", help="Static calibration: minmax | entropy | percentile. "
                                      f"int4/int8-weight: {methods_help()}."),
    block: int | None = typer.Option(None, "--block", help="int4/int8-weight: weights per scale (32)."),
    max_kld: float | None = typer.Option(None, "--max-kld", help="int4/int8-weight: KL budget (nats/token); the "
                                         "most sensitive layers stay 8-bit until it holds."),
    lm_head: bool | None = typer.Option(None, "--lm-head/--no-lm-head",
                                        help="int4/int8-weight: quantize the LM head too (default) or keep it float."),
    gguf_file: Path | None = typer.Option(None, "--gguf-file", help="int4 --method gguf: the GGUF whose blocks are "
                                          "repacked (default: the one the model was read from), e.g. one made by "
                                          "quantize --to gguf."),
    symmetric: bool = typer.Option(False, "--symmetric", help="int4/int8-weight: no zero points (rtn, gptq, "
                                   "k-quant)."),
    samples: int | None = typer.Option(None, "--samples", help="Static: number of calibration texts (256)."),
    max_drop: list[str] = typer.Option([], "--max-drop",
                                       help="Accuracy-aware gate METRIC=DROP, e.g. cosine=0.01 (repeatable)."),
    optimize: bool = typer.Option(False, "--optimize", help="Run ORT's transformer optimizer first (validated)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Dynamic: 8-bit embedding tables too."),
    softmax_floor: str | None = typer.Option(None, "--softmax-floor", metavar="FLOOR|auto", help="Attention Softmax "
                                             "fed max(x - rowmax, FLOOR), e.g. -80 (padded keys leave ORT's slow exp; "
                                             "outputs unchanged); auto: -80 only if timed faster on this CPU."),
    drop_node_metadata: bool = typer.Option(False, "--drop-node-metadata", help="Drop the exporter's per-node "
                                            "metadata (module paths; ~0.3 MB on MiniLM)."),
    speed_check: bool = typer.Option(False, "--speed-check", help="Time against the parent; flag if slower."),
    data: str | None = typer.Option(None, "--data", help="Texts for fidelity and gates (default: built-in corpus)."),
    output: Path | None = OUTPUT,
    runs_dir: Path | None = ONE_PASS_RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Quantize an ONNX model: INT8 dynamic or static (QDQ), FP16, or weight-only INT4/INT8 for decoders;
    accuracy-aware with --max-drop (or --max-kld). With --to gguf: a causal LM into llama.cpp's Q4_0 or
    IQ4_NL with activation-aware scales, GPTQ or quantization-aware distillation, verdict in llama.cpp."""
    if to == "gguf":
        onnx_only = [flag for flag, value in (("--mode", mode != "dynamic"), ("--per-channel", per_channel is not None),
                                              ("--calibration", calibration), ("--block", block),
                                              ("--lm-head", lm_head is not None), ("--samples", samples),
                                              ("--gguf-file", gguf_file), ("--symmetric", symmetric),
                                              ("--max-drop", max_drop), ("--optimize", optimize),
                                              ("--embeddings", embeddings), ("--softmax-floor", softmax_floor),
                                              ("--drop-node-metadata", drop_node_metadata),
                                              ("--speed-check", speed_check)) if value]
        given = {"format": fmt, "method": method, "steps": steps, "lr": lr, "keep_q8": keep_q8,
                 "kl_budget": kl_budget, "max_kld": max_kld, "min_top1": min_top1, "data": data}
        run_one_pass(model, "gguf-quantize", _gguf_options(onnx_only, given), output=output, runs_dir=runs_dir,
                     cache_dir=cache_dir, as_json=as_json)
        return
    _check_onnx_target(to, fmt, steps, lr, keep_q8, kl_budget, min_top1)
    options: dict = {"mode": mode}
    given = {"per_channel": per_channel, "calibration": calibration, "method": method, "calibration_samples": samples,
             "block": block, "max_kld": max_kld, "quantize_lm_head": lm_head, "softmax_floor": softmax_floor,
             "gguf_file": str(gguf_file) if gguf_file is not None else None, "symmetric": symmetric or None}
    options.update({key: value for key, value in given.items() if value is not None})
    if max_drop:
        options["max_drop"] = parse_gates(max_drop)
    for key, flag in (("optimize", optimize), ("quantize_embeddings", embeddings), ("speed_check", speed_check)):
        if flag:
            options[key] = True
    if drop_node_metadata:
        options["keep_node_metadata"] = False
    run_one_pass(model, "quantize", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json,
                 data=data)


def _gguf_options(onnx_only: list[str], given: dict) -> dict:
    """quantize --to gguf: the pass's options, or one line naming the ONNX-only flags given."""
    if onnx_only:
        raise BadInput(f"{', '.join(onnx_only)}: ONNX quantization options; --to gguf takes --format, --method, "
                       "--steps, --lr, --keep-q8, --kl-budget, --max-kld, --min-top1, --data")
    return {k: v for k, v in given.items() if v is not None}


def _check_onnx_target(to: str, fmt: str, *gguf_values) -> None:
    if to != "onnx":
        raise BadInput(f"--to {to!r}: quantize writes onnx (ONNX Runtime) or gguf (llama.cpp)")
    flags = ("--steps", "--lr", "--keep-q8", "--kl-budget", "--min-top1")
    gguf_only = [flag for flag, value in (("--format", fmt != "q4_0"), *zip(flags, gguf_values, strict=True)) if value]
    if gguf_only:
        raise BadInput(f"{', '.join(gguf_only)} appl{'y' if len(gguf_only) > 1 else 'ies'} to --to gguf")


def parse_gates(values: list[str]) -> dict[str, float]:
    """``["cosine=0.01", "recall@10=0.05"]`` -> {"cosine": 0.01, "recall@10": 0.05}."""
    gates: dict[str, float] = {}
    for value in values:
        name, sep, drop = value.partition("=")
        try:
            gates[name.strip()] = float(drop)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise BadInput(f"--max-drop {value!r}: write METRIC=DROP, e.g. --max-drop cosine=0.01")
    return gates
