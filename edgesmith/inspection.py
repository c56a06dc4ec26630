"""What a model is made of: parameters, size, layers, heads, FFN widths, sparsity, how it reloads."""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgesmith.artifacts import Artifact, OnnxModel, TorchModel


def describe(artifact: Artifact) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": artifact.kind, "name": artifact.name, "task": artifact.task,
                            "content_hash": artifact.content_hash(), "inputs": artifact.input_names,
                            "outputs": artifact.output_names,
                            "lineage": [{"pass": s.get("pass"), "config": s.get("config")} for s in artifact.lineage]}
    if isinstance(artifact, TorchModel):
        info.update(_describe_torch(artifact))
    elif isinstance(artifact, OnnxModel):
        info.update(_describe_onnx(artifact))
    return info


def _describe_torch(model: TorchModel) -> dict[str, Any]:
    module = model.module
    params = sum(p.numel() for p in module.parameters())
    size = sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())
    zeros = sum(int((p == 0).sum()) for p in module.parameters() if p.dim() == 2)
    matrix = sum(p.numel() for p in module.parameters() if p.dim() == 2)
    layers, ffn = _layer_shapes(module)
    config = model.config
    return {
        "architecture": type(module).__name__,
        "parameters": params,
        "size_bytes": size,
        "weight_sparsity": round(zeros / matrix, 4) if matrix else 0.0,
        "layers": len(layers) or getattr(config, "num_hidden_layers", None),
        "attention": layers,
        "ffn": ffn,
        "hidden_size": getattr(config, "hidden_size", None),
        "format": "edgesmith structure (reload with edgesmith.load)" if model.structure
        else "Hugging Face (stock from_pretrained reloads it)",
    }


def _layer_shapes(module) -> tuple[list[dict], list[dict]]:
    """Heads, FFN width and weight sparsity per layer, for the architectures edgesmith knows
    (see compress/pruning.py). ``sparsity`` is the fraction of zeros in the layer's Linear weights;
    ``pattern_2_4`` whether all of them hold two zeros in every four along the input dimension."""
    from edgesmith.architectures import (
        arch_spec,
        ffn_width_of,
        head_dim_of,
        heads_of,
        kv_heads_of,
        layer_parts,
        sparsity_report,
    )
    from edgesmith.errors import BadInput

    try:
        spec = arch_spec(module)
        parts = layer_parts(module, spec)
    except BadInput:
        return [], []
    names = {id(m): n for n, m in module.named_modules()}
    sparsity = sparsity_report(module, spec)
    per_module = sparsity["sparsity_per_module"]
    heads = []
    ffn = []
    for part, layer_sparsity in zip(parts, sparsity["sparsity_per_layer"]):
        layer_modules = [names[id(m)] for m in part.layer.modules() if id(m) in names and names[id(m)] in per_module]
        heads.append({"module": names[id(part.attention)], "heads": heads_of(part, spec),
                      "kv_heads": kv_heads_of(part, spec), "head_dim": head_dim_of(part, spec),
                      "sparsity": layer_sparsity,
                      "pattern_2_4": all(_is_2_4_module(module, n) for n in layer_modules)})
        ffn.append({"module": names[id(part.ffn_in[0])], "ffn": ffn_width_of(part)})
    return heads, ffn


def _is_2_4_module(module, name: str) -> bool:
    from edgesmith.architectures import is_2_4, linear_weight

    return is_2_4(linear_weight(module.get_submodule(name)).detach())


def _describe_onnx(model: OnnxModel) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(model.path), load_external_data=False)
    ops = Counter(node.op_type for node in proto.graph.node)
    dtypes = Counter(onnx.TensorProto.DataType.Name(init.data_type) for init in proto.graph.initializer)
    params = 0
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n
    return {
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "size_bytes": model.size_bytes(),
        "parameters": params,
        "nodes": sum(ops.values()),
        "op_types": dict(ops.most_common()),
        "initializer_dtypes": dict(dtypes),
        "precision": model.meta.get("precision", "fp32"),
        "num_attention_heads": model.meta.get("num_attention_heads"),
        "hidden_size": model.meta.get("hidden_size"),
    }
