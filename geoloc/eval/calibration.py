"""Uncertainty metrics of the literature for predicted 2-D Gaussians: the negative log-likelihood of the ground
truths, the expected normalised calibration error (ENCE, Levi et al. 2022) with its reliability diagram, and
selective prediction (keep the most certain queries first). Pure numpy, like evaluation.py (whose coverage,
Spearman and sparsification they join; evaluation.py would pass 400 lines with them).

sigma: one scalar spread per query, the square root of the mean eigenvalue of its covariance,
sqrt(trace(cov) / 2) (sigma_of). For any 2-D Gaussian the expected squared error is trace(cov) = 2 sigma^2, so
a calibrated model's per-axis root mean squared error, sqrt(mean(err^2) / 2), equals its root mean variance
sqrt(mean(sigma^2)). (model.uncertainty's u = 2 sqrt(lambda_max) + 2 sqrt(lambda_min), the paper's scalar, ranks
queries almost alike but is not a standard deviation, so it cannot be compared with an error.)

Post-hoc calibration (not the paper's; docs/evaluation.md): one scale s for every predicted ellipse, fitted on
panoramas the model has not trained on (fit_sigma_scale), kept in the run directory's calibration.json
(write_scale / read_scale) and applied by --test, localise.py and export.py as cholesky x s (covariance x s^2).
"""
import json
import os

import numpy as np

from geoloc.errors import StateError
from geoloc.eval import evaluation

FILE = 'calibration.json'                    # in the run directory, written by --test --calibrate 1
FIT_K = (1.0, 2.0)                           # the ellipses whose coverage the scale is fitted to

KEPT = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)     # selective prediction: the shares of queries kept


def gaussian_nll(mu, cov, gt):
    """(Q,) negative log-likelihood of gt under N(mu, cov) in 2-D:
    0.5 (gt - mu)ᵀ cov⁻¹ (gt - mu) + 0.5 log det cov + log 2π.
    mu, gt (Q, 2), cov (Q, 2, 2) positive definite, in one unit (pixels: the NLL of a density per pixel²;
    the same Gaussian in metres at m metres per pixel scores NLL_px + 2 log m)."""
    maha2 = evaluation.mahalanobis_sq(mu, cov, gt)          # checks the shapes and positive definiteness
    cov = np.asarray(cov, np.float64)
    det = cov[:, 0, 0] * cov[:, 1, 1] - 0.25 * (cov[:, 0, 1] + cov[:, 1, 0]) ** 2
    return 0.5 * maha2 + 0.5 * np.log(det) + np.log(2 * np.pi)


def sigma_of(cov):
    """(Q,) sqrt(trace(cov) / 2), the root of the mean eigenvalue of each (Q, 2, 2) covariance."""
    cov = np.asarray(cov, np.float64)
    if cov.ndim != 3 or cov.shape[1:] != (2, 2):
        raise ValueError(f'cov must have shape (Q, 2, 2), got {cov.shape}')
    return np.sqrt((cov[:, 0, 0] + cov[:, 1, 1]) / 2)


def ence(sigma, err, n_bins=10):
    """Expected normalised calibration error of 2-D predictions.

    sigma (Q,) > 0: predicted spread per axis (sigma_of); err (Q,): the 2-D error's length, in sigma's unit.
    The queries, sorted by sigma (stable), are split into min(n_bins, Q) bins of equal count (np.array_split:
    the first bins one larger when Q does not divide). Per bin: RMV = sqrt(mean sigma^2), the root mean
    predicted variance, and RMSE = sqrt(mean err^2 / 2), the per-axis root mean squared error; ENCE = the mean
    over bins of |RMV - RMSE| / RMV (0: calibrated in every bin).
    Returns {'ence', 'n_bins', 'count' (per bin), 'rmv', 'rmse' (per bin, lists)}; NaN and empty lists when Q = 0.
    """
    sigma, err = _same_length(sigma, err)
    if (sigma <= 0).any() or not np.isfinite(sigma).all():
        raise ValueError('sigma must be positive and finite')
    if int(n_bins) < 1:
        raise ValueError(f'n_bins must be >= 1, got {n_bins}')
    order = np.argsort(sigma, kind='stable')
    bins = np.array_split(order, min(int(n_bins), sigma.size)) if sigma.size else []
    rmv = np.array([np.sqrt(np.mean(sigma[b] ** 2)) for b in bins])
    rmse = np.array([np.sqrt(np.mean(err[b] ** 2) / 2) for b in bins])
    score = float(np.mean(np.abs(rmv - rmse) / rmv)) if len(bins) else float('nan')
    return {'ence': score, 'n_bins': len(bins), 'count': [len(b) for b in bins], 'rmv': rmv.tolist(),
            'rmse': rmse.tolist()}


def selective_prediction(sigma, err_m, kept=KEPT, thresholds=evaluation.RECALL_WITHIN_M):
    """Selective prediction: keep the ceil(f Q) queries of smallest sigma (stable order on ties) for each share
    f of `kept`, and report their median error and their recall within each threshold (error < t, as
    evaluation.localisation_summary's recall_within_m).

    sigma (Q,): predicted spread (any unit; only its order counts); err_m (Q,): errors in metres.
    Returns {'kept', 'count', 'median_m' (lists over kept), 'recall_within_m': {str(t): list over kept}};
    NaN values when Q = 0.
    """
    sigma, err = _same_length(sigma, err_m)
    kept = np.asarray(kept, np.float64)
    if ((kept <= 0) | (kept > 1)).any():
        raise ValueError(f'kept shares must lie in (0, 1], got {kept.tolist()}')
    ordered = err[np.argsort(sigma, kind='stable')]
    counts = np.ceil(np.round(kept * ordered.size, 9)).astype(np.int64)   # round: 0.7 x 10 is 7, not 7.000...1
    subsets = [ordered[:n] for n in counts]
    return {'kept': kept.tolist(), 'count': counts.tolist(),
            'median_m': [float(np.median(e)) if e.size else float('nan') for e in subsets],
            'recall_within_m': {str(t): [evaluation.fraction_below(e, [t])[0] for e in subsets]
                                for t in thresholds}}


def _same_length(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f'need two (Q,) arrays of one length, got {a.shape} and {b.shape}')
    return a, b


def fit_sigma_scale(maha, ks=FIT_K, n_grid=4001):
    """The scale s of every predicted ellipse that makes the largest of its coverage errors least: the share of
    ground truths inside k s sigma against a calibrated 2-D Gaussian's 1 - exp(-k^2/2), for each k in ks (39.3 %
    at 1 sigma, 86.5 % at 2 sigma). Heavy-tailed errors (right peaks plus far wrong ones) cannot match both: the
    least largest error sits between an excess at 1 sigma and a shortfall at 2 sigma, and it treats the two
    alike, as a target of +-N points around each does.

    maha (Q,) >= 0: each ground truth's Mahalanobis distance under its predicted Gaussian (sqrt of
    evaluation.mahalanobis_sq). After scaling the covariance by s^2 the distances are maha / s, so the kσ
    coverage is mean(maha <= k s). The error is a step function of s: it is evaluated on a geometric grid from
    half the smallest to twice the largest candidate (maha / k) and the middle of the grid points where it is
    least is returned. ValueError on an empty or non-finite input."""
    maha = np.asarray(maha, np.float64)
    if maha.ndim != 1 or not maha.size or not np.isfinite(maha).all() or (maha < 0).any():
        raise ValueError('maha must be a non-empty (Q,) array of finite distances >= 0')
    ks = np.asarray(ks, np.float64)
    wanted = 1 - np.exp(-ks ** 2 / 2)
    cand = (maha[:, None] / ks[None]).ravel()
    cand = cand[cand > 0]
    if not cand.size:
        return 1.0
    grid = np.geomspace(cand.min() / 2, cand.max() * 2, int(n_grid))
    ordered = np.sort(maha)
    inside = np.stack([np.searchsorted(ordered, k * grid, side='right') / maha.size for k in ks], 1)
    worst = np.max(np.abs(inside - wanted), axis=1)
    best = np.flatnonzero(worst <= worst.min() + 1e-12)
    return float(grid[best[len(best) // 2]])


def scaled_coverage(maha, scale, ks=FIT_K):
    """{'<k>sigma': share of maha <= k scale} for each k: the coverage after scaling the ellipses by `scale`."""
    maha = np.asarray(maha, np.float64)
    return {f'{k:g}sigma': float(np.mean(maha <= k * scale)) for k in ks}


def write_scale(run_dir, record):
    """Write record (a dict with at least 'sigma_scale' > 0) to <run_dir>/calibration.json, atomically."""
    path = os.path.join(run_dir, FILE)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_scale(run_dir):
    """-> (scale, record) from <run_dir>/calibration.json; (1.0, None) when there is none. StateError in one
    line when the file is not a calibration this module wrote (not JSON, or no positive finite sigma_scale)."""
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        return 1.0, None
    try:
        with open(path) as f:
            record = json.load(f)
        scale = float(record['sigma_scale'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f'{path}: not a calibration file ({type(e).__name__}); delete it or rerun '
                         '--test --calibrate 1') from None
    if not np.isfinite(scale) or scale <= 0:
        raise StateError(f'{path}: sigma_scale must be a positive number, got {record["sigma_scale"]!r}; delete it '
                         'or rerun --test --calibrate 1')
    return scale, record
