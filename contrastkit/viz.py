"""Figures for training runs: learning curves and predictions drawn as contours over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .training import History

# One (ground truth, prediction) colour pair per foreground class, from the Okabe-Ito palette
# (distinguishable with the common colour-vision deficiencies): blue against orange, green
# against vermillion, yellow against purple; classes beyond the fourth reuse the pairs.
CONTOUR_COLOURS = [("#56B4E9", "#E69F00"), ("#009E73", "#D55E00"), ("#F0E442", "#CC79A7"),
                   ("#FFFFFF", "#000000")]


def contour_colours(label: int) -> tuple[str, str]:
    """The (ground truth, prediction) contour colours of foreground class ``label`` (1, 2, …)."""
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 1:
        raise ValueError(f"label must be a foreground class id >= 1; got {label!r}")
    return CONTOUR_COLOURS[(int(label) - 1) % len(CONTOUR_COLOURS)]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install 'contrastkit[examples]'") from err
    return plt


def training_figure(history: History, images, targets, predictions, path, class_names=None,
                    title: str | None = None) -> Path:
    """One PNG: a learning-curve panel per metric family, then image rows with contours.

    ``images`` (n, H, W) or (n, 3, H, W) / (n, H, W, 3) in [0, 1]; ``targets`` and
    ``predictions`` (n, H, W) integer label maps (0 = background). Each class has one colour
    for its ground truth (solid) and another for the prediction (dashed), see
    :func:`contour_colours`; the legend names both for every class shown.
    """
    plt = _pyplot()
    images, targets, predictions = (np.asarray(a) for a in (images, targets, predictions))
    if images.ndim == 4 and images.shape[1] in (1, 3):
        images = np.moveaxis(images, 1, -1)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    families: dict[str, list[str]] = {}
    for key in history.keys():
        families.setdefault(key.split("/")[-1] if "/" in key else key, []).append(key)
    n = len(images)
    curve_cols = max(1, len(families))
    cols = max(curve_cols, min(n, 4))
    rows = 1 + int(np.ceil(n / cols))
    fig = plt.figure(figsize=(3.2 * cols, 3.0 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    for i, (family, keys) in enumerate(families.items()):
        ax = fig.add_subplot(grid[0, i * cols // curve_cols:(i + 1) * cols // curve_cols])
        for key in keys:
            steps, values = history.series(key)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    classes = sorted(set(np.unique(targets)) | set(np.unique(predictions)) - {0})
    classes = [c for c in classes if c > 0]
    for k in range(n):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        ax.imshow(images[k], cmap="gray" if images[k].ndim == 2 else None, vmin=0, vmax=1)
        for c in classes:
            for label_map, colour, style in zip((targets[k], predictions[k]), contour_colours(c),
                                                ("solid", "dashed"), strict=True):
                if (label_map == c).any():
                    ax.contour(label_map == c, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.5)
        ax.set_axis_off()
    handles = []
    for c in classes:
        name = class_names[c - 1] if class_names and c - 1 < len(class_names) else f"class {c}"
        truth, predicted = contour_colours(c)
        handles += [plt.Line2D([], [], color=truth, ls="solid", lw=2, label=f"{name}: ground truth"),
                    plt.Line2D([], [], color=predicted, ls="dashed", lw=2, label=f"{name}: prediction")]
    if handles:
        # Below the panels (the tight bounding box of savefig takes it in), on grey so that
        # light and dark contour colours both show.
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0), facecolor="#bbbbbb")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
