"""Export a causal LM as an ORT GenAI folder, validated on a mixed-length batch in ORT GenAI and edgesmith.

ORT GenAI's own model builder writes the graph; the check runs a batch of prompts of different
lengths in ONNX Runtime GenAI and in edgesmith's loop.

``edgesmith export MODEL --to genai -o folder/`` (recipe ``export: {backend: genai}``, Python
``es.export.to_genai(model)``) writes what ``onnxruntime_genai.Model(folder)`` loads and generates
with: the graph and its external data, ``genai_config.json``, the tokenizer files and edgesmith's
record. ``edgesmith quantize folder/ --mode int4`` keeps it one (:mod:`edgesmith.compress.quantization.weight_only`).

ORT GenAI's builder (``python -m onnxruntime_genai.models.builder``) writes the graph itself, op
by op, from the checkpoint's weights: ``GroupQueryAttention`` (rotary embedding and the KV cache
inside one kernel, past and present sharing one buffer), ``SkipSimplifiedLayerNormalization`` for
the residual adds and norms, SiLU as one op. SmolLM2-135M: 412 nodes against 1,928 in the dynamo
graph's eager attention (:mod:`edgesmith.export.decoder`). On a CPU the per-node cost of ONNX
Runtime is a large part of a 10-20 ms token. It also survives transformers upgrades, since it does
not trace the Python model.

**Padding.** GroupQueryAttention has no key-padding mask: it takes each row's cache slots and
rotary positions from the mask's row sums, as if every row's real tokens came first. That is ORT
GenAI's own batch contract (it right-pads), so these folders are recorded ``meta["decoder"]
["padding"] = "right"``: edgesmith's ONNX Runtime session moves a left-padded row's tokens to the
front at prefill and reads each row's logits at its last real token
(:class:`~edgesmith.runtimes.onnxruntime.OrtDecoderSession`), and the ``ortgenai`` runtime hands ORT
GenAI right-padded rows (:mod:`edgesmith.runtimes.ortgenai`). Never fuse such a graph with
``onnxscript``'s GQA rule, which drops the attention mask.

The export, in a temporary folder:

1. the module (as it is in memory: a pruned or distilled model too) and its tokenizer are saved
   with ``save_pretrained`` (the builder refuses a checkpoint without a tokenizer);
2. the builder runs in a subprocess, FP32 on the CPU, with :data:`BUILDER_OPTIONS` — q/k/v kept
   as three MatMuls (``fuse_qkv=false``) so that weight-only quantization with method ``gguf``
   (:mod:`edgesmith.gguf.repack`, which matches each weight to *one* GGUF tensor by value) repacks
   every projection; a failure is one line with the builder's last stderr line (BadInput, exit 2);
3. the graph is edited (:func:`adapt_graph`): the tied embedding, which the builder stores as the
   LM head's [hidden, vocab] matrix read through a Transpose by the embedding Gather, is stored
   once as the [vocab, hidden] table, so that the weight-only quantizers see the embedding and the
   LM head as the usual pair; a ``logits_to_keep`` input (Hugging Face's meaning: 0 keeps every
   position, N the last N; optional, default 0, which is what ORT GenAI gets since it does not feed
   it) slices the hidden states before the LM head, so edgesmith's prefill does not run the
   49,152-wide head over the whole prompt; ``genai_config.json`` is kept, checked for the keys ORT
   GenAI requires (:func:`~edgesmith.runtimes.ortgenai.read_genai_config`);
4. validation (:func:`validate_genai`): the dynamo export's probe batch (prompts of different
   lengths), through edgesmith's loop and through ORT GenAI: every real position's prefill logits
   within ``atol`` of PyTorch, then ``steps`` greedy tokens per row, token for token, against
   PyTorch's own KV-cache loop. A breach is :class:`~edgesmith.errors.ValidationFailed` (exit 3) and
   nothing is written.

Layer L4 (an exporter): imports artifacts, errors, storage, runtimes and the dynamo exporter's
validation helpers.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import META_FILE, ONNX_FILE, OnnxModel, TorchModel
from edgesmith.errors import BadInput, EdgesmithError, ValidationFailed, first_line
from edgesmith.export.decoder import (
    DEFAULT_ATOL,
    DEFAULT_STEPS,
    decoder_record,
    validate_decoder,
    write_decoder_companions,
)
from edgesmith.onnx_graph.lm_head import lm_head_node, untie_embedding_transpose
from edgesmith.runtimes.decoder import LOGITS_TO_KEEP
from edgesmith.runtimes.ortgenai import OrtGenAIRuntime, read_genai_config
from edgesmith.storage import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)

LAYOUT = "genai"
PADDING = "right"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
#: the builder's --extra_options: q/k/v as separate MatMuls, so a GGUF repack matches each one
#: (a fused qkv weight is three GGUF tensors side by side, which the repack's matcher does not take)
BUILDER_OPTIONS = {"fuse_qkv": "false"}
#: seconds the builder may take (SmolLM2-135M: 14-18 s on 2 shared cores)
BUILDER_TIMEOUT_S = 1800
DATA_FILE = ONNX_FILE + ".data"


def builder_available() -> bool:
    """Whether ``onnxruntime_genai`` (and so its model builder) is installed."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def builder_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------


def export_genai_decoder(model: TorchModel, out_folder: str | Path, *, atol: float = DEFAULT_ATOL,
                         steps: int = DEFAULT_STEPS, probe: Any = None, threads: int | None = None) -> OnnxModel:
    """Build ``model`` with ORT GenAI's builder into ``out_folder`` (replaced atomically) and
    validate it; nothing is written when the build or the validation fails."""
    out_folder = Path(out_folder)
    with atomic_dir(out_folder) as tmp:
        candidate = write_genai_decoder(model, tmp, atol=atol, steps=steps, probe=probe, threads=threads)
        write_json_atomic(tmp / META_FILE, candidate._meta_json())
    candidate.folder = out_folder
    return candidate


def write_genai_decoder(model: TorchModel, folder: Path, *, atol: float = DEFAULT_ATOL, steps: int = DEFAULT_STEPS,
                        probe: Any = None, threads: int | None = None) -> OnnxModel:
    """Build the graph into ``folder`` with its companions and validate it; returns the OnnxModel
    (``meta["decoder"]`` with layout ``genai``, ``meta["validation"]``). On a failure the caller
    removes ``folder`` (the export pass's scratch folder, or atomic_dir's)."""
    check_exportable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgesmith-genai-") as tmp:
        source, built = Path(tmp) / "source", Path(tmp) / "built"
        save_source(model, source)
        run_builder(source, built, Path(tmp) / "cache", label=model.name)
        adapted = adapt_graph(built / ONNX_FILE, folder, label=model.name)
        for item in built.iterdir():
            if item.is_file() and not item.name.startswith(ONNX_FILE):
                shutil.copy2(item, folder / item.name)
    export_s = time.perf_counter() - t0
    write_decoder_companions(model, folder)
    read_genai_config(folder)  # the keys ORT GenAI requires, one line when the builder left one out
    meta = {**copy.deepcopy(model.meta), **graph_meta(model, folder / ONNX_FILE),
            "decoder": genai_record(model, adapted), "export_seconds": round(export_s, 2)}
    candidate = OnnxModel(task="text-generation", name=model.name, lineage=copy.deepcopy(model.lineage), meta=meta,
                          folder=folder)
    result = validate_genai(model, candidate, probe, steps=steps, atol=atol, threads=threads)
    candidate.meta["validation"] = result
    log.info("built %s with ORT GenAI's builder in %.1f s: prefill max abs diff %.2e (ORT GenAI %.2e), %d greedy "
             "steps on %d prompts of different lengths in one batch", model.name, export_s, result["prefill_max_abs"],
             result["ortgenai"]["prefill_max_abs"], result["steps"], len(result["prompt_tokens"]))
    return candidate


def check_exportable(model: TorchModel) -> None:
    if model.task != "text-generation" or not model.is_huggingface:
        raise BadInput(f"{model.name}: the genai backend builds Hugging Face causal LMs (task text-generation), "
                       f"got a {model.task} {type(model.module).__name__}; use backend dynamo")
    if not builder_available():
        raise BadInput("the genai backend needs ONNX Runtime GenAI's model builder: pip install onnxruntime-genai "
                       "onnx-ir onnxscript (or use backend dynamo)")
    if model.tokenizer is None:
        raise BadInput(f"{model.name}: ORT GenAI's builder needs the model's tokenizer; put the tokenizer files "
                       "(tokenizer.json, tokenizer_config.json) in the model folder, or use backend dynamo")
    if model.structure:
        raise BadInput(f"{model.name}: the model's shapes differ from its config (pruned heads or layers), which "
                       "ORT GenAI's builder reads; export it with backend dynamo")


def save_source(model: TorchModel, folder: Path) -> None:
    """The module as it is, FP32 safetensors and tokenizer, for the builder to read."""
    module = model.module
    config = getattr(module, "config", None)
    try:
        if config is not None and getattr(config, "quantization_config", None) is not None:
            raise BadInput(f"{model.name}: the module is still a quantized checkpoint (quantization_config); load "
                           "its float weights (edgesmith load converts a GGUF to an FP32 folder) or use backend dynamo")
        module.save_pretrained(str(folder))
        model.tokenizer.save_pretrained(str(folder))
    except EdgesmithError:
        raise
    except Exception as exc:  # transformers raises ValueError, OSError, NotImplementedError...
        raise BadInput(f"{model.name}: cannot save the model for ORT GenAI's builder ({first_line(exc)}); "
                       "use backend dynamo") from exc


def builder_argv(source: Path, out: Path, cache: Path) -> list[str]:
    options = [f"{k}={v}" for k, v in BUILDER_OPTIONS.items()]
    return [sys.executable, "-m", BUILDER_MODULE, "-i", str(source), "-o", str(out), "-p", "fp32", "-e", "cpu",
            "-c", str(cache), "--extra_options", *options]


def run_builder(source: Path, out: Path, cache: Path, *, label: str, timeout: float = BUILDER_TIMEOUT_S) -> None:
    """The builder in a subprocess (it imports torch and transformers, sets global state and prints
    a lot); a failure is one line with the last line it wrote to stderr."""
    argv = builder_argv(source, out, cache)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise BadInput(f"ORT GenAI's builder did not finish building {label} within {timeout:.0f} s; "
                       "use backend dynamo") from exc
    if proc.returncode != 0 or not (out / ONNX_FILE).exists():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else f"exit status {proc.returncode}"
        raise BadInput(f"ORT GenAI's builder cannot build {label}: {last} (use backend dynamo)")
    log.debug("builder output:\n%s", proc.stdout[-4000:])


# ---------------------------------------------------------------------------------------------
# Editing the builder's graph
# ---------------------------------------------------------------------------------------------


def adapt_graph(source: Path, folder: Path, *, label: str) -> dict[str, Any]:
    """Write the builder's graph into ``folder`` with the tied embedding stored once as the
    [vocab, hidden] table and a ``logits_to_keep`` input before the LM head (module docstring,
    step 3). Returns what was done: ``{"logits": "selectable" | "all", "tied_embedding": bool}``."""
    import onnx

    try:
        model = onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError, OSError...
        raise EdgesmithError(f"{label}: cannot read the builder's graph ({first_line(exc)})") from exc
    graph = model.graph
    tied = untie_embedding_transpose(graph)
    keep = add_logits_to_keep(graph)
    if not keep:
        log.warning("%s: no LM head MatMul found in the builder's graph; logits of every position are computed", label)
    decomposed = decompose_simplified_layernorm(graph)
    onnx.save_model(model, str(folder / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    try:
        onnx.checker.check_model(str(folder / ONNX_FILE))
    except Exception as exc:  # onnx's checker raises its own ValidationError
        raise BadInput(f"{label}: ORT GenAI's builder wrote a graph that fails onnx.checker ({first_line(exc)}); "
                       "use backend dynamo") from exc
    return {"logits": "selectable" if keep else "all", "tied_embedding": tied, "decomposed_norms": decomposed}


def add_logits_to_keep(graph) -> bool:
    """An int64 scalar input ``logits_to_keep``: the LM head sees hidden positions
    ``[(seq - keep) % seq, seq)`` only (0 keeps all, the default when it is not fed). Returns
    whether it applied."""
    from onnx import TensorProto, helper, numpy_helper

    from edgesmith.onnx_graph.lm_head import keep_all_logits_by_default

    head = lm_head_node(graph)
    if head is None or any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    hidden = head.input[0]
    base = "/model/logits_to_keep"
    consts = {f"{base}/one": np.array([1], dtype=np.int64), f"{base}/end": np.array([np.iinfo(np.int64).max]),
              f"{base}/axis": np.array([1], dtype=np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.int64), k) for k, v in consts.items())
    nodes = [
        helper.make_node("Shape", [hidden], [f"{base}/seq"], name=f"{base}/Shape", start=1, end=2),
        helper.make_node("Reshape", [LOGITS_TO_KEEP, f"{base}/one"], [f"{base}/keep"], name=f"{base}/Reshape"),
        helper.make_node("Sub", [f"{base}/seq", f"{base}/keep"], [f"{base}/rest"], name=f"{base}/Sub"),
        helper.make_node("Mod", [f"{base}/rest", f"{base}/seq"], [f"{base}/start"], name=f"{base}/Mod"),
        helper.make_node("Slice", [hidden, f"{base}/start", f"{base}/end", f"{base}/axis"], [f"{base}/hidden"],
                         name=f"{base}/Slice"),
    ]
    head.input[0] = f"{base}/hidden"
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    keep_all_logits_by_default(graph, LOGITS_TO_KEEP)
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_param = "logits_sequence_length"
    return True


def decompose_simplified_layernorm(graph) -> int:
    """The builder writes ONNX Runtime's contrib op ``SimplifiedLayerNormalization`` (RMSNorm) in
    the *default* domain, which onnx's checker (and so edgesmith's loader) rejects; it is rewritten
    as ``x / Sqrt(ReduceMean(Pow(x, 2)) + eps) * scale``, the pattern ONNX Runtime's own
    optimizer fuses back into that op when the session loads. Returns how many were rewritten
    (SmolLM2: one, the first layer's input norm; the others are SkipSimplifiedLayerNormalization
    in com.microsoft)."""
    from onnx import helper, numpy_helper

    count = 0
    nodes = []
    for node in graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis, eps = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
        base = (node.name or f"/simplified_layernorm_{count}") + "/decomposed"
        graph.initializer.extend([numpy_helper.from_array(np.array(2.0, dtype=np.float32), f"{base}/two"),
                                  numpy_helper.from_array(np.array(eps, dtype=np.float32), f"{base}/eps"),
                                  numpy_helper.from_array(np.array([axis], dtype=np.int64), f"{base}/axes")])
        x, scale = node.input[0], node.input[1]
        nodes += [
            helper.make_node("Pow", [x, f"{base}/two"], [f"{base}/sq"], name=f"{base}/Pow"),
            helper.make_node("ReduceMean", [f"{base}/sq", f"{base}/axes"], [f"{base}/mean"], name=f"{base}/ReduceMean",
                             keepdims=1),
            helper.make_node("Add", [f"{base}/mean", f"{base}/eps"], [f"{base}/var"], name=f"{base}/Add"),
            helper.make_node("Sqrt", [f"{base}/var"], [f"{base}/std"], name=f"{base}/Sqrt"),
            helper.make_node("Div", [x, f"{base}/std"], [f"{base}/normed"], name=f"{base}/Div"),
            helper.make_node("Mul", [f"{base}/normed", scale], [node.output[0]], name=f"{base}/Mul"),
        ]
        count += 1
    if count:
        graph.ClearField("node")
        graph.node.extend(nodes)
    return count


def graph_meta(model: TorchModel, path: Path) -> dict[str, Any]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"model_type": getattr(model.config, "model_type", None), "opset": opset,
            "exporter": f"onnxruntime-genai model builder {builder_version()} ({', '.join(f'{k}={v}' for k, v in BUILDER_OPTIONS.items())})",
            "attention": "GroupQueryAttention", "source_hash": model.content_hash()}


def genai_record(model: TorchModel, adapted: dict[str, Any]) -> dict[str, Any]:
    """``meta["decoder"]`` for a builder graph: the dynamo record's fields with layout ``genai``."""
    import torch

    config = model.config.get_text_config(decoder=True)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    dtype = next(model.module.parameters()).dtype
    shape = {"num_layers": int(config.num_hidden_layers), "num_kv_heads": heads, "head_dim": head_dim,
             "dtype": torch.float32 if dtype != torch.float32 else dtype}
    record = decoder_record(model, shape)
    record.update({"layout": LAYOUT, "padding": PADDING, "logits": adapted["logits"],
                   "logits_input": LOGITS_TO_KEEP if adapted["logits"] == "selectable" else None})
    return record


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate_genai(torch_model: TorchModel, onnx_model: OnnxModel | str | Path, probe: Any = None, *,
                   steps: int = DEFAULT_STEPS, atol: float = DEFAULT_ATOL, threads: int | None = None) -> dict:
    """PyTorch against the folder on the probe batch (prompts of different lengths, one batch):
    through edgesmith's ONNX Runtime loop (left padding moved to the right by the session) and
    through ORT GenAI's generator (right padding, its own KV cache), each with
    :func:`~edgesmith.export.decoder.validate_decoder`. Raises :class:`ValidationFailed` naming the
    runtime; returns edgesmith's loop's measurements with ORT GenAI's under ``"ortgenai"``."""
    result = validate_decoder(torch_model, onnx_model, probe, steps=steps, atol=atol, threads=threads)
    try:
        genai = validate_decoder(torch_model, onnx_model, probe, steps=steps, atol=atol, threads=threads,
                                 runtime=OrtGenAIRuntime.name)
    except ValidationFailed as exc:
        raise ValidationFailed(f"in ORT GenAI: {exc}") from exc
    keys = ("prefill_max_abs", "min_cosine", "tokens_equal", "decode_max_abs", "ties", "providers")
    return {**result, "padding": PADDING, "ortgenai": {k: genai[k] for k in keys if k in genai}}
