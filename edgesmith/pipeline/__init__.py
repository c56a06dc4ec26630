"""Run a recipe: check the chain, run (or reuse) each step, evaluate, gate, profile, compare, report.

Every step is cached under a content-addressed key (see :mod:`edgesmith.cache`); a second run of
the same recipe reuses every finished step, and a run killed mid-step, started again, finishes with
the same outputs. The run folder ``runs/<recipe>-<time>/`` holds the artifacts, ``manifest.json``,
``report.md`` with its plot, the profiles, and ``state.json`` (what the run is doing now).

The package: :mod:`~edgesmith.pipeline.planning` (what is refused before any work),
:mod:`~edgesmith.pipeline.steps` (running or reusing the cached steps),
:mod:`~edgesmith.pipeline.evaluation` (quality against the source), :mod:`~edgesmith.pipeline.profiles`
(profiling the artifacts), :mod:`~edgesmith.pipeline.run_folder` (the folder, its state and manifest),
:mod:`~edgesmith.pipeline.runner` (:func:`run`, end to end, with the gates).
"""

from edgesmith.pipeline.planning import PlannedStep, plan, source_kind
from edgesmith.pipeline.profiles import profile_filename
from edgesmith.pipeline.run_folder import FINAL_STATES
from edgesmith.pipeline.runner import RunResult, run
from edgesmith.pipeline.steps import referenced_files_key

__all__ = ["FINAL_STATES", "PlannedStep", "RunResult", "plan", "profile_filename", "referenced_files_key", "run",
           "source_kind"]
