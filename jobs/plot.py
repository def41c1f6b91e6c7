"""The embedding as a PNG: a scatter plot, or a density image for large maps.

Matplotlib is driven through its object API with the Agg canvas, so no display
and no global backend switch are needed (works in Ray jobs and on servers).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Beyond this many points the map is drawn as a 2-D histogram (density), not dots.
DENSITY_THRESHOLD = 200_000


def plot_embedding(
    Y: np.ndarray,
    path: str | os.PathLike,
    labels: np.ndarray | None = None,
    title: str | None = None,
    density_threshold: int = DENSITY_THRESHOLD,
    bins: int = 512,
    dpi: int = 150,
) -> Path:
    """Write the first two coordinates of ``Y`` (n, d >= 2) as a PNG at ``path``.

    Parameters
    ----------
    Y : ndarray (n, n_components)
        The embedding; only columns 0 and 1 are drawn.
    path : path
        The PNG to write (under a temporary name, then renamed into place).
    labels : array (n,), optional
        Colours the dots by class (up to 20 classes get a legend); ignored by the density image.
    title : str, optional
    density_threshold : int
        Above this many points draw a log-scaled 2-D histogram instead of dots.
    bins : int
        Histogram bins per axis of the density image.

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    Y = np.asarray(Y, dtype=np.float32)
    if Y.ndim != 2 or Y.shape[1] < 2:
        raise ValueError(f"plot_embedding: Y must be (n, >= 2), got shape {Y.shape}")
    if labels is not None and len(labels) != len(Y):
        raise ValueError(f"plot_embedding: {len(labels)} labels for {len(Y)} points")
    n = len(Y)
    fig = Figure(figsize=(8, 8), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if n > density_threshold:
        counts, xe, ye = np.histogram2d(Y[:, 0], Y[:, 1], bins=bins)
        im = ax.imshow(
            counts.T, origin="lower", extent=(xe[0], xe[-1], ye[0], ye[-1]), aspect="auto",
            cmap="magma", norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())), interpolation="nearest",
        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="points per bin")
        kind = "density"
    else:
        size = float(np.clip(20000.0 / max(n, 1), 0.5, 12.0))
        if labels is None:
            ax.scatter(Y[:, 0], Y[:, 1], s=size, c="tab:blue", linewidths=0, alpha=0.7)
        else:
            classes, codes = np.unique(np.asarray(labels), return_inverse=True)
            cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "nipy_spectral"
            sc = ax.scatter(Y[:, 0], Y[:, 1], s=size, c=codes, cmap=cmap, linewidths=0, alpha=0.8,
                            vmin=-0.5, vmax=len(classes) - 0.5)
            if len(classes) <= 20:
                handles = [
                    ax.scatter([], [], s=30, color=sc.cmap(sc.norm(i)), label=str(c)) for i, c in enumerate(classes)
                ]
                ax.legend(handles=handles, loc="best", fontsize=8, markerscale=1.0, frameon=False)
        kind = "scatter"
    ax.set_title(title or f"ptsne embedding ({n:,} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("plot: %s of %d points -> %s", kind, n, path)
    return path
