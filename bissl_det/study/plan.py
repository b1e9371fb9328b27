"""From a study file to its runs (bissl_det.study.runs.Run), folder by folder.

    OUTPUT_DIR/pretext/                      pretrain_ssl.py (once; skipped with PRETEXT.WEIGHTS)
    OUTPUT_DIR/search/                       search.py on the pretext backbone (EVAL.SEARCH.TRIALS)
    OUTPUT_DIR/arms/<arm>/pair_<seed>/bissl/ train_bissl.py with SEED <seed>
    OUTPUT_DIR/arms/<arm>/<unit>/finetune/   eval_cls.py --seeds N (classification), or
                                             finetune/seed_<s>/: finetune_det.py (detection)
    OUTPUT_DIR/arms/<arm>/<unit>/probe/      eval_cls.py --logistic-probe

``<unit>`` is pair_<seed> for BiSSL arms and "backbone" for the pretext arm, which has one
backbone for all pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import arm_kind
from .runs import Run

PRETEXT_PRODUCT = "pretext_backbone.pth"
BISSL_PRODUCT = "lower_backbone.pth"
CLS_PRODUCT = "cls_results.json"
DET_PRODUCT = "results.json"
SEARCH_PRODUCT = "best_config.yaml"
# Phases: what must exist before a run can start.
PRETEXT_PHASE, SEARCH_PHASE, BISSL_PHASE, EVAL_PHASE = range(4)


@dataclass(frozen=True)
class Evaluation:
    """Where one backbone's scores are: ``protocol`` "finetune" or "probe", its runs' keys."""

    arm: str
    unit: str  # pair_<seed> or "backbone"
    protocol: str
    keys: tuple[str, ...]
    products: tuple[Path, ...]


class StudyPlan:
    """The runs of a study and, per arm and unit, the evaluations that score it."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.root = Path(cfg.OUTPUT_DIR)
        self.runs: list[Run] = []
        self.evaluations: list[Evaluation] = []
        self.bissl_runs: dict[tuple[str, str], Run] = {}  # (arm, unit) -> its train_bissl run
        self.pretext_weights = self._pretext()
        self.eval_config = self._search()
        for arm in cfg.ARMS:
            name = str(arm["NAME"])
            if arm_kind(arm) == "pretext":
                self._evaluate(name, "backbone", self.pretext_weights)
                continue
            for seed in cfg.PAIRS:
                unit = f"pair_{seed}"
                run = Run(
                    key=f"bissl/{name}/{unit}",
                    tool="train_bissl",
                    args=[
                        "--config-file",
                        cfg.BISSL.CONFIG,
                        *map(str, cfg.BISSL.OPTS),
                        *map(str, arm.get("OPTS", [])),
                        "MODEL.WEIGHTS",
                        self.pretext_weights,
                        "SEED",
                        str(seed),
                    ],  # fmt: skip
                    output_dir=self.root / "arms" / name / unit / "bissl",
                    product=BISSL_PRODUCT,
                    inputs=[cfg.BISSL.CONFIG, self.pretext_weights],
                    phase=BISSL_PHASE,
                    weights=self.pretext_weights,
                )
                self.runs.append(run)
                self.bissl_runs[(name, unit)] = run
                self._evaluate(name, unit, str(run.product_path))

    def _pretext(self) -> str:
        cfg = self.cfg
        if cfg.PRETEXT.WEIGHTS:
            return str(cfg.PRETEXT.WEIGHTS)
        run = Run(
            key="pretext",
            tool="pretrain_ssl",
            args=["--config-file", cfg.PRETEXT.CONFIG, *map(str, cfg.PRETEXT.OPTS)],
            output_dir=self.root / "pretext",
            product=PRETEXT_PRODUCT,
            inputs=[cfg.PRETEXT.CONFIG],
            phase=PRETEXT_PHASE,
        )
        self.runs.append(run)
        return str(run.product_path)

    def _search(self) -> str:
        """The evaluation config: EVAL.CONFIG, or search.py's best_config.yaml."""
        cfg = self.cfg
        if cfg.EVAL.SEARCH.TRIALS <= 0 or not cfg.EVAL.FINETUNE:
            return str(cfg.EVAL.CONFIG)
        run = Run(
            key="search",
            tool="search",
            args=[
                "--config-file",
                cfg.EVAL.CONFIG,
                "--trials",
                str(cfg.EVAL.SEARCH.TRIALS),
                *map(str, cfg.EVAL.SEARCH.ARGS),
                *map(str, cfg.EVAL.OPTS),
                "MODEL.WEIGHTS",
                self.pretext_weights,
            ],  # fmt: skip
            output_dir=self.root / "search",
            product=SEARCH_PRODUCT,
            inputs=[cfg.EVAL.CONFIG, self.pretext_weights],
            phase=SEARCH_PHASE,
        )
        self.runs.append(run)
        return str(run.product_path)

    def _evaluate(self, arm: str, unit: str, weights: str) -> None:
        cfg = self.cfg
        folder = self.root / "arms" / arm / unit
        # Tool flags first, then the KEY VALUE overrides (the tools' argument order).
        opts = [*map(str, cfg.EVAL.OPTS), "MODEL.WEIGHTS", weights]
        common = {"inputs": [self.eval_config, weights], "phase": EVAL_PHASE, "weights": weights}
        first = int(cfg.EVAL.FIRST_SEED)
        if cfg.EVAL.FINETUNE and cfg.TASK == "classification":
            run = Run(
                key=f"finetune/{arm}/{unit}",
                tool="eval_cls",
                args=[
                    "--config-file",
                    self.eval_config,
                    "--seeds",
                    str(cfg.EVAL.SEEDS),
                    *opts,
                    "SEED",
                    str(first),
                ],  # fmt: skip
                output_dir=folder / "finetune",
                product=CLS_PRODUCT,
                **common,
            )
            self._add_evaluation(arm, unit, "finetune", [run])
        elif cfg.EVAL.FINETUNE:
            runs = [
                Run(
                    key=f"finetune/{arm}/{unit}/seed_{seed}",
                    tool="finetune_det",
                    args=["--config-file", self.eval_config, *opts, "SEED", str(seed)],
                    output_dir=folder / "finetune" / f"seed_{seed}",
                    product=DET_PRODUCT,
                    **common,
                )
                for seed in range(first, first + int(cfg.EVAL.SEEDS))
            ]
            self._add_evaluation(arm, unit, "finetune", runs)
        if cfg.EVAL.LOGISTIC_PROBE:
            run = Run(
                key=f"probe/{arm}/{unit}",
                tool="eval_cls",
                # The probe needs no search: its L2 is chosen inside, on a validation split.
                args=[
                    "--config-file",
                    str(cfg.EVAL.CONFIG),
                    "--logistic-probe",
                    *opts,
                    "SEED",
                    str(first),
                ],  # fmt: skip
                output_dir=folder / "probe",
                product=CLS_PRODUCT,
                inputs=[str(cfg.EVAL.CONFIG), weights],
                phase=EVAL_PHASE,
                weights=weights,
            )
            self._add_evaluation(arm, unit, "probe", [run])

    def _add_evaluation(self, arm: str, unit: str, protocol: str, runs: list[Run]) -> None:
        self.runs += runs
        self.evaluations.append(
            Evaluation(
                arm, unit, protocol, tuple(r.key for r in runs), tuple(r.product_path for r in runs)
            )
        )

    def runs_of(self, arm: str, unit: str) -> list[Run]:
        """The runs an arm's unit owns (its BiSSL run and evaluations): its compute."""
        keys = {k for e in self.evaluations if (e.arm, e.unit) == (arm, unit) for k in e.keys}
        own = [r for r in self.runs if r.key in keys]
        bissl = self.bissl_runs.get((arm, unit))
        return [bissl, *own] if bissl else own
