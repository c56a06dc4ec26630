"""``edgesmith doctor``: which runtimes and devices are usable here, and why not."""

from __future__ import annotations

import typer
from rich.table import Table

from edgesmith.cli.app import app
from edgesmith.cli.common import JSON_OUT, console, print_json


def diagnose() -> list[dict]:
    from edgesmith.runtimes.base import available_runtimes

    rows = []
    for name, cls in available_runtimes().items():
        avail = cls().availability()
        rows.append({"runtime": name, "usable": avail.usable, "version": avail.version, "devices": avail.devices,
                     "reason": avail.reason})
    rows.extend(_gpu_rows())
    return rows


def _gpu_rows() -> list[dict]:
    import torch

    rows = []
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append({"runtime": "torch-cuda", "usable": True, "version": torch.version.cuda, "devices": names,
                     "reason": ""})
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device visible"
        rows.append({"runtime": "torch-cuda", "usable": False, "version": None, "devices": [], "reason": why})
    try:
        import onnxruntime as ort

        listed = ort.get_available_providers()
        for provider, label in (("CUDAExecutionProvider", "onnxruntime-cuda"),
                                ("TensorrtExecutionProvider", "onnxruntime-tensorrt")):
            if provider not in listed:
                rows.append({"runtime": label, "usable": False, "version": ort.__version__, "devices": [],
                             "reason": f"{provider} is not in this ONNX Runtime build (install edgesmith[gpu])"})
            elif not torch.cuda.is_available():
                rows.append({"runtime": label, "usable": False, "version": ort.__version__, "devices": [],
                             "reason": f"{provider} is compiled in, but no CUDA device is visible (it would fall back to CPU)"})
            else:
                rows.append({"runtime": label, "usable": True, "version": ort.__version__, "devices": ["cuda"],
                             "reason": ""})
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        rows.append({"runtime": "tensorrt", "usable": torch.cuda.is_available(), "version": tensorrt.__version__,
                     "devices": [], "reason": "" if torch.cuda.is_available() else "no CUDA device visible"})
    except ImportError:
        rows.append({"runtime": "tensorrt", "usable": False, "version": None, "devices": [],
                     "reason": "the tensorrt package is not installed (its wheels come from NVIDIA's package index)"})
    return rows


@app.command("doctor")
def doctor_command(as_json: bool = JSON_OUT) -> None:
    """List each runtime as usable, or unusable with the reason."""
    rows = diagnose()
    if as_json:
        print_json(rows)
        return
    table = Table(title="edgesmith doctor")
    for col in ("runtime", "usable", "version", "devices / reason"):
        table.add_column(col)
    for row in rows:
        detail = ", ".join(row["devices"]) if row["usable"] else row["reason"]
        table.add_row(row["runtime"], "[green]yes[/]" if row["usable"] else "[red]no[/]", row["version"] or "-", detail)
    console.print(table)
