"""The Optuna study of a sweep: its sampler, its journal storage in the sweep folder, telling results,
and requeueing the trials a stopped sweep left running."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput
from edgesmith.sweep.folder import STUDY_FILE
from edgesmith.sweep.space import SearchSpace, Sweep
from edgesmith.sweep.variants import _encode

log = logging.getLogger(__name__)


def _optuna():
    try:
        import optuna
    except ImportError as exc:
        raise BadInput("sweeps need Optuna: pip install 'edgesmith[sweep]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(space: SearchSpace):
    optuna = _optuna()
    spec = space.sampler
    if spec.name == "nsga2":
        population = spec.population or min(50, max(4, space.budget.trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=spec.seed)
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    grid = {p.path: [_encode(v) for v in p.grid_values()] for p in space.parameters}
    return optuna.samplers.GridSampler(grid, seed=spec.seed)


def open_study(folder: Path, sweep: Sweep, *, create: bool):
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))
    name = sweep.recipe.name
    if create:
        return optuna.create_study(study_name=name, storage=storage, directions=sweep.space.directions,
                                   sampler=make_sampler(sweep.space))
    return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sweep.space))


def tell(study, trial, values=None, *, state=None) -> None:
    """``study.tell``, outside ``optimize``: the grid sampler calls ``study.stop()`` once every grid
    point has been visited, which raises there. The trial is recorded before that (Optuna sets the
    state in a ``finally``), and the budget ends the sweep, so that error is dropped."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def requeue_interrupted(study) -> list[int]:
    """Mark trials left RUNNING by a dead sweep as failed ("interrupted") and enqueue their params."""
    optuna = _optuna()
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "failure_kind", "interrupted")
        study._storage.set_trial_user_attr(t._trial_id, "failure", "the sweep stopped while it ran; run again")
        tell(study, t.number, state=optuna.trial.TrialState.FAIL)
        params = _grid_point(study, t) or t.params  # partial params (killed mid-ask): the rest is sampled anew
        if params:
            study.enqueue_trial(params, skip_if_exists=False)
        numbers.append(t.number)
    if numbers:
        log.info("trials %s were interrupted; they run again", ", ".join(map(str, numbers)))
    return numbers


def _grid_point(study, trial) -> dict[str, Any] | None:
    """The grid sampler's point of a trial (its ``grid_id`` in the sampler's grid, which the seed
    shuffles: the sampler rebuilt with the same seed has the same order). A trial killed before
    all its values were suggested still holds its grid id, and the grid counts that point as
    visited, so it must be enqueued whole."""
    optuna = _optuna()
    sampler = study.sampler
    grid_id = trial.system_attrs.get("grid_id")
    if grid_id is None or not isinstance(sampler, optuna.samplers.GridSampler):
        return None
    return dict(zip(sampler._param_names, sampler._all_grids[int(grid_id)], strict=True))
