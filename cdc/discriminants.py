"""Class-discriminant functions of a channel (method §2), behind a registry.

Each binary function compares class P with the rest Q and is made multi-class by the unweighted
mean over classes. Inputs are (classes x channels) arrays; the result is one score per channel.
Higher score = more discriminative = keep. `di` is multi-class natively and reads the pooled-grid
statistics instead (each channel a vector of G cells).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cdc.registry import Registry
from cdc.stats import GridStats, LayerStats

Discriminant = Callable[[LayerStats, np.random.Generator], np.ndarray]
DISCRIMINANTS: Registry[Discriminant] = Registry("discriminant")
register_discriminant = DISCRIMINANTS.register


@register_discriminant("symdiv")
def symdiv(st: LayerStats, _rng: np.random.Generator, eps: float = 0.05) -> np.ndarray:
    """Generalized symmetric divergence, in the released code's form (mean term over var_P + var_Q)."""
    _, mu_p, var_p, mu_q, var_q = st.moments()
    ratio = 0.5 * (var_p / (var_q + eps) + var_q / (var_p + eps))
    mean_term = 0.5 * (mu_p - mu_q) ** 2 / (var_p + var_q + eps)
    return (ratio + mean_term - 1.0).mean(0)


@register_discriminant("ttest")
def ttest(st: LayerStats, _rng: np.random.Generator, eps: float = 1e-4) -> np.ndarray:
    """Welch's t statistic; N are image counts."""
    n_p, mu_p, var_p, mu_q, var_q = st.moments()
    n_q = n_p.sum() - n_p
    return (np.abs(mu_p - mu_q) / np.sqrt(var_p / n_p + var_q / n_q + eps)).mean(0)


@register_discriminant("fisher")
def fisher(st: LayerStats, _rng: np.random.Generator, eps: float = 1e-4) -> np.ndarray:
    _, mu_p, var_p, mu_q, var_q = st.moments()
    return ((mu_p - mu_q) ** 2 / (var_p + var_q + eps)).mean(0)


@register_discriminant("snr")
def snr(st: LayerStats, _rng: np.random.Generator, eps: float = 1e-4) -> np.ndarray:
    _, mu_p, var_p, mu_q, var_q = st.moments()
    return (np.abs(mu_p - mu_q) / (np.sqrt(var_p) + np.sqrt(var_q) + eps)).mean(0)


@register_discriminant("random")
def random(st: LayerStats, rng: np.random.Generator) -> np.ndarray:
    """Data-free baseline: uniform random scores from the seeded generator."""
    return rng.random(st.s1.shape[1])


def di(st: GridStats, _rng: np.random.Generator, rho: float = 1e-4) -> np.ndarray:
    """Discriminant information trace[(S + rho I)^-1 S_B] of each channel's G-cell vector.

    S is the total scatter over all images, S_B the between-class scatter sum_k N_k (mu_k - mu)(...)^T;
    both unnormalized, as in method §2. A dead channel (S = 0) scores 0.
    """
    seen = st.n > 0
    n_k = st.n[seen].astype(np.float64)
    s1 = st.s1[seen]  # K x C x G
    total = n_k.sum()
    mu_k = s1 / n_k[:, None, None]
    mu = s1.sum(0) / total  # C x G
    scatter = st.outer - total * np.einsum("cg,ch->cgh", mu, mu)
    dev = mu_k - mu[None]
    between = np.einsum("k,kcg,kch->cgh", n_k, dev, dev)
    eye = np.eye(scatter.shape[1])
    return np.trace(np.linalg.solve(scatter + rho * eye, between), axis1=1, axis2=2)
