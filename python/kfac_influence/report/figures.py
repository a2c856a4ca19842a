"""PNG figures: one per query (the generated image, its top-k positive and top-k negative training images, with
ids and scores) and a summary grid (one row per query). Images are ``(C, H, W)`` tensors in [-1, 1]."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["query_figure", "summary_figure", "samples_figure", "signed_top"]

POS_COLOR = "#1a7f37"
NEG_COLOR = "#c62828"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: torch.Tensor, frame: Optional[str] = None):
    img = img.detach().float().cpu().clamp(-1, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    else:
        ax.imshow(((img[:3] + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(frame is not None)
        if frame is not None:
            s.set_edgecolor(frame)
            s.set_linewidth(2.5)


def _label(i: int, labels, class_names) -> str:
    if labels is None:
        return ""
    c = int(labels[i])
    return f" [{class_names[c] if class_names and 0 <= c < len(class_names) else c}]"


def signed_top(scores: torch.Tensor, k: int):
    """``(positive, negative)``: indices of the at most ``k`` largest strictly positive scores (largest first)
    and of the at most ``k`` most negative strictly negative scores (most negative first). Fewer than ``k`` when
    fewer scores have that sign: a "lowered" column never shows an example that raised the query, and vice
    versa."""
    k = max(0, min(k, scores.numel()))
    pos = [n for n in scores.topk(k).indices.tolist() if float(scores[n]) > 0] if k else []
    neg = [n for n in (-scores).topk(k).indices.tolist() if float(scores[n]) < 0] if k else []
    return pos, neg


def query_figure(path: str, query: torch.Tensor, title: str, scores: torch.Tensor, train_images: torch.Tensor,
                 train_ids: torch.Tensor, k: int, train_labels: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None) -> None:
    """Write the PNG of one query. scores: ``(N,)`` this query's scores; train_images ``(N, C, H, W)``. The top row
    shows up to k positive scores, the bottom row up to k negative ones (``signed_top``; fewer when fewer have
    that sign, said in the row label)."""
    plt = _plt()
    k = max(1, min(k, scores.numel()))
    pos, neg = signed_top(scores, k)
    fig = plt.figure(figsize=(1.35 * (k + 2.1), 3.6))
    gs = fig.add_gridspec(2, k + 2, width_ratios=[1.6, 0.5] + [1] * k, hspace=0.55, wspace=0.08)
    axq = fig.add_subplot(gs[:, 0])
    _show(axq, query)
    axq.set_title(title, fontsize=9)
    for row, (idx, color, name, sign) in enumerate([(pos, POS_COLOR, "raised", "> 0"),
                                                     (neg, NEG_COLOR, "lowered", "< 0")]):
        label = f"top {k}\n{name}\n(score {sign})" if len(idx) == k else \
            f"only {len(idx)}\n{name}\n(score {sign})"
        if not idx:
            ax = fig.add_subplot(gs[row, 2])
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            ax.set_ylabel(label, fontsize=8, color=color, labelpad=6)
        for j, n in enumerate(idx):
            ax = fig.add_subplot(gs[row, j + 2])
            _show(ax, train_images[n], frame=color)
            ax.set_title(f"id {int(train_ids[n])}{_label(n, train_labels, class_names)}\n{float(scores[n]):+.3g}",
                         fontsize=7, color=color)
            if j == 0:
                ax.set_ylabel(label, fontsize=8, color=color, labelpad=6)
    fig.text(0.5, 1.0, "training images that most raised (top) / lowered (bottom) the query's likelihood",
             fontsize=8, ha="center", va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_figure(path: str, queries: torch.Tensor, query_titles: Sequence[str], scores: torch.Tensor,
                   train_images: torch.Tensor, train_ids: torch.Tensor, k: int,
                   train_labels: Optional[torch.Tensor] = None, class_names: Optional[Sequence[str]] = None) -> None:
    """Write the summary grid: row q = query q | its top-k positive | its top-k negative training images (only
    scores of that sign: fewer cells when fewer exist, ``signed_top``)."""
    plt = _plt()
    Q = queries.shape[0]
    k = max(1, min(k, scores.shape[1]))
    cols = 2 * k + 3
    height = 1.12 * Q + 0.3
    fig = plt.figure(figsize=(0.95 * cols, height))
    gs = fig.add_gridspec(Q, cols, width_ratios=[1, 0.2] + [1] * k + [0.35] + [1] * k, hspace=0.6, wspace=0.06,
                          top=1.0 - 0.6 / height, bottom=0.01, left=0.01, right=0.99)
    for q in range(Q):
        s = scores[q]
        ax = fig.add_subplot(gs[q, 0])
        _show(ax, queries[q])
        ax.set_title(query_titles[q], fontsize=6.5)
        for block, (idx, color) in enumerate(zip(signed_top(s, k), (POS_COLOR, NEG_COLOR))):
            for j, n in enumerate(idx):
                ax = fig.add_subplot(gs[q, 2 + j + block * (k + 1)])
                _show(ax, train_images[n], frame=color)
                ax.set_title(f"{int(train_ids[n])}{_label(n, train_labels, class_names)} {float(s[n]):+.3g}",
                             fontsize=5.5, color=color)
    fig.text(0.5, 1.0 - 0.12 / height, f"query  |  top {k} positive scores (raised its likelihood)  |  top {k} "
             f"negative scores (lowered it); fewer where fewer scores have that sign", fontsize=9, ha="center",
             va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def samples_figure(path: str, images: torch.Tensor, titles: Optional[Sequence[str]] = None, cols: int = 8) -> None:
    """A plain grid of images (e.g. the generated queries)."""
    plt = _plt()
    n = images.shape[0]
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=6.5)
        else:
            ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
