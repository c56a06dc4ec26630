"""The Ray backend: builds and profiles as Ray tasks on an existing cluster, every profile pinned to
one profiling node and asking for all of its CPUs, so it runs alone there."""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Any

from edgesmith.errors import BadInput
from edgesmith.sweep.trials import build_trial, profile_trial

log = logging.getLogger(__name__)


class RayBackend:
    """Builds and profiles as Ray tasks on an existing cluster (``ray start --head`` / ``--address``).

    A build asks ``build_cpus`` CPUs (and ``build_gpus``); a profile is pinned to one node and asks
    for all of its CPUs (and one GPU when the provider is not cpu), so it runs alone there."""

    profile_needs_quiet = False

    def __init__(self, address: str, *, parallel: int | None, build_cpus: float, build_gpus: float, provider: str):
        try:
            import ray
        except ImportError as exc:
            raise BadInput("--ray needs Ray: pip install 'edgesmith[ray]'") from exc
        self.ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except ConnectionError as exc:
            raise BadInput(f"no Ray cluster at '{address}': {exc}; start one with `ray start --head` "
                           "or give its address (host:port)") from exc
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        self.build_cpus, self.build_gpus = build_cpus, build_gpus
        self.parallel = parallel or max(1, int(cpus // max(build_cpus, 1e-9)))
        self.node = self._profiling_node(nodes, provider)
        self.node_cpus = self.node["Resources"].get("CPU", 1)
        self.profile_gpus = 1 if provider != "cpu" else 0
        self._build = ray.remote(build_trial).options(num_cpus=build_cpus, num_gpus=build_gpus, max_retries=0)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._profile = ray.remote(profile_trial).options(
            num_cpus=self.node_cpus, num_gpus=self.profile_gpus, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node["NodeID"], soft=False))
        log.info("ray: %d node(s), %g CPUs; profiles on %s (%g CPUs)", len(nodes), cpus,
                 self.node.get("NodeManagerAddress"), self.node_cpus)

    @staticmethod
    def _profiling_node(nodes: list[dict], provider: str) -> dict:
        """A node marked with the custom resource ``edgesmith_profile``, else a GPU node when
        profiling on a GPU, else the head node (when it has CPUs), else the node with most CPUs."""
        marked = [n for n in nodes if n["Resources"].get("edgesmith_profile")]
        if marked:
            return marked[0]
        if provider != "cpu":
            gpu = [n for n in nodes if n["Resources"].get("GPU")]
            if not gpu:
                raise BadInput(f"profiling on '{provider}' needs a GPU node, and the Ray cluster has none")
            return gpu[0]
        head = [n for n in nodes if "node:__internal_head__" in n["Resources"] and n["Resources"].get("CPU")]
        if head:
            return head[0]
        with_cpus = [n for n in nodes if n["Resources"].get("CPU")]
        if not with_cpus:
            raise BadInput("the Ray cluster has no node with CPUs to run trials on")
        return max(with_cpus, key=lambda n: n["Resources"]["CPU"])

    def describe(self) -> str:
        return f"ray, {self.parallel} builds at a time, profiles on {self.node.get('NodeManagerAddress')}"

    def submit_build(self, task: dict[str, Any]) -> cf.Future:
        return self._build.remote(task).future()

    def submit_profile(self, task: dict[str, Any]) -> cf.Future:
        return self._profile.remote(task).future()

    def close(self, cancel: bool = False) -> None:
        self.ray.shutdown()
