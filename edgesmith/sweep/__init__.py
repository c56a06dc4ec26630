"""Sweeps: search recipe variants for the Pareto front of quality, latency and size.

A sweep is a recipe plus a ``search:`` block in the same YAML::

    name: minilm-sweep
    model: minilm
    steps:
      - prune: {heads: 0.25, ffn: 0.25}
      - export: {}
      - quantize: {mode: dynamic}
    profile: {batch: 1, seq: 128, iterations: 50, threads: 2}
    search:
      parameters:
        steps.prune.enabled: [true, false]              # a step can be switched off
        steps.prune.heads: {choices: [0.25, 0.5], when: {steps.prune.enabled: true}}
        steps.prune.ffn: {low: 0.0, high: 0.5, step: 0.25, when: {steps.prune.enabled: true}}
        steps.quantize.mode: [dynamic, static]
      objectives: {cosine: max, latency_p50: min, size: min}
      constraints: ["cosine >= 0.98", "latency_p90 <= 10ms"]
      budget: {trials: 20, wall_time: 30m}
      sampler: {name: nsga2, seed: 0}

Every trial is a normal pipeline run (so every step is cached and shared across trials) of the
variant with ``profile: null``; the variant's final artifact is then profiled on its own. How
profiling is kept apart from other trials' work is the scheduler's job (:func:`run_sweep`):

- local (``parallel`` worker processes): profiling runs in the driver process, and only while no
  build is running; no build starts while a profile is waiting or running. So a timed loop never
  shares the machine with another trial.
- Ray: each build is a task asking ``build_cpus`` CPUs; each profile is a task pinned to one
  profiling node that asks for *all* of that node's CPUs (and a GPU when the provider is one), so
  Ray starts it only when nothing else of the sweep runs there and starts nothing beside it; the
  driver submits no new build while a profile is pending, so profiles cannot starve. All profiles
  run on the same node, so their latencies compare.

The study lives in ``study.journal`` (Optuna's journal storage) in the sweep folder; a killed sweep
continues with ``resume_sweep(folder)`` (``edgesmith sweep --resume FOLDER``): trials that were
running when it died are recorded as interrupted and run again (their finished steps come from
the cache).

The package's modules: :mod:`~edgesmith.sweep.space` (the ``search:`` block and the sweep recipe),
:mod:`~edgesmith.sweep.objectives` (metrics, objectives, constraints), :mod:`~edgesmith.sweep.variants`
(sampled values → recipe variants), :mod:`~edgesmith.sweep.trials` (the build and profile of one trial),
:mod:`~edgesmith.sweep.workers` and :mod:`~edgesmith.sweep.ray_backend` (where they run),
:mod:`~edgesmith.sweep.scheduler` (the driver loop), :mod:`~edgesmith.sweep.study` (the Optuna study),
:mod:`~edgesmith.sweep.folder` (the sweep folder), :mod:`~edgesmith.sweep.pareto` (front and report) and
:mod:`~edgesmith.sweep.runner` (:func:`run_sweep`, :func:`resume_sweep`).
"""

from __future__ import annotations

from edgesmith.sweep.folder import META_FILE, PARETO_FILE, STUDY_FILE, SWEEP_FILE, TRIALS_DIR, claim_folder
from edgesmith.sweep.objectives import (
    DIRECTIONS,
    LATENCY_METRICS,
    MEASURED_METRICS,
    SIZE_UNITS,
    TIME_UNITS,
    Constraint,
    Objective,
    parse_constraint,
)
from edgesmith.sweep.pareto import (
    format_metric,
    front_of,
    is_pareto_file,
    markdown_report,
    plot_front,
    profiles_of_front,
    summarize_study,
    write_pareto,
    write_report,
)
from edgesmith.sweep.ray_backend import RayBackend
from edgesmith.sweep.runner import SweepResult, resume_sweep, run_sweep
from edgesmith.sweep.space import (
    ENABLED,
    WHOLE,
    BudgetSpec,
    Parameter,
    SamplerSpec,
    SearchSpace,
    SearchSpec,
    Sweep,
    address,
    load_sweep,
    parse_duration,
    parse_search,
    sweep_from_dict,
)
from edgesmith.sweep.study import make_sampler, open_study, requeue_interrupted, tell
from edgesmith.sweep.trials import build_trial, profile_trial
from edgesmith.sweep.variants import describe_params, suggest, trial_label, variant
from edgesmith.sweep.workers import LocalBackend

__all__ = ["Constraint", "Objective", "Parameter", "SearchSpace", "Sweep", "SweepResult", "front_of", "load_sweep",
           "parse_constraint", "parse_search", "profiles_of_front", "resume_sweep", "run_sweep", "suggest",
           "sweep_from_dict", "variant"]
