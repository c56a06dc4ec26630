"""``edgesmith doctor``: which runtimes and devices are usable here, and why not."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from edgesmith.cli.common import JSON_OUT, console, print_json
from edgesmith.cli.root import app
from edgesmith.errors import first_line


def diagnose() -> list[dict]:
    from edgesmith.runtimes.base import available_runtimes

    rows = []
    for name, cls in available_runtimes().items():
        if name == "tensorrt":  # listed with the GPU rows, with the reason it is unusable
            continue
        avail = cls().availability()
        rows.append({"runtime": name, "usable": avail.usable, "version": avail.version, "devices": avail.devices,
                     "reason": avail.reason})
    rows.extend(_gpu_rows())
    return rows


def _row(runtime: str, usable: bool, version: str | None, devices: list[str] | None = None, reason: str = "") -> dict:
    return {"runtime": runtime, "usable": usable, "version": version, "devices": devices or [], "reason": reason}


def _gpu_rows() -> list[dict]:
    from edgesmith.tensorrt.identity import gpu_identity

    gpu_name, capability = gpu_identity()
    gpu = f"{gpu_name} (compute capability {capability})" if gpu_name else None
    return [_torch_cuda_row(), *_ort_gpu_rows(gpu), _tensorrt_row(gpu), _trtexec_row(gpu)]


def _torch_cuda_row() -> dict:
    import torch

    if torch.version.cuda is None:
        return _row("torch-cuda", False, None, reason=f"torch {torch.__version__} is a CPU build; install a CUDA build")
    if not torch.cuda.is_available():
        return _row("torch-cuda", False, torch.version.cuda,
                    reason="no CUDA device visible (driver missing, or CUDA_VISIBLE_DEVICES empty)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return _row("torch-cuda", True, torch.version.cuda, names)


def _probe_model() -> bytes:
    """A one-node ONNX graph (Identity) to see whether a provider really loads."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _provider_loads(ort, provider: str) -> str:
    """"" when a session on ``provider`` really runs on it, else why not (ONNX Runtime falls back
    to the CPU silently when the CUDA or TensorRT libraries cannot be loaded)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        session = ort.InferenceSession(_probe_model(), sess_options=so, providers=[provider, "CPUExecutionProvider"])
    except Exception as exc:
        return f"{provider} failed to start: {first_line(exc)[:200]}"
    if session.get_providers()[0] != provider:
        return (f"{provider} is compiled in but its libraries are not loadable (a session fell back to "
                f"{session.get_providers()[0]}); install the CUDA/cuDNN/TensorRT libraries it needs")
    return ""


def _ort_gpu_rows(gpu: str | None) -> list[dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        reason = "onnxruntime is not installed: pip install 'edgesmith[gpu]' (onnxruntime-gpu)"
        return [_row("onnxruntime-cuda", False, None, reason=reason), _row("onnxruntime-tensorrt", False, None,
                                                                           reason=reason)]
    listed = ort.get_available_providers()
    rows = []
    for provider, label in (("CUDAExecutionProvider", "onnxruntime-cuda"),
                            ("TensorrtExecutionProvider", "onnxruntime-tensorrt")):
        if provider not in listed:
            rows.append(_row(label, False, ort.__version__,
                             reason=f"{provider} is not in this ONNX Runtime build (install edgesmith[gpu]: "
                                    "onnxruntime-gpu, never beside onnxruntime)"))
        elif gpu is None:
            rows.append(_row(label, False, ort.__version__,
                             reason=f"{provider} is compiled in, but no CUDA device is visible (it would fall back "
                                    "to the CPU)"))
        else:
            why = _provider_loads(ort, provider)
            rows.append(_row(label, not why, ort.__version__, [gpu] if not why else [], why))
    return rows


def _tensorrt_row(gpu: str | None) -> dict:
    from edgesmith.errors import BadInput
    from edgesmith.tensorrt.identity import tensorrt_version
    from edgesmith.tensorrt.precision import typing_for_version
    from edgesmith.tensorrt.runtime import TensorRTRuntime

    avail = TensorRTRuntime().availability()
    if avail.usable:
        note = ""
        if typing_for_version(avail.version) == "strong":
            note = ("strongly typed (TensorRT 11+): fp16/bf16 engines are built from a graph converted to that "
                    "precision first; int8/fp8 from Q/DQ graphs")
        return _row("tensorrt", True, avail.version, avail.devices, note)
    reason = avail.reason
    if avail.version is None and gpu is None:
        reason += "; no CUDA device visible either"
    try:
        version = avail.version or tensorrt_version()
    except BadInput:
        version = None
    return _row("tensorrt", False, version, reason=reason)


def _trtexec_row(gpu: str | None) -> dict:
    import shutil

    found = shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",) if shutil.which(p)), None)
    if found is None:
        return _row("trtexec", False, None, reason="trtexec is not on PATH (JetPack ships it at "
                                                   "/usr/src/tensorrt/bin/trtexec); export --backend trtexec needs it")
    if gpu is None:
        return _row("trtexec", False, None, [found], reason=f"{found} is here, but no CUDA device is visible")
    return _row("trtexec", True, None, [found, gpu])


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
        detail = row["reason"]
        if row["usable"]:  # a usable row's reason is a note (TensorRT's typing)
            detail = "; ".join(part for part in (", ".join(row["devices"]), row["reason"]) if part)
        table.add_row(row["runtime"], "[green]yes[/]" if row["usable"] else "[red]no[/]", row["version"] or "-",
                      escape(detail))
    console.print(table)
