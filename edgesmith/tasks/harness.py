"""lm-evaluation-harness, imported lazily: the check that it is installed, edgesmith's model
registered under the name ``edgesmith``, the task catalogue (shipped tasks, lm-eval's own, local
task YAMLs) and the ``edgesmith-lm-eval`` command.

lm-eval 0.4 has no plugin entry point for models: a model is known once its module registered it.
:func:`register` does that (lazily: the adapter module loads when lm-eval first asks for it), so in
Python ``simple_evaluate(model="edgesmith", model_args="artifact=...")`` works after
``import edgesmith.tasks.harness; harness.register()``, and ``edgesmith-lm-eval`` is lm-eval's own
command line (every option of ``lm_eval``) with the model registered and edgesmith's shipped tasks
on the include path.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesmith.errors import BadInput, first_line

log = logging.getLogger(__name__)

EXTRA = "pip install 'edgesmith[tasks]'"
#: edgesmith's offline task set: the YAMLs and their data (package data)
DATA_DIR = Path(__file__).resolve().parent / "data"
#: the shipped tasks and the metric their paired deltas and gates use
SHIPPED: dict[str, str] = {"mmlu-mini": "acc", "wordnet-mc": "acc", "mmlu-mini-cloze": "acc", "smoke-mc": "acc",
                           "smoke-abcd": "acc",
                           "smoke-ppl": "word_perplexity", "smoke-gen": "exact_match"}
MODEL_NAME = "edgesmith"
ADAPTER = "edgesmith.tasks.adapter:EdgesmithLM"
#: keys a task YAML needs (one that ``include``s another inherits them)
REQUIRED_KEYS = ("task", "doc_to_text")


def require_lm_eval():
    """The ``lm_eval`` module, or one line naming the extra that installs it (exit 2)."""
    try:
        import lm_eval
    except ImportError:
        raise BadInput(f"task accuracy needs lm-evaluation-harness, which is not installed here: {EXTRA}") from None
    for name in ("lm_eval", "lm-eval"):  # its per-task chatter (custom kwargs, default aggregations)
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.ERROR))
    return lm_eval


def register() -> None:
    """Register :class:`~edgesmith.tasks.adapter.EdgesmithLM` with lm-eval as ``edgesmith`` (idempotent).
    lm-eval's own models are registered first: lm-eval only indexes them into an empty registry."""
    require_lm_eval()
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER)


@dataclass
class TaskSelection:
    """Tasks resolved to lm-eval names, and the TaskManager that builds them."""

    names: list[str]
    manager: Any
    files: dict[str, Path]  # task name -> the YAML it came from (local files and shipped tasks)


def _read_task_yaml(path: Path) -> dict:
    """A task YAML's top-level keys (lm-eval's ``!function`` tags read as plain strings)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInput(f"task file {path}: cannot be read as YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise BadInput(f"task file {path}: not a task (a YAML mapping with task, dataset and prompt fields)")
    missing = [k for k in REQUIRED_KEYS if k not in data] if "include" not in data else \
        ([] if "task" in data else ["task"])
    if not any(k in data for k in ("dataset_path", "custom_dataset", "include")):
        missing.append("dataset_path (or custom_dataset)")
    if missing:
        raise BadInput(f"task file {path}: missing field(s) {', '.join(missing)}; see lm-eval's task guide "
                       "(task, dataset_path, doc_to_text, doc_to_target/doc_to_choice, output_type)")
    if not isinstance(data["task"], str) or not data["task"].strip():
        raise BadInput(f"task file {path}: 'task' must be a task name (a string)")
    return data


def shipped_file(name: str) -> Path:
    return DATA_DIR / f"{name}.yaml"


def select_tasks(tasks: list[str] | str) -> TaskSelection:
    """Resolve task names (shipped, lm-eval's own) and task YAML paths; unknown names and bad
    files are one line (exit 2). lm-eval's own catalogue is indexed only when a task needs it."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not items:
        raise BadInput(f"no task given; shipped tasks: {', '.join(SHIPPED)} (or any lm-eval task name or task YAML)")
    names, files, folders = [], {}, [DATA_DIR]
    for item in items:
        if item.endswith((".yaml", ".yml")):
            path = Path(item).expanduser()
            if not path.is_file():
                raise BadInput(f"task file {item} not found; give a task YAML or a task name")
            name = _read_task_yaml(path)["task"]
            files[name] = path.resolve()
            if path.resolve().parent not in folders:
                folders.append(path.resolve().parent)
        else:
            name = item
            if name in SHIPPED:
                files[name] = shipped_file(name)
        if name in names:
            raise BadInput(f"task {name} is listed twice")
        names.append(name)
    defaults = any(n not in files for n in names)
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=defaults)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise BadInput(f"unknown task '{name}'; shipped tasks: {', '.join(SHIPPED)}; or any lm-eval task name "
                           "(lm_eval ls tasks) or a task YAML file")
    return TaskSelection(names, manager, files)


def build_tasks(selection: TaskSelection) -> dict[str, Any]:
    """lm-eval's task objects with their documents loaded; a task whose data cannot be reached
    here (offline, a missing file) is one line naming it and why."""
    built = {}
    for name in selection.names:
        try:
            built.update(selection.manager.load([name])["tasks"])
        except BadInput:
            raise
        except Exception as exc:  # datasets/hub raise many types (ConnectionError, FileNotFoundError, ...)
            raise BadInput(f"task {name}: its data cannot be loaded here ({first_line(exc)}); edgesmith's shipped "
                           f"tasks ({', '.join(t for t in SHIPPED if not t.startswith('smoke'))}) run offline")
    return built


def main(argv: list[str] | None = None) -> None:
    """``edgesmith-lm-eval``: lm-eval's command line with ``--model edgesmith`` registered and the
    shipped tasks on the include path."""
    try:
        register()
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and any(a in ("run", "--tasks") for a in args):
        args += ["--include_path", str(DATA_DIR)]
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except BadInput as exc:  # edgesmith's own bad inputs (the artifact, its runtime): one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
