"""Progress on stderr, metrics appended to a JSONL log, and the loss curve as a PNG."""
from __future__ import annotations

import json
import math
import os
import sys
import time

__all__ = ["Progress", "MetricsLog", "plot_loss"]


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """One line on stderr, redrawn each step: step/total, bar, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, metrics: dict) -> None:
        self.tokens += metrics.get("tokens", 0)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else float("inf")
        width = 24
        filled = int(width * step / max(1, self.total))
        line = (f"\rstep {step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {self.tokens / max(elapsed, 1e-9):,.0f} tok/s ETA {_clock(eta)}")
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON object per logged step. On resume, lines of steps after the checkpoint
    (written by the interrupted run) are dropped first, so the log reads as one run."""

    def __init__(self, path: str, enabled: bool = True, truncate_after: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if truncate_after is not None and os.path.isfile(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    def write(self, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def plot_loss(log_path: str, png_path: str, title: str = "training loss") -> str | None:
    """Loss against step from a metrics log, written atomically to `png_path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{png_path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
