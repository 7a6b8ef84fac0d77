"""A run's log: ``loss.jsonl`` (one record per step) and its plot ``loss.png``."""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

__all__ = ["read_log", "truncate_log", "plot_log", "say"]

def read_log(out: str) -> list[dict]:
    """The records of ``out/loss.jsonl``."""
    path = os.path.join(out, "loss.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(out: str, step: int) -> list[dict]:
    """Drop the records after ``step`` (written after the checkpoint we resume from)."""
    records = [r for r in read_log(out) if r["step"] <= step]
    with open(os.path.join(out, "loss.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def plot_log(out: str, records: list[dict]) -> str | None:
    """Write ``out/loss.png`` (loss, its running mean and the learning rate); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not records:
        return None
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], np.float64)
    w = max(1, min(len(loss) // 20, 100))
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="C0", alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps[w - 1:], smooth, color="C0", lw=1.8, label=f"running mean ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="C1", lw=1, label="learning rate")
    ax2.set_ylabel("learning rate", color="C1")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path


def say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
