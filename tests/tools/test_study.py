"""tools/study.py: every run once, a rerun launches nothing, a killed run is redone, and the
report's paired statistics equal a hand computation on the runs' own numbers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bissl_det.checkpoint import export_backbone
from bissl_det.engine.pretrain import build_pretrain_model
from bissl_det.study import load_study_config
from bissl_det.study.config import StudyConfigError
from bissl_det.study.runs import LAUNCH_LOG, RECORD, Run, threads_per_run
from tests.helpers import CONFIGS, NARROW_RESNET, tiny_config
from tools.study import main as study_main

import pytest
import torch

TINY_STUDY = CONFIGS / "study" / "test_tiny.yaml"


@pytest.fixture
def pretext_backbone(in_demo_workdir, tmp_path) -> str:
    """A random SimCLR pretext_backbone.pth shaped as test_tiny.yaml's runs expect."""
    cfg = tiny_config(
        CONFIGS / "quick" / "pretrain_simclr_demo.yaml", tmp_path / "pretext",
        *NARROW_RESNET, "MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    return str(
        export_backbone(model, tmp_path / "pretext", "simclr", "pretext_backbone")["detectron2"]
    )


def _launched(out: Path) -> list[str]:
    log = out / LAUNCH_LOG
    return [line.split("\t")[1] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_tiny_study_runs_once_resumes_and_reports_paired_statistics(
    in_demo_workdir, tmp_path, pretext_backbone
):
    out = tmp_path / "study"
    # A given pretext backbone (no pretraining run): 2 arms x 2 pairs x (BiSSL run, fine-tuning
    # with 2 evaluation seeds, the deterministic probe).
    argv = ["--config-file", str(TINY_STUDY), "--jobs", "2", "OUTPUT_DIR", str(out),
            "PRETEXT.WEIGHTS", pretext_backbone]  # fmt: skip
    study = study_main(argv)
    expected = sorted(
        f"{kind}/{arm}/pair_{seed}"
        for kind in ("bissl", "finetune", "probe")
        for arm in ("control", "bissl")
        for seed in (0, 1)
    )
    assert sorted(_launched(out)) == expected  # every run exactly once

    # The report's statistics, recomputed here from the runs' own cls_results.json files.
    def pair_value(arm: str, seed: int, protocol: str) -> float:
        path = out / "arms" / arm / f"pair_{seed}" / protocol / "cls_results.json"
        per_seed = json.loads(path.read_text())["per_seed"]
        seeds = [100, 101] if protocol == "finetune" else [100]  # 2 evaluation seeds; 1 probe
        assert [r["seed"] for r in per_seed] == seeds
        return statistics.fmean(r["metrics"]["top1"] for r in per_seed)

    assert [(c["a"], c["b"], c["metric"]) for c in study["comparisons"]] == [
        ("control", "bissl", "finetune/top1"),
        ("control", "bissl", "probe/top1"),
    ]
    for comparison in study["comparisons"]:
        protocol = comparison["metric"].split("/")[0]
        a = [pair_value("control", s, protocol) for s in (0, 1)]
        b = [pair_value("bissl", s, protocol) for s in (0, 1)]
        d = [y - x for x, y in zip(a, b, strict=True)]
        mean, sd = statistics.fmean(d), statistics.stdev(d)
        assert comparison["differences"] == pytest.approx(d)
        assert comparison["paired_difference"] == pytest.approx(mean)
        assert comparison["n_pairs"] == 2
        # 2 pairs: df 1, t quantile tan(0.475 pi): scipy.stats.ttest_rel's numbers, closed form.
        se = sd / math.sqrt(2)
        half = math.tan(0.475 * math.pi) * se
        assert comparison["ci95"] == pytest.approx([mean - half, mean + half])
        assert comparison["resolved"] == (abs(mean) > half)
        if se > 0:
            assert comparison["t_stat"] == pytest.approx(mean / se)
            p = 1 - 2 * math.atan(abs(mean) / se) / math.pi
            assert comparison["p_value"] == pytest.approx(p)
        else:  # every pair differs by the same amount: scipy's t is +-inf (null in JSON), and
            # its p is 0 for a nonzero difference, undefined (null) for none
            assert comparison["t_stat"] is None
            assert comparison["p_value"] == (0.0 if mean else None)
        score = study["arms"]["control"]["scores"][comparison["metric"]]
        assert score["mean"] == pytest.approx(statistics.fmean(a))
        assert score["bissl_seed_std"] == pytest.approx(statistics.stdev(a))
    assert study["arms"]["bissl"]["compute"]["bissl_lower_steps"] == 4  # 2 stages x 2 steps
    assert study["arms"]["control"]["compute"]["cpu_s_per_pair"] > 0
    stored = json.loads((out / "study.json").read_text())
    assert stored["comparisons"] == study["comparisons"]  # JSON keeps floats exactly
    for name in ("report.md", "study_arms.png", "study_differences.png", "study_compute.png"):
        assert (out / name).stat().st_size > 100, name

    # A rerun launches nothing.
    study_main(argv)
    assert len(_launched(out)) == len(expected)

    # A killed run (no record, a partial product) is redone, and only it.
    killed = out / "arms" / "bissl" / "pair_1" / "probe"
    (killed / RECORD).unlink()
    (killed / "cls_results.json").write_text("{")
    again = study_main(argv)
    assert _launched(out)[len(expected) :] == ["probe/bissl/pair_1"]
    assert again["comparisons"] == study["comparisons"]  # the redone probe: identical


def test_study_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "PRETEXT: {WEIGHTS: nowhere.pth}\n"
        "BISSL: {CONFIG: configs/quick/bissl_simclr_cls_demo.yaml}\n"
        "EVAL: {CONFIG: configs/quick/cls_demo.yaml}\nPAIRS: [0, 0]\n"
        "ARMS: [{NAME: ctl, OPTS: [BISSL.COUPLING, decoupled]}, {NAME: a, KIND: other}]\n"
        "COMPARISONS: [[ctl, zzz]]\n"
    )
    with pytest.raises(StudyConfigError) as error:
        load_study_config(str(bad))
    message = str(error.value)
    for expected in ("PAIRS", "must contain 'control'", "ARMS[1].KIND",
                     "COMPARISONS[0]"):  # fmt: skip
        assert expected in message, expected
    with pytest.raises(SystemExit, match="PRETEXT.WEIGHTS = 'nowhere.pth': no such file"):
        study_main(["--config-file", str(bad), "PAIRS", "[0, 1]", "ARMS", "[{'NAME': 'a'}]",
                    "COMPARISONS", "[]"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="study file"):
        load_study_config(str(tmp_path / "missing.yaml"))


def test_study_files_load(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    for path in sorted((CONFIGS / "study").glob("*.yaml")):
        cfg = load_study_config(str(path))
        assert cfg.ARMS and cfg.EVAL.CONFIG, path
        names = [a["NAME"] for a in cfg.ARMS]
        if path.stem != "test_tiny":  # the full studies carry every arm of the issue
            assert any("control" in n for n in names), path
            assert len(names) >= 6, path


def test_runs_resume_where_they_can_and_go_through_submit_when_asked(tmp_path):
    train = Run("bissl/a/pair_0", "train_bissl", ["--config-file", "c.yaml", "SEED", "0"],
                tmp_path / "b", "lower_backbone.pth")  # fmt: skip
    probe = Run("probe/a/pair_0", "eval_cls", ["--config-file", "e.yaml", "--logistic-probe"],
                tmp_path / "p", "cls_results.json")  # fmt: skip
    assert train.tool_args()[:1] == ["--resume"] and "--resume" not in probe.tool_args()
    assert train.tool_args()[-2:] == ["OUTPUT_DIR", str(tmp_path / "b")]
    local = train.command()
    assert local[1].endswith("tools/train_bissl.py") and local[2:] == train.tool_args()
    job = train.command(["--gpus-per-node", "8"])
    assert job[1].endswith("tools/submit.py")
    assert job[2:6] == ["train_bissl", "--wait", "--gpus-per-node", "8"]
    assert job[6:] == train.tool_args()


def test_runs_side_by_side_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert [threads_per_run(j)["OMP_NUM_THREADS"] for j in (0, 1, 2, 3, 32)] == [
        "16", "16", "8", "5", "1"
    ]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice stands
    assert threads_per_run(2)["OMP_NUM_THREADS"] == "4"
