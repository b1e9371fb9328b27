#!/usr/bin/env python
"""`make demo`: the whole BiSSL pipeline on the synthetic demo set, baseline vs BiSSL.

    python tools/run_demo.py [--fresh] [--out output/demo] [-- KEY VALUE ...]

1. datasets/make_demo_data.py writes the SYNTHETIC demo set (shapes on noise, VOC + ImageFolder).
2. tools/pretrain_ssl.py: SimCLR pretraining of the (narrow) ResNet-50 from scratch.
3. tools/train_bissl.py: head warm-up + BiSSL stages with a Faster R-CNN R50-C4 upper level.
4. tools/finetune_det.py from the pretext backbone (baseline) and from BiSSL's lower backbone,
   same seed and schedule; and an untrained detector evaluated as the floor.
5. tools/eval_cls.py linear probes of both backbones on the classification set.
Writes output/demo/report.json and output/demo/plots/*.png, prints the side-by-side table.
Every step is a real tool run; KEY VALUE arguments after ``--`` go to every step.

SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are forwarded to the running tool, which checkpoints and
exits (runtime/signals.py, the same forwarding as the launcher's); the demo then exits non-zero (the
tool's code, 75 when it checkpointed), and ``--resume`` continues every step from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bissl_det.runtime.signals import SignalForwarder

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick"


def run(step: str, argv: list[str], log_dir: Path) -> float:
    """Run one tool, streaming its output to the console and to a log file; returns seconds.

    Signals to this process are forwarded to the tool; once it has exited, this one exits
    non-zero (the tool's exit code, or 128 + the signal's number if the tool died of it).
    """
    print(f"\n=== {step}: {' '.join(argv)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_dir / f"{step}.log", "w") as log, SignalForwarder() as forwarder:
        process = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        forwarder.add([process.pid])
        try:
            for line in process.stdout:
                log.write(line)
                if "eta" in line or "iter" in line.lower() or "Error" in line or "results" in line:
                    print(line.rstrip()[-200:], flush=True)
            code = process.wait()
        finally:
            if process.poll() is None:  # this process failed: never leave the tool running
                process.kill()
                process.wait()
    received = forwarder.received
    if received:
        name = signal.Signals(received[0]).name
        print(
            f"=== {step} interrupted by {name} (exit {code}); see {log_dir / step}.log; "
            "tools/run_demo.py --resume continues",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(code if code > 0 else 128 + received[0])
    if code != 0:
        raise SystemExit(f"{step} failed (exit {code}); see {log_dir / step}.log")
    seconds = time.perf_counter() - start
    print(f"=== {step} done in {seconds:.0f} s", flush=True)
    return seconds


def detection(results_file: Path) -> dict[str, float]:
    return json.loads(results_file.read_text())["demo_voc_test"]


def classification(results_file: Path) -> dict[str, float]:
    return json.loads(results_file.read_text())["mean"]


def plot_metrics_bars(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (name, key) for name in ("detection", "classification") for key in report[name]["bissl"]
    ]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.27
    for i, run_name in enumerate(("untrained", "baseline", "bissl")):
        values = [report[group].get(run_name, {}).get(key, 0.0) for group, key in rows]
        ax.bar([j + (i - 1) * width for j in range(len(rows))], values, width, label=run_name)
    ax.set_xticks(range(len(rows)), [key for _, key in rows])
    ax.set_ylabel("%")
    ax.set_title("Demo: untrained vs pretext baseline vs BiSSL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    # What it does and how to run it first (bissl_det.utils.cli.describe, without its import).
    head, example, rest = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(
        description=f"{head}\n\n{example}",
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("output/demo"))
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo results first")
    parser.add_argument(
        "--resume", action="store_true", help="continue interrupted steps from their checkpoints"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for every step")
    args = parser.parse_args(argv)
    extra = [o for o in args.opts if o != "--"]
    out = args.out if args.out.is_absolute() else REPO / args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    logs, times = out / "logs", {}
    start = time.perf_counter()

    if not (REPO / "datasets" / "demo" / "demo_info.json").exists():
        times["data"] = run("data", ["datasets/make_demo_data.py", "--out", "datasets/demo"], logs)
    pretext = out / "pretrain" / "pretext_backbone.pth"
    bissl = out / "bissl" / "lower_backbone.pth"

    def tool(name, config, *opts):
        resume = ["--resume"] if args.resume else []
        return [f"tools/{name}.py", "--config-file", str(QUICK / config), *resume, *opts, *extra]

    times["pretrain"] = run(
        "pretrain",
        tool("pretrain_ssl", "pretrain_simclr_demo.yaml", "OUTPUT_DIR", str(out / "pretrain")),
        logs,
    )
    times["bissl"] = run(
        "bissl",
        tool("train_bissl", "bissl_simclr_C4_demo.yaml", "MODEL.WEIGHTS", str(pretext),
             "OUTPUT_DIR", str(out / "bissl")),
        logs,
    )  # fmt: skip
    runs = {"baseline": pretext, "bissl": bissl}
    for name, weights in runs.items():
        times[f"finetune_{name}"] = run(
            f"finetune_{name}",
            tool("finetune_det", "finetune_C4_demo.yaml", "MODEL.WEIGHTS", str(weights),
                 "OUTPUT_DIR", str(out / f"finetune_{name}"), "SEED", "0"),
            logs,
        )  # fmt: skip
    times["untrained"] = run(
        "untrained",
        tool("finetune_det", "finetune_C4_demo.yaml", "--eval-only", "MODEL.WEIGHTS", "",
             "OUTPUT_DIR", str(out / "untrained"), "SEED", "0"),
        logs,
    )  # fmt: skip
    for name, weights in runs.items():
        times[f"cls_{name}"] = run(
            f"cls_{name}",
            tool("eval_cls", "cls_demo.yaml", "--linear-probe", "MODEL.WEIGHTS", str(weights),
                 "OUTPUT_DIR", str(out / f"cls_{name}"), "SEED", "0"),
            logs,
        )  # fmt: skip

    report = {
        "data": "SYNTHETIC demo set (datasets/make_demo_data.py): coloured shapes on noise",
        "detection": {
            "untrained": detection(out / "untrained" / "results.json"),
            **{name: detection(out / f"finetune_{name}" / "results.json") for name in runs},
        },
        "classification": {
            name: classification(out / f"cls_{name}" / "cls_results.json") for name in runs
        },
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for png in (out / "bissl" / "plots").glob("*.png"):
        shutil.copy(png, plots / png.name)
    plot_metrics_bars(report, plots / "final_metrics.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))

    print("\n| metric | untrained | pretext baseline | BiSSL |\n|---|---|---|---|")
    for key, value in report["detection"]["bissl"].items():
        det = report["detection"]
        print(f"| {key} | {det['untrained'][key]:.1f} | {det['baseline'][key]:.1f} | {value:.1f} |")
    for key, value in report["classification"]["bissl"].items():
        base = report["classification"]["baseline"][key]
        print(f"| linear probe {key} | - | {base:.1f} | {value:.1f} |")
    print(
        f"\nreport: {out / 'report.json'}; plots: {plots}; {report['total_seconds']:.0f} s in all"
    )
    return report


if __name__ == "__main__":
    main()
