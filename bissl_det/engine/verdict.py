"""Whether each BiSSL stage's implicit-gradient system was solved: warnings and a summary.

The trainer logs per stage the true relative residual of its solves, the count of negative-
curvature directions, ``||x|| / ||g||`` and the extreme eigenvalue estimates of
``A = I + C / (lambda + delta)``. A stage is **out of range** when

* the worst true residual of its solves exceeds ``BISSL.HYPERGRAD.WARN_RESIDUAL`` (x is not the
  solution of the system: the hypergradient is some other vector), or
* the system is indefinite: a solver met a direction with ``p^T A p <= 0``, the smallest
  eigenvalue estimate is <= 0, or ``||x|| / ||g|| > 1`` (impossible for ``C >= 0``, whose
  ``A >= I`` shrinks every vector).

:class:`HypergradientVerdict` logs a WARNING for such a stage (the first, then those on
``LOG_PERIOD``) naming the key to change and a value, and keeps a summary for results.json.
The values come from the logged eigenvalues: CG (and a Lanczos basis, its Krylov space) needs
about ``sqrt(kappa) / 2 * ln(2 / tol)`` products to reach a relative error ``tol`` on a system
of condition ``kappa`` (the classical bound ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k``);
a damping ``delta'`` with ``lambda + delta' >= 2 |c_min|`` keeps the smallest eigenvalue of
``A`` at >= 1/2 for the estimated most negative curvature ``c_min = (eig_min - 1)(lambda+delta)``.
Ritz values lie inside the spectrum, so both values are lower bounds.
"""

from __future__ import annotations

import logging
import math

from detectron2.engine import HookBase

__all__ = ["HypergradientVerdict", "iterations_for", "stage_problems"]

logger = logging.getLogger(__name__)


def iterations_for(kappa: float, tol: float) -> int:
    """Products CG needs for relative error ``tol`` at condition ``kappa`` (the classical bound)."""
    return max(1, math.ceil(math.sqrt(max(kappa, 1.0)) / 2.0 * math.log(2.0 / tol)))


def _iteration_key(hg) -> str:
    return "BISSL.HYPERGRAD.BASIS_SIZE" if hg.SOLVER == "lanczos" else "BISSL.HYPERGRAD.MAX_ITER"


def stage_problems(metrics: dict[str, float], hg, lam: float) -> tuple[list[str], str]:
    """What is out of range in one stage's ``metrics`` and what to change (one advice line).

    ``hg``: BISSL.HYPERGRAD; ``lam``: BISSL.LAMBDA. Returns ``([], "")`` for a sound stage.
    """
    problems = []
    residual = metrics.get("hypergrad_rel_residual_max", math.nan)
    negative = metrics.get("hypergrad_negative_curvature", 0.0)
    ratio = metrics.get("hypergrad_norm_ratio", 0.0)
    eig_min = metrics.get("hypergrad_eig_min", math.nan)
    eig_max = metrics.get("hypergrad_eig_max", math.nan)
    if residual > hg.WARN_RESIDUAL:
        problems.append(f"true residual {residual:.3g} > {hg.WARN_RESIDUAL:g}")
    if negative > 0:
        problems.append(f"negative curvature met ({negative:.2g} per solve)")
    if eig_min <= 0:
        problems.append(f"eig_min(A) {eig_min:.3g} <= 0")
    if ratio > 1:
        problems.append(f"|x|/|g| {ratio:.3g} > 1")
    if not problems:
        return [], ""
    indefinite = negative > 0 or eig_min <= 0 or ratio > 1
    if indefinite:
        advice = "the system is indefinite: use BISSL.HYPERGRAD.CURVATURE ggn (PSD)"
        if hg.CURVATURE == "ggn":  # the GGN is PSD: only rounding or a wrong product gets here
            advice = "the system is indefinite although C is the GGN: check the precision (fp32)"
        if eig_min <= 0 and math.isfinite(eig_min):
            c_min = (eig_min - 1.0) * (lam + hg.DAMPING)
            damping = 2.0 * abs(c_min) - lam
            advice += f", or BISSL.HYPERGRAD.DAMPING {damping:.3g} (now {hg.DAMPING:g})"
        elif not math.isfinite(eig_min):
            advice += " (BISSL.HYPERGRAD.EIGEN_STEPS 8 would estimate a DAMPING)"
        return problems, advice
    key = _iteration_key(hg)
    now = hg.BASIS_SIZE if key.endswith("BASIS_SIZE") else hg.MAX_ITER
    if eig_min > 0 and math.isfinite(eig_max):
        kappa = eig_max / eig_min
        target = hg.TOL if 0 < hg.TOL < hg.WARN_RESIDUAL else hg.WARN_RESIDUAL / 3.0
        needed = iterations_for(kappa, target)
        return problems, (
            f"raise {key} to >= {max(needed, now + 1)} (now {now}): condition estimate "
            f"{kappa:.3g} = {eig_max:.3g} / {eig_min:.3g}, sqrt(kappa)/2 ln(2/{target:.2g}) "
            f"products for a residual of {target:.2g}; or raise BISSL.HYPERGRAD.DAMPING "
            f"(now {hg.DAMPING:g}), which lowers kappa"
        )
    return problems, (
        f"raise {key} (now {now}; try {2 * now}); BISSL.HYPERGRAD.EIGEN_STEPS > 0 would log the "
        "eigenvalues that size it"
    )


class HypergradientVerdict(HookBase):
    """WARNING for out-of-range stages during the run; :attr:`summary` for results.json."""

    def __init__(self, cfg):
        self.hg, self.lam = cfg.BISSL.HYPERGRAD, cfg.BISSL.LAMBDA
        self.period = max(1, cfg.BISSL.LOG_PERIOD)
        self.checked = 0
        self.out_of_range: list[int] = []
        self.worst_residual = -math.inf
        self.min_eig = math.inf
        self.max_eig = -math.inf
        self.negative_stages = 0
        self.advice = ""

    def after_step(self) -> None:
        latest = {k: v for k, (v, _) in self.trainer.storage.latest().items()}
        if "hypergrad_rel_residual_max" not in latest:
            return  # a decoupled run solves nothing
        stage, total = self.trainer.iter + 1, self.trainer.max_iter
        self.checked += 1
        residual = latest["hypergrad_rel_residual_max"]
        if math.isfinite(residual):
            self.worst_residual = max(self.worst_residual, residual)
        self.min_eig = min(self.min_eig, latest.get("hypergrad_eig_min", math.inf))
        self.max_eig = max(self.max_eig, latest.get("hypergrad_eig_max", -math.inf))
        self.negative_stages += latest.get("hypergrad_negative_curvature", 0.0) > 0
        problems, advice = stage_problems(latest, self.hg, self.lam)
        if not problems:
            return
        self.out_of_range.append(stage)
        self.advice = advice
        if len(self.out_of_range) == 1 or stage % self.period == 0 or stage == total:
            logger.warning(
                "stage %d/%d hypergradient out of range (%s): %s",
                stage, total, "; ".join(problems), advice,
            )  # fmt: skip

    @property
    def summary(self) -> dict:
        """The run's verdict: stages checked and out of range, worst residual, eigenvalues."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "stages_checked": self.checked,
            "stages_out_of_range": len(self.out_of_range),
            "out_of_range_stages": self.out_of_range,
            "stages_with_negative_curvature": int(self.negative_stages),
            "worst_rel_residual": finite(self.worst_residual),
            "warn_residual": self.hg.WARN_RESIDUAL,
            "min_eig": finite(self.min_eig),
            "max_eig": finite(self.max_eig),
            "advice": self.advice,
        }

    def after_train(self) -> None:
        s = self.summary
        if s["stages_out_of_range"]:
            logger.warning(
                "Hypergradient verdict: %d of %d stages out of range (worst true residual %.3g, "
                "min eig(A) %.3g, negative curvature in %d stages); last advice: %s",
                s["stages_out_of_range"], s["stages_checked"], self.worst_residual,
                self.min_eig, s["stages_with_negative_curvature"], s["advice"],
            )  # fmt: skip
        elif s["stages_checked"]:
            logger.info(
                "Hypergradient verdict: all %d stages in range (worst true residual %.3g <= %g)",
                s["stages_checked"], self.worst_residual, self.hg.WARN_RESIDUAL,
            )  # fmt: skip
