"""PNG figures of an evaluation: the CMC curve and a sheet of retrieval examples (matplotlib, Agg backend)."""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np

__all__ = ["plot_cmc", "plot_examples"]

GREEN = (0, 170, 0)
RED = (210, 0, 0)


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_cmc(curves: dict[str, Sequence[float]], path: str, title: str = "CMC (text-to-image)") -> None:
    """``curves``: dataset name -> R@k in percent for k = 1..len. One line per dataset."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, cmc in curves.items():
        ks = np.arange(1, len(cmc) + 1)
        ax.plot(ks, cmc, marker="o", markersize=2.5, linewidth=1.5, label=f"{name} (R@1 {cmc[0]:.1f})")
    ax.set_xlabel("rank k")
    ax.set_ylabel("R@k (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(1, max((len(c) for c in curves.values()), default=1))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _framed(img, match: bool, size: tuple[int, int], border: int) -> np.ndarray:
    from PIL import Image
    h, w = size
    a = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC))
    out = np.empty((h + 2 * border, w + 2 * border, 3), dtype=np.uint8)
    out[:] = GREEN if match else RED
    out[border:border + h, border:border + w] = a
    return out


def plot_examples(rows: Sequence[dict], path: str, cell: tuple[int, int] = (128, 64), border: int = 5) -> None:
    """One row per query: its caption above, then its top-k gallery images left to right, framed green for a true
    match and red otherwise. ``rows``: dicts with ``caption`` (str), ``images`` (PIL images), ``matches`` (bools),
    optional ``title`` (str, e.g. the dataset name)."""
    plt = _plt()
    k = max((len(r["images"]) for r in rows), default=1)
    n = max(1, len(rows))
    fig = plt.figure(figsize=(1.1 * k + 0.4, 3.0 * n), dpi=100)
    subfigs = fig.subfigures(n, 1, squeeze=False)[:, 0]
    for sf, row in zip(subfigs, rows):
        head = f"[{row['title']}] " if row.get("title") else ""
        caption = textwrap.fill(head + row["caption"], width=int(14 * k))
        caption = "\n".join(caption.splitlines()[:3])
        sf.suptitle(caption, fontsize=8, ha="left", x=0.01, y=0.99, va="top")
        axes = sf.subplots(1, k, squeeze=False)[0]
        for j, ax in enumerate(axes):
            ax.axis("off")
            if j < len(row["images"]):
                ax.imshow(_framed(row["images"][j], bool(row["matches"][j]), cell, border))
                ax.set_title(str(j + 1), fontsize=7, pad=2)
        sf.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, wspace=0.08)
    if not rows:
        fig.text(0.5, 0.5, "no queries", ha="center")
    fig.savefig(path)
    plt.close(fig)
