"""tools/search.py: parallel Optuna trials on a shared journal, budget, resume, both tasks."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading

from bissl_det.runtime.setup import load_config
from bissl_det.search import SearchOptions, open_study, run_search, run_trials, search_task
from bissl_det.search.study import log_uniform_space
from tests.helpers import CONFIGS, tiny_config
from tests.tools.test_eval_cls import CLS_DEMO, TINY, backbone  # noqa: F401  (fixture)

import pytest
from optuna.trial import TrialState

TINY_FINETUNE = CONFIGS / "quick" / "test_tiny_finetune_C4.yaml"
SPACE = {"lr": (1e-4, 1.0), "wd": (1e-5, 1e-2)}


def _toy(params: dict[str, float], number: int) -> float:
    return -((math.log10(params["lr"]) + 2) ** 2)  # best at lr = 0.01


def _study(tmp_path, name="toy"):
    return open_study(tmp_path / "s.journal", name)


def test_budget_counts_complete_and_diverged_trials_and_stops_on_errors(tmp_path):
    study, space = _study(tmp_path), log_uniform_space(SPACE)
    lock = str(tmp_path / "s.journal.ask")
    calls = []

    def diverges_once(params, number):
        calls.append(number)
        if number == 1:
            raise FloatingPointError("loss is nan")
        return float("nan") if number == 2 else _toy(params, number)

    assert run_trials(study, space, diverges_once, 4, lock) == 4
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    assert study.trials[1].user_attrs["error"] == "loss is nan"
    assert run_trials(study, space, diverges_once, 4, lock) == 0  # budget met: nothing rerun

    def broken(params, number):
        raise RuntimeError("bad config")

    with pytest.raises(RuntimeError, match="bad config"):
        run_trials(study, space, broken, 6, lock)
    assert study.trials[-1].state == TrialState.FAIL  # marked, not counted
    assert "bad config" in study.trials[-1].user_attrs["error"]
    assert run_trials(study, space, _toy, 6, lock) == 2  # the failed one is replaced
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4
    for t in study.trials:
        assert 1e-4 <= t.params["lr"] <= 1.0 and 1e-5 <= t.params["wd"] <= 1e-2


def test_concurrent_workers_never_exceed_the_budget(tmp_path):
    # Threads share nothing but the journal file and its lock, like processes.
    space, lock, errors = log_uniform_space(SPACE), str(tmp_path / "s.journal.ask"), []

    def worker():
        try:
            run_trials(_study(tmp_path), space, _toy, 12, lock)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    trials = _study(tmp_path).trials
    assert [t.number for t in trials] == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(t.params.values()) for t in trials}) == 12


def test_search_ranges_are_checked_by_key(in_demo_workdir, tmp_path):
    cfg = tiny_config(CLS_DEMO, tmp_path, "CLS.SEARCH.LR_RANGE", "(0.0, 1.0)")
    with pytest.raises(ValueError, match=r"CLS\.SEARCH\.LR_RANGE"):
        search_task(cfg)
    with pytest.raises(ValueError, match="DET_SEARCH.METRIC"):
        search_task(tiny_config(TINY_FINETUNE, tmp_path, "DET_SEARCH.METRIC", "AR"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.dist
def test_two_worker_processes_then_resume(tmp_path, backbone):  # noqa: F811
    opts = [*TINY, "CLS.SOLVER.ITERS", "1", "MODEL.WEIGHTS", backbone]
    cfg = tiny_config(CLS_DEMO, tmp_path / "search", *opts)
    options = SearchOptions(trials=3, study_name="probe", workers=2, linear_probe=True)
    first = run_search(cfg, options)
    assert first["n_counted"] == 3 and first["units"] == "percent"
    assert [t["number"] for t in first["trials"]] == [0, 1, 2]
    assert len({tuple(t["params"].values()) for t in first["trials"]}) == 3
    trials_dir = tmp_path / "search" / "trials"
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in trials_dir.glob("*/metrics.json")}
    assert len(stamps) == 3

    # A trial left RUNNING by a killed worker of this host: marked FAIL, not counted.
    study = open_study(first["storage"], "probe")
    stale = study.ask(log_uniform_space(search_task(cfg).ranges))
    stale.set_user_attr("owner", {"host": socket.gethostname(), "pid": _dead_pid()})

    cfg.defrost()  # a test split that does not exist: the objective must not read it
    cfg.CLS.TEST_ROOT = str(tmp_path / "nowhere")
    cfg.freeze()
    second = run_search(cfg, SearchOptions(trials=5, study_name="probe", linear_probe=True))
    states = [t["state"] for t in second["trials"]]
    assert states == ["COMPLETE"] * 3 + ["FAIL"] + ["COMPLETE"] * 2
    assert second["n_counted"] == 5 and second["n_trials_requested"] == 5
    for name, stamp in stamps.items():  # completed trials were not rerun
        assert (trials_dir / name / "metrics.json").stat().st_mtime_ns == stamp
    best = max((t for t in second["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert second["best"]["number"] == best["number"] and 0 <= best["value"] <= 100
    assert second["validation_split"] == {"train": 25, "val": 7}  # 32 demo images, 20 % per class
    best_cfg = load_config(second["best"]["config"])
    assert best["params"]["CLS.SOLVER.BASE_LR"] == best_cfg.CLS.SOLVER.BASE_LR
    assert best["params"]["CLS.SOLVER.WEIGHT_DECAY"] == best_cfg.CLS.SOLVER.WEIGHT_DECAY
    on_disk = json.loads((tmp_path / "search" / "search_results.json").read_text())
    assert on_disk == second

    with pytest.raises(ValueError, match="study 'probe' was started with protocol"):
        run_search(cfg, SearchOptions(trials=5, study_name="probe", linear_probe=False))


def test_detection_search_scores_a_held_out_split(in_demo_workdir, tmp_path):
    cfg = tiny_config(
        TINY_FINETUNE,
        tmp_path,
        *["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()"],
        *["DET_SEARCH.VAL_FRACTION", "0.25"],
    )
    cfg.defrost()  # a test split that does not exist: the search must not evaluate on it
    cfg.DATASETS.TEST = ("no_such_set",)
    cfg.freeze()
    report = run_search(cfg, SearchOptions(trials=1, study_name="det"))
    (trial,) = report["trials"]
    assert trial["state"] == "COMPLETE" and 0.0 <= trial["value"] <= 100.0
    assert report["metric"] == "validation AP50" and report["task"] == "detection"
    assert report["validation_split"] == {"train": 18, "val": 6}  # 24 demo images
    assert set(trial["params"]) == {"SOLVER.BASE_LR", "SOLVER.WEIGHT_DECAY"}
    assert (tmp_path / "trials" / "trial_0000" / "metrics.json").is_file()
