"""Device targets: a device class and how to run on it, as YAML files.

A target names the runtime and execution provider, threads, the precisions the device supports,
the shapes to profile by default, how to reach it (``local``, or an SSH destination: a host alias
from the user's ``~/.ssh/config``, ``user@host``, ``user@host:port`` or ``ssh://user@host:port``),
the SSH settings edgesmith may need (a config file, extra options, the device's Python) and the
published peak figures a roofline estimate uses.

Targets are read from the files shipped in this folder, then ``~/.config/edgesmith/targets/``
(``$XDG_CONFIG_HOME`` honoured), then any ``--targets-dir``; a later file with the same name
replaces an earlier one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.errors import BadInput, first_line
from edgesmith.schema import StrictModel, describe_validation_error, read_yaml

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent
LOCAL = "local"
Precision = Literal["fp32", "fp16", "int8"]
RuntimeName = Literal["onnxruntime", "tensorrt"]
ProviderName = Literal["cpu", "cuda", "tensorrt"]


_Strict = StrictModel


class ShapeSpec(_Strict):
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)


class Alternative(_Strict):
    runtime: RuntimeName
    provider: ProviderName


class Peak(_Strict):
    """Published (or datasheet-derived, see the file's comments) peak figures, dense."""

    fp32_tflops: float = Field(gt=0)
    fp16_tflops: float | None = Field(default=None, gt=0)
    int8_tops: float | None = Field(default=None, gt=0)
    memory_bandwidth_gbs: float = Field(gt=0, description="GB/s (10^9 bytes per second)")

    def compute(self, precision: str) -> tuple[float, str]:
        """Peak operations per second for ``precision`` and the precision it really used
        (a device without an fp16 or int8 figure falls back to the next one it has)."""
        order = {"int8": ["int8", "fp16", "fp32"], "fp16": ["fp16", "fp32"]}.get(precision, ["fp32"])
        for p in order:
            value = {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "int8": self.int8_tops}[p]
            if value:
                return value * 1e12, p
        return self.fp32_tflops * 1e12, "fp32"


class Target(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    runtime: RuntimeName = "onnxruntime"
    provider: ProviderName = "cpu"
    alternatives: list[Alternative] = Field(default_factory=list)
    threads: int | None = Field(default=None, ge=1)
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32"], min_length=1)
    shapes: list[ShapeSpec] = Field(default_factory=lambda: [ShapeSpec(batch=1, seq=128)], min_length=1)
    host: str | None = Field(default=None, description="'local', an SSH destination, or null: given with --host")
    python: str = Field(default="python3", description="the device's Python (an absolute path is the surest)")
    ssh_config: str | None = Field(default=None, description="an ssh config file (ssh -F)")
    ssh_options: list[str] = Field(default_factory=list, description="extra `ssh -o` options, e.g. 'Port=2222'")
    connect_timeout_s: int = Field(default=10, ge=1)
    timeout_s: float = Field(default=900.0, gt=0, description="longest a profile on the device may take")
    cache_dir: str = Field(default=".cache/edgesmith-device",
                           description="device folder for artifacts and engines (relative: under the login's home)")
    trtexec: str | None = Field(default=None, description="trtexec on the device (TensorRT targets)")
    peak: Peak | None = None

    @field_validator("ssh_options")
    @classmethod
    def _options_are_key_value(cls, value: list[str]) -> list[str]:
        for option in value:
            if not re.match(r"^[A-Za-z][A-Za-z0-9]*[= ].+", option):
                raise ValueError(f"ssh option '{option}' is not 'Name=value'")
        return value

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL

    def runtimes(self) -> list[Alternative]:
        return [Alternative(runtime=self.runtime, provider=self.provider), *self.alternatives]


def user_targets_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgesmith" / "targets"


def _read_target(path: Path) -> Target:
    try:
        data = read_yaml(path, f"target file {path} not found")
    except OSError as exc:
        raise BadInput(f"target file {path}: cannot read it ({first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise BadInput(f"target file {path}: expected a mapping of fields (name, runtime, provider, ...)")
    data.setdefault("name", path.stem)
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        raise BadInput(describe_validation_error(exc, f"target file {path}", Target)) from exc


def target_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    return [BUILTIN_DIR, user_targets_dir(), *(Path(d).expanduser() for d in extra)]


def load_targets(extra_dirs: Sequence[str | Path] = ()) -> dict[str, Target]:
    """Every target by name (shipped, then the user's, then ``extra_dirs``; later ones win)."""
    for folder in extra_dirs:
        if not Path(folder).expanduser().is_dir():
            raise BadInput(f"targets folder {folder} does not exist; give a folder of target .yaml files")
    targets: dict[str, Target] = {}
    for folder in target_dirs(extra_dirs):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            target = _read_target(path)
            if target.name in targets:
                log.info("target %s from %s replaces an earlier one", target.name, path)
            targets[target.name] = target
    return targets


def ssh_destination(text: str) -> str:
    """What ``ssh`` takes: an alias or ``user@host`` as is; ``user@host:port`` as ``ssh://user@host:port``."""
    if text.startswith("ssh://"):
        return text
    if re.match(r"^[^@/\s]+@[^:@/\s]+:\d+$", text) or re.match(r"^[^:@/\s]+:\d+$", text):
        return f"ssh://{text}"
    return text


def get_target(spec: str, *, host: str | None = None, extra_dirs: Sequence[str | Path] = ()) -> Target:
    """A target by name, or ``ssh://[user@]host[:port]`` (an ONNX Runtime CPU device reached by ssh).

    ``host`` overrides where the target is reached (``--host``).
    """
    if spec.startswith("ssh://"):
        base = load_targets(extra_dirs).get("cpu-local") or Target(name="cpu-local")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.removeprefix("ssh://")).strip("-") or "ssh"
        target = base.model_copy(update={"name": f"ssh-{safe}", "description": f"ONNX Runtime CPU on {spec}",
                                         "host": spec, "threads": None, "peak": None})
    else:
        targets = load_targets(extra_dirs)
        if spec not in targets:
            raise BadInput(f"unknown target '{spec}'; known: {', '.join(sorted(targets))} "
                           "(list them with `edgesmith targets`, or add a YAML file with --targets-dir)")
        target = targets[spec]
    if host is not None:
        target = target.model_copy(update={"host": LOCAL if host == LOCAL else ssh_destination(host)})
    return target
