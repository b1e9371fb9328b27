"""aggregate_seeds.py / compare_runs.py average and compare only seeds of one experiment (real
processes): a file whose config, data, weights or metrics differ is refused by name; --allow-mix
is recorded; a search study continued with other data or another schedule is refused."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from bissl_det.runtime.setup import load_config
from bissl_det.search import SearchOptions, open_study, search_task
from bissl_det.search.run import _identity
from bissl_det.search.study import check_study_identity
from tests.helpers import REPO
from tests.tools.test_eval_cls import CLS_DEMO, TINY, backbone  # noqa: F401  (fixture)
from tools.aggregate_seeds import main as aggregate_main
from tools.compare_runs import main as compare_main

import pytest

CONFIG = {"SOLVER.BASE_LR": 0.01, "SOLVER.MAX_ITER": 100, "MODEL.RESNETS.DEPTH": 50}
DATA = {"train": {"voc_trainval": 24}, "test": {"voc_test": 8}}


def _record(seed: int, ap: float, **changes) -> dict:
    provenance = {
        "seed": seed,
        "command": ["python", "tools/finetune_det.py"],
        "config_values": dict(CONFIG),
        "weights": {"path": "/w.pth", "sha256": "aa"},
        "data": copy.deepcopy(DATA),
    }
    for key, value in changes.items():
        if key == "metrics":
            continue
        if key in CONFIG:
            provenance["config_values"][key] = value
        else:
            provenance[key] = value
    metrics = changes.get("metrics", {"voc_test": {"AP": ap, "AP50": 2 * ap}})
    return {**metrics, "units": "percent", "provenance": provenance}


def _write(folder: Path, name: str, records: list[dict]) -> list[Path]:
    paths = []
    for i, record in enumerate(records):
        path = folder / f"{name}_s{i}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        paths.append(path)
    return paths


def _tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _in_process(name: str, *args) -> subprocess.CompletedProcess:
    """The tool's main() in this process (fast), as a CompletedProcess: a refusal is its
    SystemExit message on stderr. Real processes run the cases below marked as such."""
    main = {"aggregate_seeds.py": aggregate_main, "compare_runs.py": compare_main}[name]
    try:
        main([*map(str, args)])
    except SystemExit as e:
        return subprocess.CompletedProcess(name, 1, "", str(e.code))
    return subprocess.CompletedProcess(name, 0, "", "")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "change, named",
    [
        ({"SOLVER.BASE_LR": 0.02}, "config SOLVER.BASE_LR: 0.02 here, 0.01 in the first file"),
        ({"SOLVER.MAX_ITER": 200}, "config SOLVER.MAX_ITER: 200 here, 100 in the first file"),
        ({"weights": {"path": "/v.pth", "sha256": "bb"}}, "MODEL.WEIGHTS (sha256): 'bb' here"),
        ({"data": {**DATA, "test": {"voc_test": 5}}}, "test data: {'voc_test': 5} here"),
        ({"command": ["python", "tools/train_bissl.py"]}, "tool: 'train_bissl.py' here"),
    ],
)
def test_aggregate_refuses_a_run_that_differs_and_records_an_allowed_mix(tmp_path, change, named):
    paths = _write(
        tmp_path, "run", [_record(0, 50.0), _record(1, 52.0), _record(2, 54.0, **change)]
    )
    out = tmp_path / "summary.json"
    out.write_text("{}\n")  # an earlier summary: must survive the refusal
    before = _sha(out)
    run = _tool if "SOLVER.BASE_LR" in named else _in_process  # one case as a real process
    done = run("aggregate_seeds.py", *paths, "--out", out)
    assert done.returncode != 0 and str(paths[2]) in done.stderr and named in done.stderr
    assert "--allow-mix" in done.stderr and _sha(out) == before
    mixed = run("aggregate_seeds.py", *paths, "--out", out, "--allow-mix")
    assert mixed.returncode == 0, mixed.stderr
    check = json.loads(out.read_text())["provenance_check"]
    assert check["allowed_mix"] and named in check["differences"][0]


@pytest.mark.e2e
def test_seeds_of_one_experiment_aggregate_without_a_flag(tmp_path):
    paths = _write(tmp_path, "run", [_record(0, 50.0), _record(1, 52.0), _record(2, 54.0)])
    done = _tool("aggregate_seeds.py", *paths, "--out", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["metrics"]["voc_test/AP"]["mean"] == 52.0
    assert record["provenance_check"] == {"allowed_mix": False, "differences": []}


@pytest.mark.e2e
@pytest.mark.parametrize("tool", ["aggregate_seeds.py", "compare_runs.py"])
def test_a_metric_missing_in_one_file_is_named_even_with_allow_mix(tmp_path, tool):
    lacking = _record(1, 52.0, metrics={"voc_test": {"AP": 52.0}})
    paths = _write(tmp_path, "run", [_record(0, 50.0), lacking])
    if tool == "aggregate_seeds.py":
        done = _in_process(tool, *paths, "--allow-mix")
    else:
        base = _write(tmp_path, "base", [_record(0, 40.0), _record(1, 41.0)])
        out = tmp_path / "c"
        done = _tool(tool, "--baseline", *base, "--treatment", *paths, "--allow-mix", "--out", out)
    assert done.returncode != 0
    assert str(paths[1]) in done.stderr and "missing ['voc_test/AP50']" in done.stderr


@pytest.mark.e2e
def test_compare_refuses_groups_with_other_test_data(tmp_path):
    base = _write(tmp_path, "base", [_record(0, 40.0), _record(1, 41.0)])
    other = {**DATA, "test": {"voc_test_2012": 100}}
    bissl = _write(tmp_path, "bissl", [_record(0, 50.0, data=other), _record(1, 51.0, data=other)])
    out = tmp_path / "c"
    args = ["--baseline", *base, "--treatment", *bissl, "--out", out]
    done = _tool("compare_runs.py", *args)
    assert done.returncode != 0 and str(bissl[0]) in done.stderr and "test data" in done.stderr
    assert not out.with_suffix(".json").exists() and not Path(f"{out}.json").exists()
    mixed = _tool("compare_runs.py", *args, "--allow-mix")
    assert mixed.returncode == 0, mixed.stderr
    check = json.loads(Path(f"{out}.json").read_text())["provenance_check"]
    assert check["between"]["allowed_mix"] and not check["baseline"]["allowed_mix"]


def test_compare_refuses_a_treatment_group_that_mixes_configs(tmp_path):
    base = _write(tmp_path, "base", [_record(0, 40.0), _record(1, 41.0)])
    bissl = _write(tmp_path, "bissl", [_record(0, 50.0), _record(1, 51.0, **{"SOLVER.BASE_LR": 1})])
    args = ["--baseline", *base, "--treatment", *bissl, "--out", tmp_path / "c"]
    done = _in_process("compare_runs.py", *args)
    assert done.returncode != 0 and str(bissl[1]) in done.stderr
    assert "config SOLVER.BASE_LR: 1 here, 0.01 in the first file" in done.stderr


# ---- A search study reused with other data or another schedule -----------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "change, named",
    [
        (["CLS.SOLVER.ITERS", "5"], "schedule"),
        (["CLS.TRAIN_ROOT", "datasets/demo/cls/test"], "data"),
    ],
)
def test_search_study_reused_with_other_data_or_schedule_is_refused(
    in_demo_workdir,
    tmp_path,
    backbone,  # noqa: F811
    change,
    named,
):
    opts = [*TINY, "MODEL.WEIGHTS", backbone, "OUTPUT_DIR", str(tmp_path / "search")]
    cfg = load_config(str(CLS_DEMO), opts)
    options = SearchOptions(trials=1, study_name="probe", linear_probe=True)
    storage = tmp_path / "search" / "search.journal"
    study = open_study(storage, "probe")  # the study as the first search left it
    check_study_identity(study, _identity(cfg, search_task(cfg), options))
    before = storage.read_bytes()
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "search.py"), "--config-file", str(CLS_DEMO)]
        + ["--trials", "1", "--study-name", "probe", "--linear-probe", *opts, *change],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=in_demo_workdir,
    )
    assert done.returncode != 0, done.stderr[-3000:]
    assert f"study 'probe' was started with {named} = " in done.stderr
    # Optuna appends a record on opening a study; every earlier record is still there.
    assert storage.read_bytes().startswith(before)
