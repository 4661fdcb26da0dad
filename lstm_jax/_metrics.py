"""Training records: ``metrics.jsonl``, ``curves.png`` and the progress display.

Both files are rewritten atomically (written to a temporary file in the same folder, then
``os.replace``d), so a reader -- or a run killed at any moment -- never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
RECORD_FIELDS = (
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "steps_per_sec",
    "wall_time",
)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def read_metrics(path: os.PathLike | str) -> list[dict]:
    """Reads a ``metrics.jsonl`` file (missing file: empty list; a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_metrics(path: os.PathLike | str, records: Iterable[dict]) -> None:
    """Atomically rewrites ``path`` with one JSON object per line."""
    text = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in records)
    atomic_write_bytes(path, text.encode())


def plot_curves(path: os.PathLike | str, records: list[dict], title: str = "") -> None:
    """Draws loss and accuracy against step (train and validation) and saves a PNG atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    steps = [r["step"] for r in records]

    def series(key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, label, style in (("train_loss", "train", "-o"), ("val_loss", "validation", "-s")):
        x, y = series(key)
        if x:
            ax_loss.plot(x, y, style, label=label, markersize=3)
    for key, label, style in (("train_accuracy", "train", "-o"), ("val_accuracy", "validation", "-s")):
        x, y = series(key)
        if x:
            ax_acc.plot(x, [100 * v for v in y], style, label=label, markersize=3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        if steps:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A tqdm bar when ``stream`` is a terminal, plain log lines otherwise.

    ``update(step, **values)`` moves the bar to ``step`` and shows ``values`` (loss,
    accuracy, ...), the speed in steps/s and the time left; ``write(line)`` prints a line
    without breaking the bar.
    """

    def __init__(self, total: int, initial: int = 0, *, stream=None, use_bar: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stdout
        self.total = total
        self.step = initial
        self._t0 = time.perf_counter()
        self._step0 = initial
        if use_bar is None:
            use_bar = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def steps_per_sec(self) -> float:
        dt = time.perf_counter() - self._t0
        return (self.step - self._step0) / dt if dt > 0 else float("nan")

    def restart_clock(self) -> None:
        """Measures speed from now on (e.g. after the first step's compilation)."""
        self._t0 = time.perf_counter()
        self._step0 = self.step

    def update(self, step: int, **values) -> None:
        if self._bar is not None:
            self._bar.update(step - self.step)
            self.step = step
            post = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in values.items()}
            self._bar.set_postfix(post, refresh=True)
            return
        self.step = step
        rate = self.steps_per_sec()
        left = (self.total - step) / rate if rate and math.isfinite(rate) and rate > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        for k, v in values.items():
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"{rate:.2f} steps/s")
        parts.append(f"{_fmt_duration(left)} left")
        self.write("  ".join(parts))

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plot_errors(path: os.PathLike | str, images, labels, predictions, class_names=None, max_images: int = 64,
                title: str = "") -> int:
    """Saves a grid of misclassified images titled "pred X / true Y" (atomically).

    Returns the number of misclassified images shown."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))[:max_images]
    n = len(wrong)
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(cols * 1.4, rows * 1.6 + 0.4), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    name = (lambda c: class_names[c]) if class_names else str
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(np.asarray(images[i]), cmap="gray_r", vmin=0, vmax=255 if np.asarray(images).dtype == np.uint8 else 1)
        ax.set_title(f"pred {name(int(predictions[i]))}\ntrue {name(int(labels[i]))}", fontsize=7)
    if n == 0:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return n


__all__ = [
    "CURVES_FILE",
    "METRICS_FILE",
    "RECORD_FIELDS",
    "Progress",
    "atomic_write_bytes",
    "plot_curves",
    "plot_errors",
    "read_metrics",
    "write_metrics",
]
