"""The curves a training run draws from its `trainer_log.jsonl`: the loss (sft, qlora) and the rewards
(grpo). In: the log rows. Out: a PNG, written atomically (matplotlib's Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsmkit.run_folder import save_figure


def draw_png(png: Path, size: tuple[float, float], draw: Callable[[Any], None],
             xlabel: str = "optimizer step") -> None:
    """One matplotlib axes drawn by `draw`, gridded, labelled and saved as `png` (also `gsmkit report`'s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png)


def plot_loss(rows: list[dict], png: Path) -> None:
    """The training loss (response tokens) against the optimizer step."""
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]

    def draw(ax: Any) -> None:
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_ylabel("training loss (response tokens)")

    draw_png(png, (6, 3.5), draw)


def plot_rewards(rows: list[dict], png: Path) -> None:
    """The total reward and each weighted component's mean per logged step."""
    means = {k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}
    keys = ["reward", *sorted(means)]

    def draw(ax: Any) -> None:
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if key == "reward" else None,
                        linewidth=2 if key == "reward" else 1,
                        label=key.removeprefix("rewards/").removesuffix("/mean"))
        ax.set_ylabel("mean reward")
        if rows:
            ax.legend(fontsize=7)

    draw_png(png, (6.5, 3.8), draw)
