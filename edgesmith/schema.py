"""Schema helpers every layer uses: a strict pydantic base (unknown keys refused), pydantic errors as
one line that names the key (and, for an unknown key, the allowed ones), and YAML reading that
names the line of a syntax error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from edgesmith.errors import BadInput, dangling_link, first_line


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


def describe_validation_error(exc: ValidationError, where: str, cls: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(cls.model_fields)) if cls is not None else ""
        hint = f"; allowed keys: {allowed}" if allowed else ""
        return f"{where}: unknown key '{loc}'{hint}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{loc}'"
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if loc == "(top level)" else f"{where}: '{loc}': {msg}"
    return f"{where}: '{loc}': {err['msg']} (got {err.get('input')!r})"


def model_at(root: type[BaseModel], exc: ValidationError) -> type[BaseModel] | None:
    """The pydantic model at the error's location, so an unknown key lists its siblings."""
    model: type[BaseModel] | None = root
    for part in exc.errors()[0]["loc"][:-1]:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return model


def read_yaml(path: Path, missing: str) -> Any:
    """The YAML (or JSON) document at ``path``; :class:`BadInput` with ``missing`` when there is no
    such file, or naming the line of a syntax error."""
    if not path.exists():
        raise dangling_link(path) or BadInput(missing)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, or not text
        raise BadInput(f"{path}: cannot read it as YAML text ({first_line(exc, 120)})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{path}{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
