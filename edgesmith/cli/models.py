"""``edgesmith inspect`` and ``edgesmith export``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgesmith.cli.common import CACHE_DIR, JSON_OUT, console, print_json
from edgesmith.cli.root import app
from edgesmith.cli.shortcut import ONE_PASS_RUNS_DIR, run_one_pass
from edgesmith.errors import BadInput


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument("minilm", help="Model folder, .onnx file, or 'minilm'."),
    as_json: bool = JSON_OUT,
) -> None:
    """Parameters, size, layers, heads, FFN sizes and lineage of a model."""
    from edgesmith.artifacts import load
    from edgesmith.inspection import describe

    info = describe(load(model))
    if as_json:
        print_json(info)
        return
    table = Table(title=f"{info['name']} ({info['kind']}, {info['task']})", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in ("architecture", "format", "parameters", "size_bytes", "hidden_size", "layers", "weight_sparsity",
                "opset", "precision", "nodes", "num_attention_heads", "content_hash"):
        if info.get(key) is not None:
            value = info[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("inputs", ", ".join(info["inputs"]))
    table.add_row("outputs", ", ".join(info["outputs"]))
    if info.get("attention"):
        table.add_row("heads per layer", " ".join(str(a["heads"]) for a in info["attention"]))
        table.add_row("sparsity per layer", " ".join(f"{a['sparsity']:.2f}" + (" (2:4)" if a["pattern_2_4"] else "")
                                                     for a in info["attention"]))
    if info.get("ffn"):
        table.add_row("FFN per layer", " ".join(str(f["ffn"]) for f in info["ffn"]))
    if info.get("op_types"):
        table.add_row("top ops", ", ".join(f"{k}×{v}" for k, v in list(info["op_types"].items())[:8]))
    table.add_row("lineage", " → ".join(s["pass"] for s in info["lineage"]) or "(source)")
    console.print(table)


@app.command("export")
def export_command(
    model: str = typer.Argument("minilm", help="Model folder, 'minilm' or 'smollm2' (--to onnx, genai, gguf); an "
                                "ONNX model (--to tensorrt)."),
    to: str = typer.Option("onnx", "--to", help="Target format: onnx, genai (an ONNX Runtime GenAI folder: "
                           "genai_config.json, fused GroupQueryAttention graph), gguf (llama.cpp) or tensorrt."),
    quant: str = typer.Option("f16", "--quant", help="gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0; K-quants "
                              "(q4_k_m, q5_k_m, q6_k, ...) with llama-cpp-python installed."),
    embeddings: str | None = typer.Option(None, "--embeddings", help="gguf: type of the token embedding "
                                          "(default q8_0 under 4/5-bit quants)."),
    tokenizer_pre: str | None = typer.Option(None, "--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name "
                                             "(default: the source GGUF's, else 'default')."),
    max_kld: float | None = typer.Option(None, "--max-kld", help="gguf: fail (exit 3) above this KL to the source."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="gguf: fail (exit 3) below this top-1 agreement."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    atol: float | None = typer.Option(None, "--atol", help="Largest allowed max abs difference in validation "
                                      "(default: 1e-3 for onnx; per precision for tensorrt)."),
    precision: str = typer.Option("fp16", "--precision", help="tensorrt: fp32, fp16, bf16, int8 (Q/DQ graph), "
                                  "fp8 (FP8 Q/DQ graph). TensorRT 11 (strongly typed): fp16/bf16 are built "
                                  "from the graph converted to that precision first."),
    shapes: list[str] = typer.Option([], "--shapes", help="tensorrt: an optimization profile, e.g. "
                                     "batch=1:8:32,seq=16:128:256 (MIN:OPT:MAX; repeat for several profiles)."),
    workspace: int = typer.Option(4096, "--workspace", help="tensorrt: builder workspace limit, MiB."),
    opt_level: int = typer.Option(3, "--opt-level", help="tensorrt: builder optimization level 0-5."),
    backend: str = typer.Option("auto", "--backend", help="tensorrt: python (TensorRT's builder API), trtexec, "
                                "or auto (python when installed, else trtexec)."),
    trtexec: str = typer.Option("trtexec", "--trtexec", help="tensorrt: path of the trtexec tool."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Copy the exported folder here."),
    runs_dir: Path | None = ONE_PASS_RUNS_DIR,
    cache_dir: Path | None = CACHE_DIR,
    as_json: bool = JSON_OUT,
) -> None:
    """Export to ONNX (dynamic batch and sequence), write a GGUF for llama.cpp, or build a TensorRT
    engine from an ONNX model, validated against its source."""
    if to in ("onnx", "genai"):
        options = {**({"atol": atol} if atol is not None else {}), **({"opset": opset} if opset else {}),
                   **({"backend": "genai"} if to == "genai" else {})}
        run_one_pass(model, "export", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json)
        return
    if to == "gguf":
        options = {"quant": quant, **({"embeddings": embeddings} if embeddings else {}),
                   **({"tokenizer_pre": tokenizer_pre} if tokenizer_pre else {}),
                   **({"max_kld": max_kld} if max_kld is not None else {}),
                   **({"min_top1": min_top1} if min_top1 is not None else {})}
        from edgesmith.export.gguf import GgufConfig
        from edgesmith.passes import make_config

        make_config(GgufConfig, options, where="export --to gguf")  # a typo fails before any run folder
        run_one_pass(model, "gguf", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json)
        return
    if to != "tensorrt":
        raise BadInput(f"--to {to}: only 'onnx', 'genai', 'gguf' and 'tensorrt' are supported")
    options = {"precision": precision, "workspace_mib": workspace, "optimization_level": opt_level,
               "backend": backend, "trtexec": trtexec, **({"shapes": shapes} if shapes else {}),
               **({"atol": atol} if atol is not None else {})}
    _check_tensorrt_ready(model, options)
    run_one_pass(model, "tensorrt", options, output=output, runs_dir=runs_dir, cache_dir=cache_dir, as_json=as_json)


def _check_tensorrt_ready(model: str, options: dict) -> None:
    """Refuse (exit 2) before any run folder is made: bad options, a model that is not ONNX, or no
    TensorRT / GPU here."""
    from edgesmith.artifacts import resolve_model_path
    from edgesmith.passes import make_config
    from edgesmith.tensorrt.build import TensorRTConfig, resolve_backend
    from edgesmith.tensorrt.identity import gpu_identity

    cfg = make_config(TensorRTConfig, options, where="export --to tensorrt")
    path = resolve_model_path(model)
    is_onnx = path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").exists())
    if not is_onnx:
        raise BadInput(f"--to tensorrt builds from an ONNX model; '{model}' is not one: "
                       f"export it first (edgesmith export {model} --to onnx -o model-onnx)")
    resolve_backend(cfg.backend, cfg.trtexec)
    if gpu_identity()[0] is None:
        raise BadInput("--to tensorrt needs a CUDA GPU: engines are built on the GPU they will run on, and none is "
                       "visible here")
