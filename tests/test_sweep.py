"""Sweeps on a tiny model: the same front through a real local Ray cluster and local workers,
constraints, failed trials, resume after SIGKILL, and bad search spaces as exit-2 errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from edgesmith.cli.app import main
from edgesmith.sweep import parse_constraint, run_sweep, sweep_from_dict

optuna = pytest.importorskip("optuna", reason="sweeps need optuna (pip install 'edgesmith[sweep]')")

EDGESMITH = Path(sys.executable).with_name("edgesmith")
SPACE = {
    "steps.quantize.enabled": [True, False],
    "steps.quantize.per_channel": {"choices": [True, False], "when": {"steps.quantize.enabled": True}},
    "steps.quantize.quantize_embeddings": {"choices": [False, True], "when": {"steps.quantize.enabled": True}},
}


def _sweep_doc(model_dir: Path, **search) -> dict:
    doc = {
        "name": "tinysweep",
        "model": str(model_dir),
        "data": {"limit": 48},
        "steps": [{"export": {}}, {"quantize": {"min_cosine": 0.5}}],
        "profile": {"batch": 1, "seq": 16, "warmup": 1, "iterations": 3, "time_budget_s": 5},
        "search": {"parameters": SPACE, "objectives": {"cosine": "max", "size": "min"}, "budget": {"trials": 4},
                   # population >= trials: every trial is drawn from the seeded generator, whatever finishes first
                   "sampler": {"name": "nsga2", "seed": 0, "population": 4}},
    }
    doc["search"].update(search)
    return doc


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _front(summary: dict) -> list[tuple]:
    """The front as (params, cosine rounded, size): what must not depend on where trials ran."""
    return sorted((json.dumps(r["params"], sort_keys=True), round(r["measured"]["cosine"], 9), r["measured"]["size"])
                  for r in summary["front"])


def _trials(summary: dict) -> list[tuple]:
    return [(r["trial"], json.dumps(r["params"], sort_keys=True)) for r in summary["trials"]]


@pytest.fixture(scope="module")
def local_sweep(tiny_bert_dir, tmp_path_factory):
    """The tiny sweep with 2 local worker processes and a fresh cache."""
    root = tmp_path_factory.mktemp("sweep-local")
    recipe = _write(root / "sweep.yaml", _sweep_doc(tiny_bert_dir))
    result = run_sweep(recipe, folder=root / "out", parallel=2, cache_dir=root / "cache")
    return recipe, root, result


# ---------------------------------------------------------------------------------------------
# Ray: a real head on loopback, started by the test
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray", reason="the Ray test needs ray (pip install 'edgesmith[ray]')")
    ray_bin = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    log_path = Path(temp) / "head.log"
    command = [str(ray_bin), "start", "--head", "--port", str(port), "--temp-dir", temp, "--num-cpus", "2",
               "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats", "--block"]
    with open(log_path, "w") as log_file:
        head = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=_ray_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(head)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the Ray head by its own process group (it was started in a new session): never `ray stop`."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def test_ray_and_local_workers_find_the_same_front(local_sweep, ray_head, tmp_path, capsys):
    recipe, _, local = local_sweep
    folder = tmp_path / "ray-sweep"
    proc = subprocess.run([str(EDGESMITH), "sweep", str(recipe), "--ray", ray_head, "--out", str(folder),
                           "--cache-dir", str(tmp_path / "ray-cache"), "--json"],
                          check=False, capture_output=True, text=True, env=_ray_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["backend"].startswith("ray")
    ray_summary = json.loads((folder / "pareto.json").read_text())
    assert ray_summary["counts"]["complete"] == 4 and ray_summary["counts"]["failed"] == 0
    # same seed: same variants in the same trial numbers, same front on the deterministic objectives
    assert _trials(ray_summary) == _trials(local.summary)
    assert _front(ray_summary) == _front(local.summary)
    assert len({json.dumps(r["params"]) for r in ray_summary["trials"]}) >= 3  # the seed gives a real choice
    # every trial ran as a pipeline run in the sweep folder, and was profiled (a few iterations)
    for r in ray_summary["trials"]:
        assert json.loads((folder / r["run_dir"] / "state.json").read_text())["status"] == "done"
        prof = json.loads((folder / r["profile"]).read_text())
        assert prof["stats"]["n"] >= 1 and prof["quality"]["cosine"] == pytest.approx(r["measured"]["cosine"])
        assert r["measured"]["latency_p50"] > 0
    assert "## Pareto front" in (folder / "report.md").read_text()
    # `edgesmith compare` takes the front
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(folder / "pareto.json"), "--json"])
    assert exc.value.code == 0
    compared = json.loads(capsys.readouterr().out)
    assert len(compared["rows"]) == len(ray_summary["front"])


# ---------------------------------------------------------------------------------------------
# Local sweeps: the output, constraints, failures, resume
# ---------------------------------------------------------------------------------------------


def test_local_sweep_writes_front_report_and_trial_runs(local_sweep):
    _, _, result = local_sweep
    folder = result.folder
    summary = json.loads((folder / "pareto.json").read_text())
    assert summary["counts"] == {"complete": 4, "feasible": 4, "failed": 0, "interrupted": 0, "running": 0}
    assert summary["objectives"] == [{"metric": "cosine", "direction": "maximize"},
                                     {"metric": "size", "direction": "minimize"}]
    complete = summary["trials"]
    front = summary["front"]
    assert front
    # the front is exactly the non-dominated trials (duplicates of one variant folded into one row)
    def dominated(a, b):
        return (b["cosine"] >= a["cosine"] and b["size"] <= a["size"]
                and (b["cosine"] > a["cosine"] or b["size"] < a["size"]))
    expected = {json.dumps(r["params"], sort_keys=True) for r in complete
                if not any(dominated(r["measured"], o["measured"]) for o in complete)}
    assert {json.dumps(r["params"], sort_keys=True) for r in front} == expected
    # the unquantized variant keeps the source's outputs; a quantized one is smaller
    sizes = {r["params"]["steps.quantize.enabled"]: r["measured"]["size"] for r in complete}
    assert sizes[False] > sizes[True]
    for r in complete:
        manifest = json.loads((folder / r["run_dir"] / "manifest.json").read_text())
        steps = [s["pass"] for s in manifest["steps"]]
        assert steps == (["export", "quantize"] if r["params"]["steps.quantize.enabled"] else ["export"])
        if r["params"]["steps.quantize.enabled"]:
            q = next(s for s in manifest["steps"] if s["pass"] == "quantize")["config"]
            assert q["per_channel"] == r["params"]["steps.quantize.per_channel"]
            assert q["quantize_embeddings"] == r["params"]["steps.quantize.quantize_embeddings"]
    report = (folder / "report.md").read_text()
    assert "## Pareto front" in report and "## All trials" in report
    assert (folder / "pareto.png").stat().st_size > 1000
    assert (folder / "report.html").exists()


def test_a_variant_that_violates_a_constraint_is_never_on_the_front(local_sweep, tiny_bert_dir, tmp_path):
    _, root, unconstrained = local_sweep
    front = sorted(unconstrained.summary["front"], key=lambda r: -r["measured"]["cosine"])
    assert len(front) >= 2, "the seed must give a front with a trade-off"
    # a bound between the best and the second best cosine on the front: the second violates it
    bound = (front[0]["measured"]["cosine"] + front[1]["measured"]["cosine"]) / 2
    doc = _sweep_doc(tiny_bert_dir, constraints=[f"cosine >= {bound!r}"])
    result = run_sweep(sweep_from_dict(doc), folder=tmp_path / "constrained", parallel=1, cache_dir=root / "cache")
    summary = result.summary
    violating = [r for r in summary["trials"] if r["measured"]["cosine"] < bound]
    assert violating, "some trial must violate the constraint"
    front_trials = {r["trial"] for r in summary["front"]} | {d for r in summary["front"] for d in r["duplicates"]}
    assert not front_trials & {r["trial"] for r in violating}
    assert all(r["measured"]["cosine"] >= bound for r in summary["front"])
    assert summary["counts"]["feasible"] == 4 - len(violating)
    # Optuna recorded the violations as constraint values > 0
    study = optuna.load_study(study_name="tinysweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(result.folder / "study.journal"))))
    for t in study.trials:
        constraint = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
        assert (t.number in {r["trial"] for r in violating}) == any(v > 0 for v in constraint)


def _journal_counts(folder: Path) -> tuple[int, int]:
    if not (folder / "study.journal").exists():
        return 0, 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    try:
        trials = optuna.load_study(study_name="tinysweep", storage=storage).trials
    except KeyError:
        return 0, 0
    done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials)
    return done, sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def test_failed_trials_are_recorded_and_a_killed_sweep_resumes(local_sweep, tiny_bert_dir, tmp_path):
    _, root, _ = local_sweep
    doc = _sweep_doc(tiny_bert_dir, parameters={"steps.quantize.quantize_embeddings": [False, True],
                                                 "steps.quantize.min_cosine": [0.5, 1.0]},
                     sampler={"name": "grid", "seed": 0})
    recipe = _write(tmp_path / "grid.yaml", doc)
    folder = tmp_path / "killed"
    proc = subprocess.Popen([str(EDGESMITH), "sweep", str(recipe), "--out", str(folder), "--cache-dir",
                             str(root / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # kill it while a trial runs, after one has finished
            done, running = _journal_counts(folder)
            if done >= 1 and running >= 1:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = json.loads((folder / "pareto.json").read_text())
    assert before["counts"]["complete"] + before["counts"]["failed"] < 4

    proc = subprocess.run([str(EDGESMITH), "sweep", "--resume", str(folder), "--json"], check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((folder / "pareto.json").read_text())
    counts = summary["counts"]
    assert counts["complete"] + counts["failed"] == 4 and counts["running"] == 0
    assert counts["interrupted"] >= 1
    finished = [r for r in summary["trials"] if r["failure_kind"] != "interrupted"]
    # the grid is covered once: every combination finished, the interrupted one was run again
    assert sorted(json.dumps(r["params"], sort_keys=True) for r in finished) == sorted(
        json.dumps({"steps.quantize.min_cosine": m, "steps.quantize.quantize_embeddings": e}, sort_keys=True)
        for m in (0.5, 1.0) for e in (False, True))
    # min_cosine 1.0 cannot hold for an 8-bit graph: those trials failed, with the reason, and the sweep went on
    for r in finished:
        if r["params"]["steps.quantize.min_cosine"] == 1.0:
            assert r["state"] == "FAIL" and r["failure_kind"] == "validation-failed"
            assert "min_cosine" in r["failure"]
        else:
            assert r["state"] == "COMPLETE"
    assert all(r["params"]["steps.quantize.min_cosine"] == 0.5 for r in summary["front"])
    assert "validation-failed" in (folder / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# The search space: parsing and refusals
# ---------------------------------------------------------------------------------------------


def test_constraints_parse_with_units():
    c = parse_constraint("latency_p90 <= 10ms")
    assert (c.metric, c.op, c.value) == ("latency_p90", "<=", 10.0)
    assert parse_constraint("latency_p50 < 0.5 s").value == 500.0
    assert parse_constraint("size <= 20MB").value == 20e6
    assert parse_constraint("size <= 1 MiB").value == 2**20
    cos = parse_constraint("cosine >= 0.98")
    assert cos.holds(0.99) and not cos.holds(0.97) and cos.violation(0.97) == pytest.approx(0.01)
    assert parse_constraint("cosine >= 0.98").holds(0.98) and not parse_constraint("cosine > 0.98").holds(0.98)


def test_conditional_parameters_are_only_chosen_when_their_condition_holds(tiny_bert_dir):
    from edgesmith.sweep import make_sampler, suggest, variant

    sweep = sweep_from_dict(_sweep_doc(tiny_bert_dir, sampler={"name": "random", "seed": 1}))
    study = optuna.create_study(directions=sweep.space.directions, sampler=make_sampler(sweep.space))
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), sweep.space)
        on = params["steps.quantize.enabled"]
        assert ("steps.quantize.per_channel" in params) == on
        recipe = variant(sweep.recipe, params, name="v")
        assert [s.pass_name for s in recipe.steps] == (["export", "quantize"] if on else ["export"])
        assert recipe.profile is None
        seen.add(on)
    assert seen == {True, False}


BAD_SPACES = [
    ({"steps.quantize.per_channel": []}, "empty list of choices"),
    ({"steps.quantize.min_cosine": {"low": 0.9, "high": 0.5}}, "low (0.9) is above high (0.5)"),
    ({"steps.quantize.per_chanel": [True, False]}, "pass 'quantize' has no option 'per_chanel'"),
    ({"steps.prune.heads": [0.25]}, "the recipe has no step 'prune'"),
    ({"steps.quantize.min_cosine": [0.5, 2.0]}, "a cosine lies between -1 and 1"),
    ({"steps.quantize.min_cosine": {"low": 0.5, "high": 0.9, "steep": 0.1}}, "unknown key 'steep'"),
    ({"steps.quantize.per_channel": {"choices": [True], "when": {"steps.quantize.enabled": True}}},
     "'steps.quantize.enabled' is not a parameter declared before this one"),
    ({"quantize.per_channel": [True]}, "addressed as steps.<step_id>.<option>"),
]


@pytest.mark.parametrize("parameters,message", BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_search_spaces_are_exit_2(parameters, message, tiny_bert_dir, tmp_path, capsys):
    recipe = _write(tmp_path / "bad.yaml", _sweep_doc(tiny_bert_dir, parameters=parameters))
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(recipe), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not (tmp_path / "never").exists()  # refused before anything ran


@pytest.mark.parametrize("search,message", [
    ({"objectives": {"cosinus": "max"}}, "unknown metric 'cosinus'"),
    ({"objectives": {"cosine": "up"}}, "'up' is not a direction"),
    ({"constraints": ["latency_p90 <= 10 parsecs"]}, "unknown unit 'parsecs'"),
    ({"constraints": ["cosine about 0.9"]}, "is not a constraint"),
    ({"sampler": {"name": "grid"}}, "the grid sampler needs a fixed space"),
    ({"budget": {"trials": 0}}, "budget.trials"),
])
def test_bad_objectives_constraints_and_budgets_are_exit_2(search, message, tiny_bert_dir, tmp_path, capsys):
    recipe = _write(tmp_path / "bad.yaml", _sweep_doc(tiny_bert_dir, **search))
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(recipe)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in " ".join(err.split()), err


def test_latency_objective_needs_a_profile(tiny_bert_dir):
    doc = _sweep_doc(tiny_bert_dir, objectives={"cosine": "max", "latency_p50": "min"})
    doc["profile"] = None
    from edgesmith.errors import BadInput

    with pytest.raises(BadInput, match="latency_p50 needs a latency measurement"):
        sweep_from_dict(doc)
