"""Class-discriminant functions of a channel (method §2), behind a registry.

Each binary function compares class P with the rest Q and is made multi-class by the unweighted
mean over classes. Inputs are (classes x channels) arrays; the result is one score per channel.
Higher score = more discriminative = keep.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cdc.stats import LayerStats

Discriminant = Callable[[LayerStats, np.random.Generator], np.ndarray]
DISCRIMINANTS: dict[str, Discriminant] = {}


def register_discriminant(name: str) -> Callable[[Discriminant], Discriminant]:
    def add(fn: Discriminant) -> Discriminant:
        DISCRIMINANTS[name] = fn
        return fn

    return add


def get_discriminant(name: str) -> Discriminant:
    if name not in DISCRIMINANTS:
        raise KeyError(f"unknown discriminant {name!r}; known: {', '.join(sorted(DISCRIMINANTS))}")
    return DISCRIMINANTS[name]


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
