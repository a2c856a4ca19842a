"""Class labels for generated images and the class-match statistic of top influences.

A generated image has no label, so a small classifier trained on the labelled training data (multinomial logistic
regression on the pixels) assigns one. The statistic: the fraction of each query's top-k positive training
examples whose label equals the query's predicted class, averaged over queries; chance is the fraction of all
training examples with that label, averaged the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PixelClassifier", "ClassMatch", "class_match"]


class PixelClassifier:
    """Logistic regression on flattened pixels. ``fit(images (N, C, H, W), labels (N,))``;
    ``predict(images) -> (labels (Q,) int64, confidence (Q,) float)``."""

    def __init__(self, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        self._clf = LogisticRegression(max_iter=3000, C=1.0, random_state=seed)
        self.train_accuracy = float("nan")

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> "PixelClassifier":
        x, y = images.flatten(1).double().numpy(), labels.numpy()
        self._clf.fit(x, y)
        self.train_accuracy = float(self._clf.score(x, y))
        return self

    def predict(self, images: torch.Tensor):
        p = self._clf.predict_proba(images.flatten(1).double().numpy())
        idx = p.argmax(1)
        labels = torch.as_tensor(self._clf.classes_[idx], dtype=torch.long)
        return labels, torch.as_tensor(p.max(1), dtype=torch.float32)


@dataclass(frozen=True)
class ClassMatch:
    """``positive``/``negative``: mean fraction of top-k positive / negative influences sharing the query's class;
    ``chance``: the same fraction for uniformly random training examples; ``per_query``: ``(Q,)`` positive fraction."""

    positive: float
    negative: float
    chance: float
    k: int
    per_query: torch.Tensor


def class_match(scores: torch.Tensor, train_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> ClassMatch:
    """scores ``(Q, N)``; train_labels ``(N,)``; query_labels ``(Q,)``."""
    k = max(1, min(k, scores.shape[1]))
    top = scores.topk(k, dim=1).indices
    bottom = (-scores).topk(k, dim=1).indices
    q = query_labels.view(-1, 1)
    pos = (train_labels[top] == q).float().mean(1)
    neg = (train_labels[bottom] == q).float().mean(1)
    chance = (train_labels.view(1, -1) == q).float().mean(1)
    return ClassMatch(positive=float(pos.mean()), negative=float(neg.mean()), chance=float(chance.mean()), k=k,
                      per_query=pos)
