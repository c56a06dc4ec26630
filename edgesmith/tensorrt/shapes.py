"""TensorRT optimization profiles: ``batch=1:8:32,seq=16:128:256`` parsed into (min, opt, max)
shapes for each graph input, checked against the model's maximum positions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import BadInput

#: the canonical dimension names a shape spec uses, and the graph dimension names each stands for
DIM_ALIASES: dict[str, tuple[str, ...]] = {
    "batch": ("batch", "batch_size", "n"),
    "seq": ("seq", "sequence", "sequence_length", "seq_len", "seqlen"),
}
#: a graph input's axis -> canonical dimension when the graph leaves a dynamic axis unnamed
POSITIONAL_DIMS = ("batch", "seq")

# Shape profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def holds(self, value: int) -> bool:
        return self.min <= value <= self.max


ShapeProfile = dict[str, DimRange]
ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def canonical_dim(name: str) -> str | None:
    low = name.strip().lower()
    for canonical, aliases in DIM_ALIASES.items():
        if low in aliases:
            return canonical
    return None


def _parse_range(dim: str, text: str, spec: str) -> DimRange:
    pieces = text.split(":")
    if len(pieces) not in (1, 3) or not all(p.strip().isdigit() for p in pieces):
        raise BadInput(f"shape spec '{spec}': {dim}={text} is not N or MIN:OPT:MAX with whole numbers "
                       "(example: batch=1:8:32,seq=16:128:256)")
    values = [int(p) for p in pieces]
    lo, opt, hi = (values * 3)[:3] if len(values) == 1 else values
    if lo < 1:
        raise BadInput(f"shape spec '{spec}': {dim} must be at least 1 (got {lo})")
    if not lo <= opt <= hi:
        raise BadInput(f"shape spec '{spec}': {dim}={text} needs MIN <= OPT <= MAX")
    return DimRange(lo, opt, hi)


def parse_shapes(spec: str) -> ShapeProfile:
    """One profile: ``batch=1:8:32,seq=16:128:256`` -> {"batch": DimRange(1, 8, 32), "seq": ...}."""
    if not spec or not spec.strip():
        raise BadInput("empty shape spec; give e.g. batch=1:8:32,seq=16:128:256")
    profile: ShapeProfile = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise BadInput(f"shape spec '{spec}': '{part}' is not NAME=RANGE (example: batch=1:8:32)")
        dim = canonical_dim(name)
        if dim is None:
            known = ", ".join(a for aliases in DIM_ALIASES.values() for a in aliases)
            raise BadInput(f"shape spec '{spec}': unknown dimension '{name.strip()}'; use one of: {known}")
        if dim in profile:
            raise BadInput(f"shape spec '{spec}': {dim} is given twice")
        profile[dim] = _parse_range(dim, value.strip(), spec)
    return profile


def parse_profiles(specs: list[str] | str) -> list[ShapeProfile]:
    """Several profiles: a list of specs, or one string with profiles separated by ';'."""
    items = [specs] if isinstance(specs, str) else list(specs)
    parts = [p for item in items for p in item.split(";") if p.strip()]
    if not parts:
        raise BadInput("no shape profile given; give e.g. --shapes batch=1:8:32,seq=16:128:256")
    return [parse_shapes(p) for p in parts]


def graph_input_dims(onnx_path: str | Path) -> dict[str, list[int | str | None]]:
    """Each graph input's dimensions: an int (fixed), the dimension's name, or None (unnamed)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    dims: dict[str, list[int | str | None]] = {}
    for value in graph.input:
        if value.name in weights:
            continue
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]
    return dims


def derive_input_shapes(dims: dict[str, list[int | str | None]], profile: ShapeProfile) -> dict[str, ShapeTriple]:
    """(min, opt, max) shape of every input under one profile. A dynamic axis is matched by its
    name (``batch``, ``sequence``...) or, unnamed or unknown, by its position (0: batch, 1: seq); a
    fixed axis must agree with the profile when the profile names that dimension."""
    shapes: dict[str, ShapeTriple] = {}
    for name, axes in dims.items():
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(axes):
            canonical = canonical_dim(dim) if isinstance(dim, str) else None
            if canonical is None and axis < len(POSITIONAL_DIMS):
                canonical = POSITIONAL_DIMS[axis]
            if isinstance(dim, int) and dim > 0:
                rng = profile.get(canonical) if canonical else None
                if rng is not None and (rng.min, rng.max) != (dim, dim):
                    raise BadInput(f"input {name} has a fixed {canonical} of {dim}, the shape profile asks "
                                   f"{canonical}={rng}; give {canonical}={dim} or export with a dynamic {canonical}")
                lo.append(dim), opt.append(dim), hi.append(dim)
                continue
            if canonical is None or canonical not in profile:
                what = f"'{dim}'" if isinstance(dim, str) else f"axis {axis}"
                need = canonical or dim or f"axis {axis}"
                raise BadInput(f"input {name}: dynamic dimension {what} has no range in the shape profile; "
                               f"add {need}=MIN:OPT:MAX to --shapes")
            rng = profile[canonical]
            lo.append(rng.min), opt.append(rng.opt), hi.append(rng.max)
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def max_positions(folder: Path) -> int | None:
    """``max_position_embeddings`` from the model's config.json, when the folder has one."""

    config = folder / "config.json"
    if not config.exists():
        return None
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (ValueError, OSError):
        return None
    return int(value) if isinstance(value, int) else None


def check_profiles_fit(profiles: list[ShapeProfile], limit: int | None) -> None:
    if limit is None:
        return
    for profile in profiles:
        seq = profile.get("seq")
        if seq is not None and seq.max > limit:
            raise BadInput(f"shape profile asks seq up to {seq.max}, the model has only {limit} positions "
                           f"(max_position_embeddings); give seq=MIN:OPT:{limit} or less")


