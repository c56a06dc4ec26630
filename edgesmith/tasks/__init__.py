"""Task accuracy for decoders: lm-evaluation-harness tasks scored through edgesmith's decoder
sessions, an offline task set shipped with edgesmith, and paired deltas against the source.

    import edgesmith as es
    report = es.evaluate(es.load("pruned/"), tasks=["mmlu-mini", "wordnet-mc"], reference=es.load("smollm2"))

lm-eval is optional (``pip install 'edgesmith[tasks]'``) and imported only when a task runs.
Modules: :mod:`~edgesmith.tasks.scoring` (log-likelihoods on a session, no lm-eval),
:mod:`~edgesmith.tasks.adapter` (the lm-eval model), :mod:`~edgesmith.tasks.harness` (lm-eval
itself: the extra check, registration, task catalogue), :mod:`~edgesmith.tasks.paired`
(intervals, McNemar), :mod:`~edgesmith.tasks.evaluation` (runs, cache, reports),
``edgesmith/tasks/data/`` (the shipped tasks).
"""

from edgesmith.tasks.evaluation import TaskReport, TaskResult, evaluate, evaluate_tasks, run_tasks
from edgesmith.tasks.harness import SHIPPED, register

__all__ = ["SHIPPED", "TaskReport", "TaskResult", "evaluate", "evaluate_tasks", "register", "run_tasks"]
