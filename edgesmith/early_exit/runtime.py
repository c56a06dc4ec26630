"""The early-exit controller, on ONNX Runtime or PyTorch, at any batch size.

The controller runs the first segment on the whole batch, applies the policy to each sample, and
continues with the samples that have not exited only: their hidden states (and attention-mask
rows) are gathered into a smaller batch for the next segment. Each sample's result is the output
of the exit it left at; ``exit_layer`` says how many layers it went through. Decisions depend only
on a sample's own outputs, so the result equals what the unsegmented model gives under the same
policy (:func:`edgesmith.early_exit.policy.simulate`), whatever the batch.

The session keeps count of the exits taken and of the time spent in each segment, which a profile
records (:meth:`EarlyExitSession.exit_stats`).

Both ``get_runtime("onnxruntime")`` and ``get_runtime("torch")`` load an ``EarlyExitModel`` into
these sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import EXIT_TORCH_DIR, Artifact, EarlyExitModel
from edgesmith.early_exit.policy import ExitPolicy, ExitState
from edgesmith.errors import BadInput, first_line
from edgesmith.inputs import attention_mask_of
from edgesmith.runtimes.base import Session

log = logging.getLogger(__name__)

HEADS_FILE = "exit_heads.safetensors"
EXIT_LAYER_OUTPUT = "exit_layer"

#: a segment: feeds -> (hidden state for the next segment or None, exit output)
SegmentRunner = Callable[[dict[str, np.ndarray]], tuple[np.ndarray | None, np.ndarray]]


class ExitController:
    """Runs segments with gathering; counts exits and per-segment time."""

    def __init__(self, runners: list[SegmentRunner], policy: ExitPolicy, output: str, input_names: list[str]):
        if len(runners) != policy.exits:
            raise BadInput(f"{len(runners)} segments for a policy with {policy.exits} exits; re-create the model")
        self.runners = runners
        self.policy = policy
        self.output = output
        self.input_names = list(input_names)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.exits = np.zeros(self.policy.exits, dtype=np.int64)
        self.segment_ms = np.zeros(self.policy.exits, dtype=np.float64)
        self.segment_runs = np.zeros(self.policy.exits, dtype=np.int64)
        self.segment_rows = np.zeros(self.policy.exits, dtype=np.int64)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BadInput(f"the early-exit model needs input(s) {', '.join(missing)}")
        mask = np.ascontiguousarray(attention_mask_of(feeds))
        n = mask.shape[0]
        state = ExitState(n)
        active = np.arange(n)
        result: np.ndarray | None = None
        exit_layer = np.zeros(n, dtype=np.int64)
        current = {k: np.ascontiguousarray(feeds[k]) for k in self.input_names}
        for i, runner in enumerate(self.runners):
            t0 = time.perf_counter()
            hidden, out = runner(current)
            self.segment_ms[i] += (time.perf_counter() - t0) * 1000.0
            self.segment_runs[i] += 1
            self.segment_rows[i] += len(active)
            leave = self.policy.decide(i, out, mask[active], state, active)
            if result is None:
                result = np.zeros((n, *out.shape[1:]), dtype=out.dtype)
            result[active[leave]] = out[leave]
            exit_layer[active[leave]] = self.policy.exit_layers[i]
            self.exits[i] += int(leave.sum())
            if leave.all():
                break
            stay = ~leave
            active = active[stay]
            assert hidden is not None
            current = {"hidden_in": np.ascontiguousarray(hidden[stay]),
                       "attention_mask": np.ascontiguousarray(mask[active])}
        assert result is not None
        return {self.output: result, EXIT_LAYER_OUTPUT: exit_layer}

    def stats(self) -> dict[str, Any]:
        """Exit histogram (samples per exit layer), and per segment: runs, rows and mean ms per run."""
        layers = self.policy.exit_layers
        total = int(self.exits.sum())
        mean_layers = float((self.exits * np.asarray(layers)).sum() / total) if total else None
        return {
            "exit_layers": list(layers),
            "histogram": {str(layer): int(c) for layer, c in zip(layers, self.exits)},
            "samples": total,
            "mean_layers": mean_layers,
            "segment_runs": [int(r) for r in self.segment_runs],
            "segment_rows": [int(r) for r in self.segment_rows],
            "segment_ms": [float(ms / r) if r else None for ms, r in zip(self.segment_ms, self.segment_runs)],
        }


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------


def load_policy(artifact: EarlyExitModel) -> tuple[ExitPolicy, dict[str, Any]]:
    data = artifact.policy_data
    return ExitPolicy.from_json(data, source=str(artifact.folder / "policy.json")), data


class EarlyExitSession(Session):
    """A session over an :class:`ExitController`; ``run`` returns the output and ``exit_layer``."""

    def __init__(self, artifact: EarlyExitModel, runtime: str, runners: list[SegmentRunner], providers: list[str],
                 options: dict[str, Any], device: str = "cpu", closers: list[Callable[[], None]] | None = None):
        policy, data = load_policy(artifact)
        self.runtime = runtime
        self.device = device
        self.model = artifact
        self.providers = providers
        self.options = {**options, "policy": policy.name, "threshold": policy.threshold,
                        "exit_layers": list(policy.exit_layers)}
        if policy.thresholds is not None:
            self.options["thresholds"] = list(policy.thresholds)
        self.controller = ExitController(runners, policy, data.get("output", artifact.output_names[0]),
                                         artifact.input_names)
        self._closers = closers or []

    @property
    def input_names(self) -> list[str]:
        return list(self.controller.input_names)

    @property
    def policy(self) -> ExitPolicy:
        return self.controller.policy

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.controller.run(feeds)

    def exit_stats(self) -> dict[str, Any]:
        return self.controller.stats()

    def reset_stats(self) -> None:
        self.controller.reset_stats()

    def device_memory_mb(self) -> float | None:
        """What torch allocated on CUDA (the torch controller's segments, weights included); None elsewhere."""
        if self.runtime != "torch" or not self.device.startswith("cuda"):
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []


def ort_session(artifact: Artifact, *, provider: str = "cpu", threads: int | None = None,
                graph_optimization: str = "all", spinning: bool = True, **unknown: Any) -> EarlyExitSession:
    """ONNX Runtime sessions, one per segment, behind a controller.

    Each segment session has its own intra-op thread pool. With ORT's default spin-waiting, the
    pools of the segments that just ran keep spinning while the next one runs and take the cores
    from it; without spinning, every parallel op pays a thread wake-up. So the pools spin while
    their own segment runs and stop as soon as it returns (``session.force_spinning_stop``).
    Measured here (``bench/early_exit_threads.py``, MiniLM encoder, 5 segments run one after another,
    2 cores; full graph 2.57 ms at batch 1, 19.3 ms at batch 8): default spinning 13.3 / 95.8 ms, no
    spinning 4.17 / 23.3 ms, spin-then-stop 3.19 / 21.2 ms. ``spinning=False`` turns spinning off.
    A process-wide thread pool (``set_global_thread_pool_sizes``) is not used: in Python it forces
    every other ORT session of the process onto that pool, quantization calibrators included."""
    import onnxruntime as ort

    from edgesmith.runtimes.onnxruntime import PROVIDERS, session_options

    assert isinstance(artifact, EarlyExitModel)
    unknown = {k: v for k, v in unknown.items() if v}
    if unknown:
        raise BadInput(f"onnxruntime: option(s) {', '.join(sorted(unknown))} are not available for early-exit models "
                       "(known: provider, threads, graph_optimization, spinning)")
    if provider not in PROVIDERS:
        raise BadInput(f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    so = session_options(threads=threads, graph_optimization=graph_optimization, spinning="stop" if spinning else "off")
    runners: list[SegmentRunner] = []
    providers: list[str] = []
    for seg, path in zip(artifact.policy_data["segments"], artifact.segment_paths):
        try:
            sess = ort.InferenceSession(str(path), so, providers=[wanted])
        except Exception as exc:  # ORT raises several types for a bad graph
            raise BadInput(f"{path}: ONNX Runtime cannot load this segment ({first_line(exc)[:300]})") from exc
        if sess.get_providers()[0] != wanted:
            raise BadInput(f"ONNX Runtime fell back to {sess.get_providers()[0]} although {wanted} was asked for; "
                           "use --provider cpu or fix the GPU install")
        providers = list(sess.get_providers())
        runners.append(_ort_runner(sess, list(seg["inputs"]), list(seg["outputs"])))
    options = {"provider": provider, "threads": threads, "graph_optimization": graph_optimization,
               "spinning": spinning}
    return EarlyExitSession(artifact, "onnxruntime", runners, providers, options,
                            device="cpu" if provider == "cpu" else "cuda")


def _ort_runner(sess, inputs: list[str], outputs: list[str]) -> SegmentRunner:
    def run(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray]:
        values = sess.run(outputs, {n: feeds[n] for n in inputs})
        return (values[0], values[1]) if len(values) == 2 else (None, values[0])

    return run


def load_network(artifact: EarlyExitModel):
    """The PyTorch :class:`~edgesmith.early_exit.network.ExitNetwork` saved in the artifact's ``torch/`` folder."""
    from safetensors.torch import load_model

    from edgesmith.artifacts import META_FILE, load, load_huggingface
    from edgesmith.early_exit.network import ExitNetwork

    assert artifact.folder is not None
    folder = Path(artifact.folder) / EXIT_TORCH_DIR
    if not (folder / HEADS_FILE).exists():
        raise BadInput(f"{artifact.folder}: no torch/ weights in this early-exit model (a quantized one has only "
                       "its ONNX segments); run it on onnxruntime")
    policy, _ = load_policy(artifact)
    if (folder / META_FILE).exists():  # an edgesmith TorchModel folder (pruned backbones keep their structure)
        base = load(folder)
    else:  # early-exit models written before the backbone carried its edgesmith.json
        base = load_huggingface(folder, task=artifact.task)
    net = ExitNetwork(base.module, artifact.task, policy.exit_layers)
    load_model(net.heads, str(folder / HEADS_FILE))
    return net.eval()


def torch_session(artifact: Artifact, *, device: str = "cpu", threads: int | None = None,
                  **unknown: Any) -> EarlyExitSession:
    """The PyTorch network run segment by segment behind the same controller."""
    import torch

    from edgesmith.early_exit.network import Segment
    from edgesmith.runtimes.torch import check_device

    assert isinstance(artifact, EarlyExitModel)
    unknown = {k: v for k, v in unknown.items() if v}
    if unknown:
        raise BadInput(f"torch runtime: option(s) {', '.join(sorted(unknown))} are not available for early-exit "
                       "models (known: device, threads)")
    check_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    net = load_network(artifact).to(device)
    runners: list[SegmentRunner] = []
    for i, seg in enumerate(artifact.policy_data["segments"]):
        runners.append(_torch_runner(Segment(net, i, seg["inputs"]), list(seg["inputs"]), device))
    options = {"device": device, "threads": torch.get_num_threads()}
    return EarlyExitSession(artifact, "torch", runners, [f"torch-{device.split(':')[0]}"], options, device=device)


def _torch_runner(segment, inputs: list[str], device: str) -> SegmentRunner:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray]:
        args = [torch.from_numpy(feeds[n]).to(device) for n in inputs]
        with torch.inference_mode():
            out = segment(*args)
        if isinstance(out, tuple):
            return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
        return None, out.float().cpu().numpy()

    return run
