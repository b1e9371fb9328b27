"""compare_runs.py / aggregate_seeds.py: Welch intervals by hand, t quantiles against tables."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from bissl_det.utils.stats import (
    paired_difference,
    pairs_to_resolve,
    student_t_cdf,
    student_t_quantile,
    welch_difference,
)
from tools.aggregate_seeds import main as aggregate_main
from tools.compare_runs import main as compare_main

import pytest

# Two-sided 95% (p = 0.975) and one 90% value of Student's t, from printed tables (3 decimals).
T_TABLE = [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (4, 0.975, 2.776),
           (5, 0.975, 2.571), (10, 0.975, 2.228), (30, 0.975, 2.042), (120, 0.975, 1.980),
           (10, 0.95, 1.812)]  # fmt: skip


@pytest.mark.parametrize(("df", "p", "t"), T_TABLE)
def test_own_t_quantile_matches_the_table(df, p, t):
    assert student_t_quantile(p, df) == pytest.approx(t, abs=6e-4)
    assert student_t_cdf(t, df) == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_own_t_quantile_matches_closed_forms(p):
    # df = 1 is Cauchy: tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p)).
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)))
    assert student_t_quantile(1 - p, 3.7) == pytest.approx(-student_t_quantile(p, 3.7))


def _group(values):
    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "std": std, "n": n}


def test_welch_equal_variances_by_hand():
    # s^2 = 1 in both groups of 3: se = sqrt(1/3 + 1/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4.
    d = welch_difference(_group([1.0, 2.0, 3.0]), _group([4.0, 5.0, 6.0]))
    assert (d.diff, d.se, d.df) == pytest.approx((3.0, math.sqrt(2 / 3), 4.0))
    assert d.t_crit == pytest.approx(2.776, abs=6e-4)
    assert (d.low, d.high) == pytest.approx((3 - 2.7764 * 0.8165, 3 + 2.7764 * 0.8165), abs=1e-3)
    assert d.resolved


def test_welch_unequal_variances_by_hand():
    # v_b = 1/3, v_t = (20/3)/4 = 5/3: se = sqrt(2); df = 4 / ((1/3)^2/2 + (5/3)^2/3) = 4.0755.
    d = welch_difference(_group([1.0, 2.0, 3.0]), _group([2.0, 4.0, 6.0, 8.0]))
    assert (d.diff, d.se) == pytest.approx((3.0, math.sqrt(2.0)))
    assert d.df == pytest.approx(4 / (1 / 18 + 25 / 27))
    assert 2.571 < d.t_crit < 2.776  # between the df = 5 and df = 4 table values
    assert d.low < 0 < d.high and not d.resolved
    single = {"mean": 1.0, "std": 0.0, "n": 1}
    assert welch_difference(single, _group([1.0, 2.0])) is None


def _write_runs(folder, name, aps, seed0=0):
    paths = []
    for i, ap in enumerate(aps):
        path = folder / f"{name}_s{i}" / "results.json"
        path.parent.mkdir(parents=True)
        provenance = {"seed": seed0 + i, "git": {"commit": "abc"}, "data": {"n": 7}}
        record = {"voc": {"AP": ap, "AP50": 2 * ap}, "units": "percent", "provenance": provenance}
        path.write_text(json.dumps(record))
        paths.append(path)
    return paths


def test_compare_runs_report(tmp_path, capsys):
    _write_runs(tmp_path, "base", [1.0, 2.0, 3.0])
    _write_runs(tmp_path, "bissl", [4.0, 5.0, 6.0])
    report = compare_main(
        ["--baseline", str(tmp_path / "base_s*" / "results.json"),
         "--treatment", str(tmp_path / "bissl_s*" / "results.json"), "--out", str(tmp_path / "r")]
    )  # fmt: skip
    ap = report["metrics"]["voc/AP"]
    assert ap["baseline"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert ap["interval"] == pytest.approx([0.7330, 5.2670], abs=1e-3) and ap["resolved"]
    assert set(report["metrics"]) == {"voc/AP", "voc/AP50"}  # provenance numbers left out
    assert report["units"] == "percent"
    first = report["inputs"]["baseline"][0]
    assert first["seed"] == 0
    digest = hashlib.sha256(Path(first["path"]).read_bytes()).hexdigest()
    assert first["sha256"] == digest
    md = (tmp_path / "r.md").read_text()
    assert "| voc/AP (%) | 2.00 +- 1.00 (3) | 5.00 +- 1.00 (3) | +3.00 | [+0.73, +5.27]" in md
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "resolved" in capsys.readouterr().out


def test_aggregate_records_inputs_and_feeds_compare(tmp_path):
    base = _write_runs(tmp_path, "base", [1.0, 2.0, 3.0])
    bissl = _write_runs(tmp_path, "bissl", [2.0, 4.0, 6.0, 8.0], seed0=10)
    for name, paths in (("base", base), ("bissl", bissl)):
        summary = aggregate_main([*map(str, paths), "--out", str(tmp_path / f"{name}.json")])
        assert "provenance/seed" not in summary and "units" not in summary
    record = json.loads((tmp_path / "bissl.json").read_text())
    assert record["seeds"] == [10, 11, 12, 13] and record["units"] == "percent"
    assert record["inputs"][0]["git_commit"] == "abc" and len(record["inputs"][0]["sha256"]) == 64
    report = compare_main(
        ["--baseline", str(tmp_path / "base.json"), "--treatment", str(tmp_path / "bissl.json"),
         "--out", str(tmp_path / "c")]
    )  # fmt: skip
    assert report["metrics"]["voc/AP"]["welch_df"] == pytest.approx(4.0755, abs=1e-4)
    assert report["metrics"]["voc/AP"]["resolved"] is False


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no results file matches"):
        compare_main(["--baseline", str(tmp_path / "x*.json"), "--treatment", "y", "--out", "z"])


# Paired t by hand: differences d = (2, 3, 2, 5) -> mean 3, sample std sqrt(2), df 3.
PAIRED_A = [10.0, 11.0, 12.0, 13.0]
PAIRED_B = [12.0, 14.0, 14.0, 18.0]


def test_paired_difference_by_hand():
    d = paired_difference(PAIRED_A, PAIRED_B)
    std = math.sqrt(2.0)
    assert (d.n, d.df, d.diff, d.std) == (4, 3, 3.0, pytest.approx(std))
    t = 3.0 / (std / 2)
    assert d.t_stat == pytest.approx(t)  # scipy.stats.ttest_rel(b, a).statistic
    # p by the closed-form t CDF of df 3: 1/2 + (u / (1 + u^2) + atan u) / pi, u = t/sqrt3.
    u = t / math.sqrt(3.0)
    assert d.p_value == pytest.approx(1.0 - 2.0 * (u / (1 + u * u) + math.atan(u)) / math.pi)
    assert d.t_crit == pytest.approx(3.182, abs=6e-4)  # the t table, df 3
    assert (d.low, d.high) == pytest.approx((3 - d.t_crit * std / 2, 3 + d.t_crit * std / 2))
    assert d.resolved
    # Two pairs, df 1 (Cauchy): p = 2 (1/2 - atan(|t|)/pi); CI half-width tan(0.475 pi) sd / sqrt2.
    two = paired_difference([0.0, 0.0], [1.0, 3.0])
    t = 2.0 / (math.sqrt(2.0) / math.sqrt(2.0))
    assert two.t_stat == pytest.approx(t)
    assert two.p_value == pytest.approx(1.0 - 2.0 * math.atan(t) / math.pi, rel=1e-8)
    assert two.high - two.diff == pytest.approx(math.tan(0.475 * math.pi) * 1.0, rel=1e-9)
    assert not two.resolved
    assert paired_difference([1.0], [2.0]) is None


def test_pairs_to_resolve_is_the_smallest_sufficient_n():
    # |mean| = 1, std = 2: n must satisfy t_{0.975, n-1} * 2 / sqrt(n) < 1, first at n = 18.
    n = pairs_to_resolve(1.0, 2.0)
    assert student_t_quantile(0.975, n - 1) * 2 / math.sqrt(n) < 1.0
    assert student_t_quantile(0.975, n - 2) * 2 / math.sqrt(n - 1) >= 1.0
    assert n == 18
    assert pairs_to_resolve(0.0, 1.0) is None and pairs_to_resolve(1.0, 0.0) == 2


def _cls_results(path: Path, seeds, top1s):
    path.parent.mkdir(parents=True, exist_ok=True)
    per_seed = [
        {"seed": s, "metrics": {"top1": t, "mean_per_class_acc": t - 1}}
        for s, t in zip(seeds, top1s, strict=True)
    ]
    record = {
        "protocol": "finetune",
        "num_train": 50,
        "hparams": {"lr": 0.01},
        "per_seed": per_seed,
        "mean": {"top1": sum(top1s) / len(top1s)},
        "std": {"top1": 0.0},
        "units": {"top1": "percent"},
        "provenance": {"seed": seeds[0]},
    }
    path.write_text(json.dumps(record))
    return path


def test_compare_reads_cls_results_and_pairs_by_seed(tmp_path, capsys):
    base = _cls_results(tmp_path / "base" / "cls_results.json", [0, 1, 2, 3], PAIRED_A)
    # The treatment's seeds in another order: pairing is by seed, not by position.
    bissl = _cls_results(tmp_path / "bissl" / "cls_results.json", [3, 1, 0, 2], [18, 14, 12, 14])
    out = tmp_path / "paired"
    args = ["--baseline", str(base), "--treatment", str(bissl), "--out", str(out)]
    report = compare_main([*args, "--paired"])
    top1 = report["metrics"]["top1"]
    assert set(report["metrics"]) == {"top1", "mean_per_class_acc"}  # no hparams, no mean/std
    d = paired_difference(PAIRED_A, PAIRED_B)
    assert top1["paired_difference"] == pytest.approx(3.0) and top1["n_pairs"] == 4
    assert top1["interval"] == pytest.approx([d.low, d.high]) and top1["resolved"]
    assert top1["seeds"] == [0, 1, 2, 3] and top1["pairs_to_resolve"] == d.pairs_to_resolve
    assert top1["baseline"]["n"] == 4 and top1["baseline"]["mean"] == pytest.approx(11.5)
    assert "paired t" in (tmp_path / "paired.md").read_text()
    # Unpaired (Welch) on the same files: a wider interval, not resolved.
    welch = compare_main([*args[:-1], str(tmp_path / "welch")])["metrics"]["top1"]
    assert welch["interval"][1] - welch["interval"][0] > d.high - d.low and not welch["resolved"]
    # Seeds that do not match are refused, naming both sets.
    other = _cls_results(tmp_path / "other" / "cls_results.json", [7, 8], [1.0, 2.0])
    with pytest.raises(SystemExit, match=r"seeds differ.*\[0, 1, 2, 3\].*\[7, 8\]"):
        compare_main(
            ["--baseline", str(base), "--treatment", str(other), "--out", str(out), "--paired"]
        )


def test_single_runs_show_no_spread(tmp_path, capsys):
    base = _cls_results(tmp_path / "a" / "cls_results.json", [0], [10.0])
    bissl = _cls_results(tmp_path / "b" / "cls_results.json", [0], [12.0])
    compare_main(["--baseline", str(base), "--treatment", str(bissl), "--out", str(tmp_path / "r")])
    md = (tmp_path / "r.md").read_text()
    assert "| 10.00 +- n/a (1) | 12.00 +- n/a (1) | +2.00 |" in md and "+- 0.00" not in md
    summary = aggregate_main([str(base), str(bissl)])
    assert summary["top1"]["n"] == 2  # one run per file, both read
    out = capsys.readouterr().out
    single = aggregate_main([str(base)])
    assert single["top1"]["n"] == 1 and "n/a" in capsys.readouterr().out and "+- 0.00" not in out
