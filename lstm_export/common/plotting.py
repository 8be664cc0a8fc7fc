"""One way to draw a figure: a headless backend, one size and resolution, the file written whole."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: str | Path, size: tuple[float, float] = (7, 4), nrows: int | None = None):
    """Yields (fig, ax), ax a list of `nrows` axes when nrows is given; on leaving, lays the figure
    out, writes it to `path` and frees it."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI; set before pyplot is imported
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(nrows or 1, 1, figsize=size, dpi=110, squeeze=False)
    ax = ax[0, 0] if nrows is None else list(ax[:, 0])
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
