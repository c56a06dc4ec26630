"""Writing a torch module as an ONNX graph: the module prepared for export (attention switched,
inputs and output named), the dynamo exporter called quietly with dynamic batch and sequence,
errors reduced to their root cause, and the model's companion files written beside the graph."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgesmith.artifacts import TorchModel
from edgesmith.errors import BadInput, EdgesmithError, first_line, no_space, no_space_cause
from edgesmith.export.tokenizer_class import portable_tokenizer_class
from edgesmith.inputs import tokenize

log = logging.getLogger(__name__)

#: shape of the example inputs the graph is traced with (batch, sequence); neither may be 0 or 1,
#: or torch.export specialises the axis
TRACE_SHAPE = (2, 16)

def prepare_module(model: TorchModel, attention: str):
    """A deep copy of the model's module, in eval mode, switched to ``attention`` when it is a
    Hugging Face model. The input module is left as it was."""
    module = copy.deepcopy(model.module)
    module.eval()
    if model.is_huggingface:
        try:
            module.set_attn_implementation(attention)
        except (ValueError, ImportError, AttributeError) as exc:
            raise BadInput(f"{model.name}: cannot switch to {attention} attention for export "
                           f"({first_line(exc)}); try attention='{'sdpa' if attention == 'eager' else 'eager'}'") from exc
        if getattr(module.config, "use_cache", None):
            module.config.use_cache = False
    return module


def wrap_module(module, input_names: Sequence[str], output_name: str):
    """A module whose positional inputs are ``input_names`` (in order) and whose single output is
    the tensor ``output_name``: what gives the graph its input and output names."""
    import torch

    class NamedIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module
            self.names = list(input_names)

        def forward(self, *args):
            return select_output(self.model(**dict(zip(self.names, args))), output_name)

    return NamedIO().eval()


def select_output(out: Any, name: str):
    """The tensor called ``name`` from a module's output (a tensor, a ModelOutput/dict, a tuple)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys"):
        if name in out.keys():
            return out[name]
        return next(iter(out.values()))
    return out[0]


def example_inputs(model: TorchModel, input_names: Sequence[str]) -> tuple:
    """Token ids of TRACE_SHAPE (with some padding): real sentences when a tokenizer is there, else
    random ids within the config's vocabulary (a checkpoint saved without its tokenizer), else ones."""
    import numpy as np
    import torch

    from edgesmith.validation import config_limits, id_feeds

    batch, seq = TRACE_SHAPE
    if model.tokenizer is not None:
        from edgesmith.data import builtin_corpus

        feeds = tokenize(model.tokenizer, builtin_corpus(limit=batch), input_names=list(input_names), seq=seq)
        return tuple(torch.from_numpy(feeds[n]) for n in input_names)
    limits = config_limits(model)
    if limits["vocab_size"] and limits["vocab_size"] > 1:
        lengths = [seq - 3 * (batch - 1 - row) for row in range(batch)]
        feeds = id_feeds(np.random.default_rng(0), lengths, seq, input_names, vocab_size=limits["vocab_size"],
                         pad_token_id=limits["pad_token_id"])
        return tuple(torch.from_numpy(feeds[n]) for n in input_names)
    return tuple(torch.ones((batch, seq), dtype=torch.long) for _ in input_names)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings, log lines (torchvision absent, axis renames, ...) and
    its prints (torch.export prints the partial graph of a failed trace to stderr); what it
    printed goes to this module's debug log."""
    captured = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if captured.getvalue().strip():
            log.debug("exporter output:\n%s", captured.getvalue())


def export_graph(module, path: Path, *, input_names: Sequence[str], output_name: str, example: tuple,
                 opset: int | None, label: str) -> None:
    """torch.onnx.export (dynamo) into one file with dynamic batch and sequence axes, then the
    full onnx checker. A failure is one line naming the model and the exporter's reason."""
    import onnx
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = (tuple({0: batch, 1: seq} for _ in input_names),)
    wrapper = wrap_module(module, input_names, output_name)
    options: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=list(input_names),
                              output_names=[output_name], dynamic_shapes=dynamic, external_data=False,
                              verbose=False, report=False, **options)
    except Exception as exc:  # the exporter raises many types; the user gets its reason in one line
        if no_space_cause(exc) is not None:  # a full disk is not the exporter's fault: no attention hint
            raise no_space(path, exc) from exc
        raise BadInput(f"export of {label} to ONNX failed: {root_cause(exc)} "
                       "(try attention='sdpa' or another opset; --debug shows the exporter's trace)") from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several checker/inference error types
        if no_space_cause(exc) is not None:
            raise no_space(path, exc) from exc
        raise EdgesmithError(f"export of {label}: the ONNX graph fails onnx.checker ({first_line(exc)})") from exc


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps the real reason in layers."""
    seen = exc
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {first_line(seen)}"


def write_companions(model: TorchModel, folder: Path) -> None:
    """config.json and tokenizer files beside model.onnx (a deployable, Optimum-like folder; the
    tokenizer's class named so that transformers 4, Optimum's, loads it too)."""
    try:
        if model.config is not None:
            model.config.save_pretrained(str(folder))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(folder))
            portable_tokenizer_class(folder)
    except OSError as exc:
        if no_space_cause(exc) is not None:
            raise no_space(folder, exc) from exc
        raise


def attention_shape(module) -> dict[str, Any]:
    """Head count and attention width as they really are in the module (head-pruned or not).

    Read from the attention modules (BERT-like ``num_attention_heads``/``all_head_size``; GPT-2
    and Llama-like ``num_heads``/``head_dim``), falling back to the config. A value that differs
    between layers is recorded as a per-layer list.
    """
    heads: list[int] = []
    widths: list[int] = []
    for sub in module.modules():
        if hasattr(sub, "num_attention_heads") and hasattr(sub, "all_head_size"):
            heads.append(int(sub.num_attention_heads))
            widths.append(int(sub.all_head_size))
        elif hasattr(sub, "num_heads") and hasattr(sub, "head_dim") and isinstance(getattr(sub, "num_heads"), int):
            heads.append(int(sub.num_heads))
            widths.append(int(sub.num_heads) * int(sub.head_dim))
    config = getattr(module, "config", None)
    if not heads and config is not None:
        heads = [getattr(config, "num_attention_heads", None)]
        widths = [getattr(config, "hidden_size", None)]
    if not heads:
        return {}

    def _one(values: list) -> Any:
        return values[0] if len(set(values)) == 1 else values

    return {"num_attention_heads": _one(heads), "hidden_size": _one(widths)}


def export_meta(model: TorchModel, module, path: Path, attention: str) -> dict[str, Any]:
    import onnx
    import torch

    graph = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    config = model.config
    meta: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None) or type(model.module).__name__,
        "opset": opset,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "attention": attention if model.is_huggingface else None,
        "source_hash": model.content_hash(),
    }
    meta.update(attention_shape(module))
    if config is not None and getattr(config, "hidden_size", None) is not None:
        meta["model_hidden_size"] = int(config.hidden_size)
    return meta


