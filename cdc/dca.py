"""Discriminant Component Analysis (method §4) on an intermediate feature map.

Scatter matrices are accumulated streaming in float64; the regularized generalized eigenproblem
(S_B + S_W + (rho + rho') I) w = lambda (S_W + rho I) w is solved by a Cholesky factor of the right
side and a symmetric eigendecomposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch
from torch import nn

from cdc import distributed
from cdc.errors import InputError


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


class ScatterAccumulator:
    """Streaming sums for DCA: N_c, per-class feature sums, and X^T X, all float64.

    The sums live on the device of the features (a GPU pass never copies features back to the host);
    the properties return them as host arrays.
    """

    def __init__(self, n_labels: int, dim: int, device: torch.device | str = "cpu") -> None:
        self._counts = torch.zeros(n_labels, dtype=torch.int64, device=device)
        self._sums = torch.zeros(n_labels, dim, dtype=torch.float64, device=device)
        self._gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features (N x d) with their labels (N)."""
        x = torch.as_tensor(x, device=self._gram.device).to(torch.float64)
        y = torch.as_tensor(y, device=self._gram.device).long()
        self._counts += torch.bincount(y, minlength=len(self._counts))
        self._sums.index_add_(0, y, x)
        self._gram += x.T @ x

    @property
    def counts(self) -> np.ndarray:
        return self._counts.cpu().numpy()

    @property
    def sums(self) -> np.ndarray:
        return self._sums.cpu().numpy()

    @property
    def gram(self) -> np.ndarray:
        return self._gram.cpu().numpy()

    def centroids(self) -> np.ndarray:
        counts = self.counts
        seen = counts > 0
        return self.sums[seen] / counts[seen, None]

    def scatters(self) -> tuple[np.ndarray, np.ndarray]:
        """(S_B, S_W): between-class and within-class scatter (S_W = total - S_B)."""
        counts = self.counts
        seen = counts > 0
        n_c, sums = counts[seen].astype(np.float64), self.sums[seen]
        n = n_c.sum()
        mu = sums.sum(0) / n
        diff = sums / n_c[:, None] - mu
        s_b = (diff * n_c[:, None]).T @ diff
        s_total = self.gram - n * np.outer(mu, mu)
        return s_b, s_total - s_b


def solve_dca(s_b: np.ndarray, s_w: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top `n_components` generalized eigenvectors W (d x n) and eigenvalues, descending.

    rho = 0.02 * lambda_max(S_W), rho' = 0.1 * rho. W is B-orthonormal: W^T (S_W + rho I) W = I, and
    each column's sign is canonical (`canonical_signs`).
    LAPACK computes only the eigenpairs asked for (the top one of S_W, the top n of the pencil): at
    d = 2048 this halves the time of a full decomposition (bench/scale.py).
    """
    d = s_b.shape[0]
    n_components = min(n_components, d)
    rho = 0.02 * float(top_eigenpairs(s_w, None, 1)[0][0])
    if not np.isfinite(s_b).all() or not np.isfinite(s_w).all() or rho <= 0:
        raise InputError(
            "DCA: the within-class scatter is zero or not finite (every feature constant, or a dead layer); "
            "choose another fit_dca.layer"
        )
    rho_prime = 0.1 * rho
    a = s_b + s_w + (rho + rho_prime) * np.eye(d)
    b = s_w + rho * np.eye(d)
    values, vectors = top_eigenpairs(a, b, n_components)
    return canonical_signs(vectors), values


def top_eigenpairs(a: np.ndarray, b: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` largest eigenvalues (descending) and eigenvectors of a x = lambda b x (b None: b = I).

    LAPACK is asked for those `n` only (bisection, ?stebz). When eigenvalues cluster at the boundary of
    the requested range, as the null-space directions of a singular within-class scatter do, bisection
    may find fewer than asked ("non-monotonic arithmetic"; which CPU path does so varies) and SciPy
    returns the shorter result without a word: then the full decomposition is taken instead.
    """
    d = a.shape[0]
    driver = "evr" if b is None else "gvx"
    values, vectors = scipy.linalg.eigh(a, b, subset_by_index=[d - n, d - 1], driver=driver)
    if len(values) < n:
        values, vectors = scipy.linalg.eigh(a, b, driver="evd" if b is None else "gvd")
        values, vectors = values[d - n :], vectors[:, d - n :]
    return values[::-1], vectors[:, ::-1]


def canonical_signs(w: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive.

    An eigenvector's sign is arbitrary and LAPACK's choice can change with the CPU's code path or
    thread count; fixing it makes the saved basis a function of the data only (lineage compares hashes).
    """
    rows = np.abs(w).argmax(axis=0)
    return w * np.where(w[rows, np.arange(w.shape[1])] < 0, -1.0, 1.0)


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
    """Stream eval-mode features of `layer` into DCA scatter sums; labels pass through `label_map`.

    Batches must be on the model's device; the sums are accumulated there.
    """
    model.eval()
    acc: ScatterAccumulator | None = None
    n_labels = int(label_map.max()) + 1
    labels: torch.Tensor | None = None
    with feature_tap(model, layer) as tap:
        for x, y in batches:
            model(x)
            feats = pooled_features(tap["out"], pool)
            if acc is None:
                acc = ScatterAccumulator(n_labels, feats.shape[1], feats.device)
                labels = torch.as_tensor(label_map, dtype=torch.int64, device=feats.device)
            assert labels is not None
            acc.update(feats, labels[y])
    if acc is None:
        raise InputError("no batches to fit DCA on")
    distributed.all_reduce_sum(acc._counts, acc._sums, acc._gram)  # each process streamed its share
    return acc
