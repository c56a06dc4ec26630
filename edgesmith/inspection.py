"""What a model is made of: parameters, size, layers, heads, FFN widths, sparsity, how it reloads."""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgesmith.artifacts import Artifact, OnnxModel, TorchModel

HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
FFN_INPUT_SUFFIXES = ("intermediate.dense", "mlp.up_proj", "mlp.c_fc", "ffn.lin1", "mlp.fc1")


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
    import torch

    module = model.module
    params = sum(p.numel() for p in module.parameters())
    size = sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())
    zeros = sum(int((p == 0).sum()) for p in module.parameters() if p.dim() == 2)
    matrix = sum(p.numel() for p in module.parameters() if p.dim() == 2)
    layers = []
    for name, sub in module.named_modules():
        for attr in HEAD_ATTRS:
            value = getattr(sub, attr, None)
            if isinstance(value, int) and not isinstance(sub, torch.nn.Linear) and sub is not module \
                    and not hasattr(sub, "config"):
                layers.append({"module": name, "heads": value})
                break
    ffn = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and name.endswith(FFN_INPUT_SUFFIXES):
            ffn.append({"module": name, "ffn": sub.out_features})
        elif type(sub).__name__ == "Conv1D" and name.endswith(FFN_INPUT_SUFFIXES):
            ffn.append({"module": name, "ffn": int(sub.weight.shape[1])})
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
