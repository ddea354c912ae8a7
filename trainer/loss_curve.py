"""Render a training loss curve as an RGB image (for the node's IMAGE output and reports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def smoothed(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing shows)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def render_loss_curve(points: Sequence[tuple[float, float]], *, title: str = "training loss",
                      width: int = 640, height: int = 360, message: str = "no loss values") -> np.ndarray:
    """[height, width, 3] uint8 plot of (step, loss) points: raw loss and its smoothed curve
    (``message`` in the middle when there is none, e.g. why nothing was trained).

    Uses matplotlib's object API with the Agg canvas (no pyplot global state), so it is safe to
    call from ComfyUI's worker thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    clean = [(step, loss) for step, loss in points if loss is not None and np.isfinite(loss)]
    if clean:
        steps, losses = zip(*clean, strict=True)
        axes.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
        if len(clean) > 2:
            axes.plot(steps, smoothed(losses), color="#c33", linewidth=1.6, label="smoothed")
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()
