"""Discriminant Component Analysis (method §4) on an intermediate feature map.

Scatter matrices are accumulated streaming in float64; the regularized generalized eigenproblem
(S_B + S_W + (rho + rho') I) w = lambda (S_W + rho I) w is solved by a Cholesky factor of the right
side and a symmetric eigendecomposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn


def pooled_features(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """Flatten a feature map (N x C x H x W) after optional average pooling to a pool x pool grid."""
    if pool is not None:
        x = nn.functional.adaptive_avg_pool2d(x, pool)
    return x.flatten(1)


@contextmanager
def feature_tap(model: nn.Module, path: str) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the output of submodule `path` during forward passes into `tap['out']`."""
    tap: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, out: tap.__setitem__("out", out))
    try:
        yield tap
    finally:
        handle.remove()


@dataclass
class ScatterAccumulator:
    """Streaming sums for DCA: N_c, per-class feature sums, and X^T X, all float64."""

    counts: np.ndarray  # L
    sums: np.ndarray  # L x d
    gram: np.ndarray  # d x d

    @classmethod
    def empty(cls, n_labels: int, dim: int) -> ScatterAccumulator:
        return cls(np.zeros(n_labels, np.int64), np.zeros((n_labels, dim)), np.zeros((dim, dim)))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False)
        self.counts += np.bincount(y, minlength=len(self.counts))
        np.add.at(self.sums, y, x)
        self.gram += x.T @ x

    def centroids(self) -> np.ndarray:
        seen = self.counts > 0
        return self.sums[seen] / self.counts[seen, None]

    def scatters(self) -> tuple[np.ndarray, np.ndarray]:
        """(S_B, S_W): between-class and within-class scatter (S_W = total - S_B)."""
        seen = self.counts > 0
        n_c, sums = self.counts[seen].astype(np.float64), self.sums[seen]
        n = n_c.sum()
        mu = sums.sum(0) / n
        diff = sums / n_c[:, None] - mu
        s_b = (diff * n_c[:, None]).T @ diff
        s_total = self.gram - n * np.outer(mu, mu)
        return s_b, s_total - s_b


def solve_dca(s_b: np.ndarray, s_w: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top `n_components` generalized eigenvectors W (d x n) and eigenvalues, descending.

    rho = 0.02 * lambda_max(S_W), rho' = 0.1 * rho. W is B-orthonormal: W^T (S_W + rho I) W = I.
    """
    d = s_b.shape[0]
    rho = 0.02 * float(np.linalg.eigvalsh(s_w)[-1])
    rho_prime = 0.1 * rho
    a = s_b + s_w + (rho + rho_prime) * np.eye(d)
    b = s_w + rho * np.eye(d)
    chol = np.linalg.cholesky(b)  # b = L L^T
    inner = scipy.linalg.solve_triangular(
        chol, scipy.linalg.solve_triangular(chol, a, lower=True).T, lower=True
    )
    values, vectors = np.linalg.eigh((inner + inner.T) / 2)
    order = np.argsort(values)[::-1][:n_components]
    w = scipy.linalg.solve_triangular(chol.T, vectors[:, order], lower=False)
    return w, values[order]


def fit_dca(acc: ScatterAccumulator) -> np.ndarray:
    """DCA basis with one component per label class present.

    [ours] The scatters are divided by N before solving: same eigenvectors and eigenvalues, but W is
    B-orthonormal for the within-class *covariance*, so projections have unit scale whatever the number
    of fitting images, and the distillation weight lambda_dca keeps its meaning.
    """
    s_b, s_w = acc.scatters()
    n = float(acc.counts.sum())
    return solve_dca(s_b / n, s_w / n, int((acc.counts > 0).sum()))[0]


def align_signs(
    w_student: np.ndarray, centroids_student: np.ndarray, w_teacher: np.ndarray, centroids_teacher: np.ndarray
) -> np.ndarray:
    """Flip student components whose projected class centroids correlate negatively with the teacher's."""
    ps = centroids_student @ w_student
    pt = centroids_teacher @ w_teacher
    ps_c, pt_c = ps - ps.mean(0), pt - pt.mean(0)
    signs = np.where((ps_c * pt_c).sum(0) < 0, -1.0, 1.0)
    return w_student * signs


@torch.no_grad()
def accumulate_scatter(
    model: nn.Module,
    layer: str,
    pool: int | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    label_map: np.ndarray,
) -> ScatterAccumulator:
    """Stream eval-mode features of `layer` into DCA scatter sums; labels pass through `label_map`."""
    model.eval()
    acc: ScatterAccumulator | None = None
    n_labels = int(label_map.max()) + 1
    with feature_tap(model, layer) as tap:
        for x, y in batches:
            model(x)
            feats = pooled_features(tap["out"], pool).double().numpy()
            if acc is None:
                acc = ScatterAccumulator.empty(n_labels, feats.shape[1])
            acc.update(feats, label_map[y.numpy()])
    if acc is None:
        raise ValueError("no batches to fit DCA on")
    return acc
