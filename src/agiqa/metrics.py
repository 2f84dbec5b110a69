"""IQA metrics as the official MA-AGIQA code computes them (``performance_fit``).

SRCC and KRCC on the raw predictions; PLCC and RMSE after fitting the 4-parameter logistic
``β2 + (β1 − β2) / (1 + exp(−(x − β3) / |β4|))`` from β0 = [max(mos), min(mos), mean(pred), 0.5];
``plcc_raw`` is PLCC before the fit.
"""

from __future__ import annotations

import warnings

import numpy as np

from agiqa.errors import AgiqaError

__all__ = ["LogisticFitWarning", "MetricsError", "evaluate", "fit_logistic", "logistic"]


class MetricsError(AgiqaError):
    """Predictions and scores that metrics cannot be computed on; the message has the values."""


class LogisticFitWarning(UserWarning):
    """The 4-parameter logistic did not converge; PLCC and RMSE use the starting β."""


def logistic(x, b1, b2, b3, b4):
    with np.errstate(over="ignore"):  # exp overflow → inf → the curve's asymptote, as intended
        return b2 + (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4)))


def fit_logistic(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    """Fit the logistic mapping from predictions to MOS. Returns (mapped predictions, β)."""
    from scipy.optimize import OptimizeWarning, curve_fit  # SciPy loads when metrics are asked

    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    beta0 = [np.max(mos), np.min(mos), np.mean(pred), 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("always", LogisticFitWarning)
        try:
            popt, _ = curve_fit(logistic, pred, mos, p0=beta0, maxfev=100_000_000)
        except (RuntimeError, TypeError) as e:  # no convergence, or fewer points than β
            popt = np.array(beta0)
            warnings.warn(f"the 4-parameter logistic fit did not converge on {pred.size} "
                          f"predictions ({e}); PLCC and RMSE use the starting β "
                          f"[{', '.join(f'{b:.4g}' for b in beta0)}]", LogisticFitWarning,
                          stacklevel=2)
    return logistic(pred, *popt), np.asarray(popt)


def evaluate(pred, mos) -> dict[str, float]:
    """SRCC, PLCC (after the logistic fit), KRCC, RMSE (after the fit) and raw PLCC."""
    from scipy import stats

    pred, mos = np.asarray(pred, np.float64).ravel(), np.asarray(mos, np.float64).ravel()
    if pred.shape != mos.shape:
        raise MetricsError(f"{pred.size} predictions for {mos.size} scores")
    if pred.size < 3:
        raise MetricsError(f"metrics need at least 3 images, got {pred.size}")
    bad = np.flatnonzero(~np.isfinite(pred))
    if bad.size:
        raise MetricsError(f"{bad.size} prediction(s) are NaN or infinite (first at index "
                           f"{bad[0]}: {pred[bad[0]]})")
    bad = np.flatnonzero(~np.isfinite(mos))
    if bad.size:
        raise MetricsError(f"{bad.size} score(s) are NaN or infinite (first at index {bad[0]}: "
                           f"{mos[bad[0]]})")
    fitted, _ = fit_logistic(pred, mos)
    return {
        "srcc": float(stats.spearmanr(pred, mos)[0]),
        "plcc": float(stats.pearsonr(fitted, mos)[0]),
        "krcc": float(stats.kendalltau(pred, mos)[0]),
        "rmse": float(np.sqrt(np.mean((fitted - mos) ** 2))),
        "plcc_raw": float(stats.pearsonr(pred, mos)[0]),
    }
