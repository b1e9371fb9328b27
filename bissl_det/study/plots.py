"""The study's PNG plots: arms (mean +- std, pairs as dots, the two variances), paired
differences with their intervals, and compute per arm."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_study(study: dict, out_dir: Path) -> None:
    plt = _pyplot()
    arms = list(study["arms"])
    labels = sorted({label for a in study["arms"].values() for label in a["scores"]})

    # Arms: per metric, mean +- std over pairs with each pair's value; and the two stds.
    fig, axes = plt.subplots(len(labels), 2, figsize=(11, 1.0 + 0.5 * len(arms) * len(labels)))
    axes = axes.reshape(len(labels), 2)
    for row, label in enumerate(labels):
        left, right = axes[row]
        for y, name in enumerate(arms):
            score = study["arms"][name]["scores"].get(label)
            if score is None:
                continue
            values = [p["value"] for p in score["pairs"].values()]
            left.errorbar([score["mean"]], [y], xerr=[score["std"] or 0.0], fmt="o", capsize=3)
            left.scatter(values, [y] * len(values), s=12, color="grey", zorder=3)
            for offset, key in ((-0.15, "eval_seed_std"), (0.15, "bissl_seed_std")):
                if score[key] is not None:
                    colour = "tab:blue" if key == "eval_seed_std" else "tab:orange"
                    right.barh(y + offset, score[key], height=0.3, color=colour)
        left.set_yticks(range(len(arms)), arms)
        left.set_xlabel(f"{label} (mean +- std over pairs; dots: pairs)")
        right.set_yticks(range(len(arms)), arms)
        right.set_xlabel(f"{label}: std over eval seeds (blue) and over BiSSL seeds (orange)")
    fig.tight_layout()
    fig.savefig(out_dir / "study_arms.png", dpi=90)
    plt.close(fig)

    # Paired differences: each pair's difference, the mean and its interval.
    comparisons = study["comparisons"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * max(1, len(comparisons))))
    for y, c in enumerate(comparisons):
        ax.scatter(c["differences"], [y] * len(c["differences"]), s=12, color="grey", zorder=3)
        if c["ci"] is None:
            ax.plot([c["paired_difference"]], [y], "x", color="black")
        else:
            low, high = c["ci"]
            colour = "tab:green" if c["resolved"] else "tab:grey"
            mean = c["paired_difference"]
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                        color=colour)  # fmt: skip
    ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(
        range(len(comparisons)), [f"{c['b']} - {c['a']} ({c['metric']})" for c in comparisons]
    )
    ax.set_xlabel(f"paired difference; {study['confidence']:.0%} CI (green: resolved); dots: pairs")
    fig.tight_layout()
    fig.savefig(out_dir / "study_differences.png", dpi=90)
    plt.close(fig)

    # Compute per arm.
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.4 * len(arms)))
    compute = [study["arms"][n]["compute"] for n in arms]
    left.barh(range(len(arms)), [c["cpu_s_per_pair"] or 0.0 for c in compute])
    left.set_yticks(range(len(arms)), arms)
    left.set_xlabel("CPU seconds per pair (training + evaluation)")
    right.barh(range(len(arms)), [c["pretext_steps"] or 0 for c in compute], color="tab:orange")
    right.set_yticks(range(len(arms)), arms)
    right.set_xlabel("pretext steps the backbone saw")
    fig.tight_layout()
    fig.savefig(out_dir / "study_compute.png", dpi=90)
    plt.close(fig)
