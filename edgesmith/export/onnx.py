"""Export a TorchModel to ONNX (torch.onnx, dynamo exporter) and prove the graph matches its source.

The export pass writes an Optimum-like folder: ``model.onnx`` (one file, dynamic ``batch`` and
``sequence`` axes, named inputs such as ``input_ids``/``attention_mask``/``token_type_ids`` and one
named output: ``last_hidden_state`` or ``logits``), ``config.json`` and the tokenizer files. It then
runs the source module and the graph side by side on real sentences (:func:`compare_outputs`)
and refuses the export (:class:`~edgesmith.errors.ValidationFailed`, exit 3) when they disagree.

The models are exported with eager attention by default: under the dynamo exporter the SDPA path
gives wrong values on left-padded positions of decoders, and eager graphs run faster in ONNX
Runtime. The input module is never touched: a deep copy is switched and exported.

Probes (see :func:`probe_feeds`): for each batch size in ``batches``, one batch padded to its
longest text, and one padded (or truncated) to each fixed length in ``seq_lengths``. The texts of a
batch are picked across the length range of the corpus (single sentences and short paragraphs of
joined sentences), so every batch of more than one row has padded positions. Models of the
``text-generation`` task are probed with left padding as well.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgesmith.artifacts import ONNX_FILE, Artifact, OnnxModel, TorchModel
from edgesmith.errors import BadInput, EdgesmithError, ValidationFailed, first_line
from edgesmith.inputs import attention_mask_of, tokenize
from edgesmith.passes import Context, Pass, PassConfig, register

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 3)
DEFAULT_SEQ_LENGTHS = (48,)
#: sentences of the corpus used to build probe texts
PROBE_POOL = 256
#: sentences joined into one "paragraph" probe text, so that probes reach longer sequences
PARAGRAPH_SIZES = (3, 6)
#: shape of the example inputs the graph is traced with (batch, sequence); neither may be 0 or 1,
#: or torch.export specialises the axis
TRACE_SHAPE = (2, 16)

class ExportConfig(PassConfig):
    """How to export and how close the graph must stay to its source.

    ``probe_batches`` and ``probe_seq_lengths`` give the probe shapes: each batch size once padded
    to its longest text and once per fixed length (see the module's docstring).
    """

    opset: int | None = None  # None: the exporter's default (20 for torch 2.13's dynamo exporter)
    atol: float = 1e-3  # max abs diff allowed on non-padded positions
    min_cosine: float = 0.9999  # min cosine of mean-pooled rows (pooled with the attention mask)
    attention: Literal["eager", "sdpa"] = "eager"
    probe_batches: list[int] = list(DEFAULT_BATCHES)
    probe_seq_lengths: list[int] = list(DEFAULT_SEQ_LENGTHS)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


@register
class ExportPass(Pass):
    """TorchModel -> OnnxModel with dynamic batch and sequence axes, validated against the source."""

    name = "export"
    config_class = ExportConfig
    accepts = (TorchModel,)
    returns = OnnxModel
    description = "export to ONNX (torch.onnx dynamo exporter) and validate against the torch model"

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, TorchModel)
        cfg: ExportConfig = self.config  # type: ignore[assignment]
        folder = ctx.scratch("export")
        module = prepare_module(artifact, cfg.attention)
        input_names = artifact.input_names
        output = artifact.output_names[0]
        export_graph(module, folder / ONNX_FILE, input_names=input_names, output_name=output,
                     example=example_inputs(artifact, input_names), opset=cfg.opset, label=artifact.name)
        write_companions(artifact, folder)
        meta = {**copy.deepcopy(artifact.meta), **export_meta(artifact, module, folder / ONNX_FILE, cfg.attention)}
        candidate = OnnxModel(task=artifact.task, name=artifact.name, lineage=copy.deepcopy(artifact.lineage),
                              meta=meta, folder=folder)
        try:
            result = validate(artifact, candidate, cfg.atol, cfg.min_cosine, texts=ctx.corpus(PROBE_POOL),
                              batches=cfg.probe_batches, seq_lengths=cfg.probe_seq_lengths)
        except ValidationFailed:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        ctx.report.update(result)
        ctx.report["size_bytes"] = candidate.size_bytes()
        log.info("exported %s to ONNX: max abs diff %.2e, min cosine %.6f", artifact.name,
                 result["max_abs"], result["min_cosine"])
        return candidate


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
    """Real token ids of TRACE_SHAPE (with some padding) when a tokenizer is there, else ones."""
    import torch

    batch, seq = TRACE_SHAPE
    if model.tokenizer is not None:
        from edgesmith.data import builtin_corpus

        feeds = tokenize(model.tokenizer, builtin_corpus(limit=batch), input_names=list(input_names), seq=seq)
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
        raise BadInput(f"export of {label} to ONNX failed: {root_cause(exc)} "
                       "(try attention='sdpa' or another opset; --debug shows the exporter's trace)") from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several checker/inference error types
        raise EdgesmithError(f"export of {label}: the ONNX graph fails onnx.checker ({first_line(exc)})") from exc


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps the real reason in layers."""
    seen = exc
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {first_line(seen)}"


def write_companions(model: TorchModel, folder: Path) -> None:
    """config.json and tokenizer files beside model.onnx (a deployable, Optimum-like folder)."""
    if model.config is not None:
        model.config.save_pretrained(str(folder))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))


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


# ---------------------------------------------------------------------------------------------
# Validation (public: the quantize pass measures fidelity with compare_outputs too)
# ---------------------------------------------------------------------------------------------


def probe_texts(texts: Sequence[str]) -> list[str]:
    """Real sentences plus short paragraphs of joined sentences, sorted by length."""
    pool = [t for t in dict.fromkeys(texts) if t.strip()]
    if not pool:
        raise BadInput("no texts to probe the models with; give data with at least one text")
    joined = [" ".join(pool[i:i + size]) for size in PARAGRAPH_SIZES for i in range(0, len(pool) - size + 1, size)]
    return sorted(pool + joined, key=len)


def pick_batch(pool: Sequence[str], batch: int, shift: int) -> list[str]:
    """``batch`` texts spread across the length range (so a batch has padded positions)."""
    n = len(pool)
    return [pool[(int((j + 0.5) * n / batch) + shift) % n] for j in range(batch)]


def probe_feeds(tokenizer, texts: Sequence[str], input_names: Sequence[str], *, batches: Sequence[int],
                seq_lengths: Sequence[int], left_padding: bool) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """The probes: (description, feeds) for each batch size × (longest, each fixed length) ×
    padding sides."""
    pool = probe_texts(texts)
    sides = ["right", "left"] if left_padding else [tokenizer.padding_side or "right"]
    probes = []
    shift = 0
    for batch in batches:
        if batch < 1:
            raise BadInput(f"probe batch size must be at least 1, got {batch}")
        for seq in [None, *seq_lengths]:
            rows = pick_batch(pool, batch, shift)
            shift += 7
            for side in sides:
                tok = copy.copy(tokenizer)
                tok.padding_side = side
                feeds = tokenize(tok, rows, input_names=list(input_names), seq=seq)
                mask = attention_mask_of(feeds)
                desc = {"batch": int(mask.shape[0]), "seq": int(mask.shape[1]), "padding": side,
                        "padded_positions": int(mask.size - mask.sum())}
                probes.append((desc, feeds))
    return probes


def _pick_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    return outputs[name] if name in outputs else next(iter(outputs.values()))


def measure(ref: np.ndarray, cand: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Max/mean abs diff over non-padded positions and min cosine of mask-mean-pooled rows.

    ``(batch, seq, ...)`` outputs are masked and pooled; ``(batch, classes)`` outputs (logits of a
    classifier) are compared as they are.
    """
    ref = ref.astype(np.float64)
    cand = cand.astype(np.float64)
    diff = np.abs(ref - cand)
    if ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        kept = diff[keep]
        weights = mask.reshape(mask.shape + (1,) * (ref.ndim - 2)).astype(np.float64)
        axes = (1,)
        counts = np.maximum(weights.sum(axis=1), 1.0)
        ref_rows = ((ref * weights).sum(axis=axes) / counts).reshape(ref.shape[0], -1)
        cand_rows = ((cand * weights).sum(axis=axes) / counts).reshape(ref.shape[0], -1)
    else:
        kept = diff.reshape(-1)
        ref_rows = ref.reshape(ref.shape[0], -1)
        cand_rows = cand.reshape(cand.shape[0], -1)
    norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(cand_rows, axis=1)
    cosine = (ref_rows * cand_rows).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"max_abs": float(kept.max()) if kept.size else 0.0,
            "mean_abs": float(kept.mean()) if kept.size else 0.0,
            "min_cosine": float(cosine.min()),
            "values": int(kept.size)}


def compare_outputs(reference: Artifact, candidate: Artifact, *, texts: list[str] | None = None,
                    batches: Sequence[int] = DEFAULT_BATCHES, seq_lengths: Sequence[int] = DEFAULT_SEQ_LENGTHS,
                    left_padding: bool | None = None, tokenizer: Any = None, threads: int | None = None,
                    accept: Callable[[dict], bool] | None = None) -> dict:
    """Run both artifacts on the same probe inputs and measure how far the candidate is.

    Each artifact runs on its default runtime (torch for a TorchModel, ONNX Runtime for an
    OnnxModel). ``texts`` default to the shipped WordNet corpus; ``left_padding`` defaults to
    True for text-generation. ``accept`` (given a probe's description: batch, seq, padding) keeps
    only the probes a candidate can run, such as the shapes a TensorRT engine was built for. Returns ``max_abs`` and ``mean_abs`` over non-padded positions,
    ``min_cosine`` of mask-mean-pooled rows, the output compared, and the same per probe.
    """
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    tokenizer = tokenizer or reference.tokenizer or candidate.tokenizer
    if tokenizer is None:
        raise BadInput(f"neither {reference.name} nor {candidate.name} has a tokenizer to make probe inputs; "
                       "save one beside the model (tokenizer.save_pretrained)")
    if texts is None:
        from edgesmith.data import builtin_corpus

        texts = builtin_corpus(limit=PROBE_POOL)
    if left_padding is None:
        left_padding = reference.task == "text-generation"
    names = list(dict.fromkeys([*reference.input_names, *candidate.input_names]))
    output = reference.output_names[0]
    probes = probe_feeds(tokenizer, texts, names, batches=batches, seq_lengths=seq_lengths,
                         left_padding=left_padding)
    if accept is not None:
        probes = [(desc, feeds) for desc, feeds in probes if accept(desc)]
        if not probes:
            raise BadInput(f"no probe input of {candidate.name} lies within the shapes it accepts; widen its shapes")
    ref_session = get_runtime(default_runtime_for(reference)).load(reference, threads=threads)
    cand_session = get_runtime(default_runtime_for(candidate)).load(candidate, threads=threads)
    results = []
    try:
        for desc, feeds in probes:
            ref = _pick_output(ref_session.run(feeds), output)
            cand = _pick_output(cand_session.run(feeds), output)
            if ref.shape != cand.shape:
                raise ValidationFailed(f"{candidate.name} gives output shape {cand.shape} where {reference.name} "
                                       f"gives {ref.shape} on probe batch={desc['batch']} seq={desc['seq']}")
            results.append({**desc, **measure(ref, cand, attention_mask_of(feeds))})
    finally:
        ref_session.close()
        cand_session.close()
    return summarize(results, output)


def summarize(probes: list[dict], output: str) -> dict:
    values = sum(p["values"] for p in probes)
    mean_abs = sum(p["mean_abs"] * p["values"] for p in probes) / max(values, 1)
    return {
        "output": output,
        "max_abs": float(np.max([p["max_abs"] for p in probes])),  # NaN propagates
        "mean_abs": mean_abs,
        "min_cosine": float(np.min([p["min_cosine"] for p in probes])),
        "probes": probes,
    }


def _where(probe: dict) -> str:
    return f"probe batch={probe['batch']} seq={probe['seq']} ({probe['padding']} padding)"


def validate(reference: Artifact, candidate: Artifact, atol: float = 1e-3, min_cosine: float = 0.9999, *,
             label: str = "export", **kw: Any) -> dict:
    """:func:`compare_outputs`, then :class:`ValidationFailed` (one line with the numbers) when
    the max abs diff exceeds ``atol`` or a pooled row's cosine falls below ``min_cosine``.
    NaN counts as a failure. Returns the comparison when it holds."""
    result = compare_outputs(reference, candidate, **kw)
    problems = []
    worst_abs = max(result["probes"], key=lambda p: _nan_high(p["max_abs"]))
    if not result["max_abs"] <= atol:
        problems.append(f"max abs diff {worst_abs['max_abs']:.3g} > atol {atol:g} on {_where(worst_abs)}")
    worst_cos = min(result["probes"], key=lambda p: _nan_low(p["min_cosine"]))
    if not result["min_cosine"] >= min_cosine:
        problems.append(f"min cosine {worst_cos['min_cosine']:.6f} < {min_cosine:g} on {_where(worst_cos)}")
    if problems:
        raise ValidationFailed(f"{label} of {reference.name} fails validation: " + "; ".join(problems)
                               + f" (mean abs diff {result['mean_abs']:.3g} over {len(result['probes'])} probes)")
    return result


def _nan_high(value: float) -> float:
    return float("inf") if np.isnan(value) else value


def _nan_low(value: float) -> float:
    return float("-inf") if np.isnan(value) else value
