"""DCA against scipy's generalized symmetric eigensolver on explicitly built matrices."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from cdc.dca import ScatterAccumulator, align_signs, canonical_signs, fit_dca, solve_dca


def _data(rng: np.random.Generator, n: int = 400, d: int = 12, classes: int = 4):
    y = rng.integers(0, classes, n)
    centers = rng.normal(0, 2, (classes, d))
    x = centers[y] + rng.normal(0, 1, (n, d)) @ rng.normal(0, 1, (d, d)) * 0.5
    return x, y


def _explicit_scatters(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Textbook definitions, summed sample by sample."""
    mu = x.mean(0)
    d = x.shape[1]
    s_b, s_w = np.zeros((d, d)), np.zeros((d, d))
    for c in np.unique(y):
        xc = x[y == c]
        mc = xc.mean(0)
        s_b += len(xc) * np.outer(mc - mu, mc - mu)
        for row in xc:
            s_w += np.outer(row - mc, row - mc)
    return s_b, s_w


def _accumulate(x: np.ndarray, y: np.ndarray, classes: int, chunk: int = 37) -> ScatterAccumulator:
    acc = ScatterAccumulator(classes, x.shape[1])
    for start in range(0, len(x), chunk):
        acc.update(x[start : start + chunk], y[start : start + chunk])
    return acc


def test_streamed_scatters_equal_explicit(rng):
    x, y = _data(rng)
    s_b, s_w = _accumulate(x, y, 4).scatters()
    ref_b, ref_w = _explicit_scatters(x, y)
    np.testing.assert_allclose(s_b, ref_b, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(s_w, ref_w, rtol=1e-9, atol=1e-8)


def test_solution_matches_scipy_generalized_eigh(rng):
    x, y = _data(rng)
    s_b, s_w = _explicit_scatters(x, y)
    w, values = solve_dca(s_b, s_w, 4)
    rho = 0.02 * np.linalg.eigvalsh(s_w).max()
    a = s_b + s_w + 1.1 * rho * np.eye(12)
    b = s_w + rho * np.eye(12)
    ref_values, ref_vectors = scipy.linalg.eigh(a, b)
    ref_values, ref_vectors = ref_values[::-1][:4], ref_vectors[:, ::-1][:, :4]
    np.testing.assert_allclose(values, ref_values, rtol=1e-9)
    for j in range(4):  # eigenvectors agree up to sign
        sign = np.sign(w[:, j] @ ref_vectors[:, j])
        np.testing.assert_allclose(sign * w[:, j], ref_vectors[:, j], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(w.T @ b @ w, np.eye(4), atol=1e-9)  # B-orthonormal
    np.testing.assert_allclose(w.T @ a @ w, np.diag(values), rtol=1e-8, atol=1e-8)
    assert np.all(np.diff(values) <= 0)


def test_fit_dca_is_unit_scale_for_within_class_covariance(rng):
    x, y = _data(rng)
    acc = _accumulate(x, y, 4)
    w = fit_dca(acc)
    s_b, s_w = _explicit_scatters(x, y)
    n = len(x)
    rho = 0.02 * np.linalg.eigvalsh(s_w / n).max()
    np.testing.assert_allclose(w.T @ (s_w / n + rho * np.eye(12)) @ w, np.eye(4), atol=1e-9)
    # same subspace as the unnormalized problem
    w_raw, _ = solve_dca(s_b, s_w, 4)
    np.testing.assert_allclose(np.abs(w), np.abs(w_raw) * np.sqrt(n), rtol=1e-6, atol=1e-9)


def test_dca_separates_classes_better_than_a_random_projection(rng):
    x, y = _data(rng, n=800)
    w = fit_dca(_accumulate(x, y, 4))

    def fisher_ratio(z: np.ndarray) -> float:
        s_b, s_w = _explicit_scatters(z, y)
        return float(np.trace(np.linalg.solve(s_w, s_b)))

    random_w = rng.normal(size=w.shape)
    assert fisher_ratio(x @ w) > 2 * fisher_ratio(x @ random_w)


def test_sign_alignment(rng):
    x, y = _data(rng)
    acc = _accumulate(x, y, 4)
    w_t = fit_dca(acc)
    centroids = acc.centroids()
    flips = np.array([1.0, -1.0, -1.0, 1.0])
    aligned = align_signs(w_t * flips, centroids, w_t, centroids)
    np.testing.assert_allclose(aligned, w_t)
    # Student features: a rotated/noisy copy; every component must correlate positively after alignment.
    x_s = x + rng.normal(0, 0.1, x.shape)
    acc_s = _accumulate(x_s, y, 4)
    w_s = align_signs(fit_dca(acc_s) * flips, acc_s.centroids(), w_t, centroids)
    ps, pt = acc_s.centroids() @ w_s, centroids @ w_t
    ps, pt = ps - ps.mean(0), pt - pt.mean(0)
    assert np.all((ps * pt).sum(0) > 0)


def test_basis_signs_are_canonical_whatever_lapack_returns(rng):
    """The saved basis is a function of the data: each column's largest entry is positive, and the
    result does not change when the eigenvectors come back with flipped signs."""
    x, y = _data(rng)
    s_b, s_w = _explicit_scatters(x, y)
    w, _ = solve_dca(s_b, s_w, 4)
    peaks = w[np.abs(w).argmax(axis=0), np.arange(4)]
    assert np.all(peaks > 0)
    flipped = w * np.array([-1.0, 1.0, -1.0, -1.0])
    np.testing.assert_array_equal(canonical_signs(flipped), w)


def test_every_label_gets_its_component_even_when_lapack_answers_short(rng, monkeypatch):
    """More features than images (60 from 40): the within-class scatter is singular and the pencil has
    a cluster of equal eigenvalues (1 + rho'/rho) right below the C - 1 discriminant ones, where the
    C-th component is asked for. LAPACK's bisection may then find fewer eigenvalues than asked, and
    SciPy returns the shorter answer without a word: on an AMD EPYC, DCA came out with one component
    for three labels. That short answer is injected here (the real solver, less its first pair); the
    basis must still have C B-orthonormal components, the discriminant ones those of a full solve."""
    x, y = rng.normal(size=(40, 60)), np.arange(40) % 3
    s_b, s_w = _explicit_scatters(x, y)
    honest_w, honest_values = solve_dca(s_b, s_w, 3)
    assert honest_w.shape == (60, 3)
    real = scipy.linalg.eigh

    def short(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("subset_by_index") is None:
            return out
        if kwargs.get("eigvals_only"):
            return out[1:]
        values, vectors = out
        return values[1:], vectors[:, 1:]

    monkeypatch.setattr(scipy.linalg, "eigh", short)
    w, values = solve_dca(s_b, s_w, 3)
    assert w.shape == (60, 3)
    np.testing.assert_allclose(values, honest_values, rtol=1e-9)
    np.testing.assert_allclose(w[:, :2], honest_w[:, :2], rtol=1e-6, atol=1e-9)
    rho = 0.02 * np.linalg.eigvalsh(s_w).max()
    np.testing.assert_allclose(w.T @ (s_w + rho * np.eye(60)) @ w, np.eye(3), atol=1e-9)
