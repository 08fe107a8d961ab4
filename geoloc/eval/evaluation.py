"""Evaluation: retrieval recall, metre-level localisation, uncertainty quality, and figures.

numpy and scipy; matplotlib is imported only inside the plot functions. Every metric is a pure
function from arrays to a dict: nothing here prints, reads flags or touches TensorFlow.

Conventions (docs/design.md §6; frames and units in geometry.py):
- grd (Q, D), sat (N, D): L2-normalised float32 descriptors; similarity = grd · satᵀ (cosine).
- Positions, deltas and metres: geometry.delta_to_position and geometry.distance_m.
"""
import numpy as np
from scipy.integrate import trapezoid
from scipy.stats import bootstrap, spearmanr


SIM_TILE_BYTES = 256 * 2 ** 20   # default size of one float32 similarity tile

# ---------------------------------------------------------------------------------------------
# Retrieval


def retrieval_ranks(grd, sat, pos_idx, semi_idx=None, block=4096, ref_block=None):
    """Rank each query's positive among all references, streaming sim = grd · satᵀ by tiles.

    grd: (Q, D) float32, L2-normalised ground descriptors (queries).
    sat: (N, D) float32, L2-normalised aerial descriptors (references).
    pos_idx: (Q,) int, row of sat that is each query's positive.
    semi_idx: (Q, S) int or None, rows of sat that are its semi-positives (VIGOR: S = 3);
        -1 marks an absent one; an entry equal to the positive or repeated is ignored.
    block: queries per tile. ref_block: references per tile (default: a 256 MB float32 tile).

    Only one (block, ref_block) float32 tile and its boolean mask exist at a time, so memory is
    the descriptors + 5 · block · ref_block + 4 · block · D bytes (0.4 GB at the defaults and
    D = 4096). Pass float32 C-contiguous arrays: anything else is copied once.

    Returns a dict of per-query arrays:
      rank (Q,) int64   number of references scoring strictly above the positive (ties with the
                        positive do not count; the positive never counts against itself)
      top1 (Q,) int64   best reference (ties: lowest index)
      hit  (Q,) bool    no reference other than the positive and its semi-positives scores
                        strictly above the positive; present only when semi_idx is given

    Scores are float32 BLAS dot products; the positive's score is a row-wise dot. BLAS rounds
    one and the same dot product differently at different places of a tile (last bit), so two
    bitwise-equal reference rows need not tie: exact tie semantics hold where the scores are
    exact (e.g. descriptors on a coarse binary grid), as in tests/test_evaluation.py.
    """
    grd = _float32_matrix(grd, 'grd')
    sat = _float32_matrix(sat, 'sat')
    if grd.shape[1] != sat.shape[1]:
        raise ValueError(f'grd has dimension {grd.shape[1]} but sat has {sat.shape[1]}')
    n_query, n_ref = grd.shape[0], sat.shape[0]
    if n_ref == 0:
        raise ValueError('sat holds no reference')
    pos_idx = _index_array(pos_idx, (n_query,), n_ref, 'pos_idx', absent_ok=False)
    semi = None if semi_idx is None else _semi_positives(semi_idx, pos_idx, n_ref)
    block = int(block)
    if block < 1:
        raise ValueError(f'block must be >= 1, got {block}')
    ref_block = max(1, SIM_TILE_BYTES // (4 * block)) if ref_block is None else int(ref_block)
    if ref_block < 1:
        raise ValueError(f'ref_block must be >= 1, got {ref_block}')
    ref_block = min(ref_block, n_ref)

    rank = np.zeros(n_query, np.int64)
    top1 = np.zeros(n_query, np.int64)
    semi_above = np.zeros(n_query, np.int64)
    tile_buf = np.empty(min(block, n_query) * ref_block, np.float32)
    mask_buf = np.empty(tile_buf.size, np.bool_)

    for q0 in range(0, n_query, block):
        q1 = min(q0 + block, n_query)
        b = q1 - q0
        g = grd[q0:q1]                                                   # (b, D)
        pos = pos_idx[q0:q1, None]                                       # (b, 1)
        p = np.einsum('ij,ij->i', g, sat[pos[:, 0]])[:, None]            # (b, 1) positive score
        if not np.isfinite(p).all():
            raise ValueError(f'non-finite positive score for queries {q0 + np.flatnonzero(~np.isfinite(p[:, 0]))[:10]}')
        best = np.full(b, -np.inf, np.float32)
        for r0 in range(0, n_ref, ref_block):
            r1 = min(r0 + ref_block, n_ref)
            n = r1 - r0
            sim = tile_buf[:b * n].reshape(b, n)
            np.matmul(g, sat[r0:r1].T, out=sim)                          # (b, n)
            above = mask_buf[:b * n].reshape(b, n)
            np.greater(sim, p, out=above)
            rank[q0:q1] += above.view(np.uint8).sum(axis=1, dtype=np.int64)
            rank[q0:q1] -= _count_listed(above, pos, r0)                 # positive vs itself
            if semi is not None:
                semi_above[q0:q1] += _count_listed(above, semi[q0:q1], r0)

            arg = sim.argmax(axis=1)                                     # first maximum
            val = sim[np.arange(b), arg]
            if not np.isfinite(val).all():
                raise ValueError(f'non-finite similarity between queries {q0}..{q1 - 1} and references {r0}..{r1 - 1}')
            better = val > best                    # strict: an earlier tile wins a tie
            best[better] = val[better]
            top1[q0:q1][better] = arg[better] + r0

    out = {'rank': rank, 'top1': top1}
    if semi is not None:
        out['hit'] = (rank - semi_above) == 0
    return out


def retrieval_metrics(ranks, n_ref):
    """Recall from retrieval_ranks' output, as fractions in [0, 1] (NaN when there is no query).

    R@k: rank < k for k = 1, 5, 10. R@1%: rank < int(0.01 · n_ref) + 1. hit_rate: mean of
    ranks['hit'] (NaN when retrieval_ranks got no semi-positives).
    Returns {'R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate', 'n_query', 'n_ref'}.
    """
    n_ref = int(n_ref)
    if n_ref < 1:
        raise ValueError(f'n_ref must be >= 1, got {n_ref}')
    rank = np.asarray(ranks['rank'])
    if rank.ndim != 1:
        raise ValueError(f"ranks['rank'] must be 1-D, got shape {rank.shape}")
    hit = np.asarray(ranks['hit'], bool) if 'hit' in ranks else None
    one_percent = int(0.01 * n_ref) + 1
    return {
        'R@1': _fraction(rank < 1),
        'R@5': _fraction(rank < 5),
        'R@10': _fraction(rank < 10),
        'R@1%': _fraction(rank < one_percent),
        'hit_rate': float('nan') if hit is None else _fraction(hit),
        'n_query': int(rank.size),
        'n_ref': n_ref,
    }


def _float32_matrix(x, name):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f'{name} must be 2-D (rows, dim), got shape {x.shape}')
    return x


def _index_array(idx, shape, n_ref, name, absent_ok):
    idx = np.asarray(idx)
    if idx.shape != shape:
        raise ValueError(f'{name} must have shape {shape}, got {idx.shape}')
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f'{name} must hold integers, got {idx.dtype}')
    idx = idx.astype(np.int64)
    low = -1 if absent_ok else 0
    bad = (idx < low) | (idx >= n_ref)
    if bad.any():
        raise ValueError(f'{name} has {bad.sum()} entries outside [{low}, {n_ref}), e.g. {idx[bad][:5]}')
    return idx


def _semi_positives(semi_idx, pos_idx, n_ref):
    """(Q, S) int64 copy of semi_idx with absent, positive and repeated entries set to -1."""
    semi_idx = np.asarray(semi_idx)
    if semi_idx.ndim != 2 or semi_idx.shape[0] != pos_idx.shape[0]:
        raise ValueError(f'semi_idx must have shape ({pos_idx.shape[0]}, S), got {semi_idx.shape}')
    semi = _index_array(semi_idx, semi_idx.shape, n_ref, 'semi_idx', absent_ok=True)
    semi[semi == pos_idx[:, None]] = -1
    for j in range(1, semi.shape[1]):
        semi[(semi[:, j:j + 1] == semi[:, :j]).any(axis=1), j] = -1
    return semi


def _count_listed(above, idx, r0):
    """(b,) how many of each row's listed references (idx (b, S), global, -1 = none) that lie
    in the tile starting at reference r0 are marked in above (b, n)."""
    rows, cols = np.nonzero((idx >= r0) & (idx < r0 + above.shape[1]))
    marked = above[rows, idx[rows, cols] - r0]
    return np.bincount(rows[marked], minlength=above.shape[0])


def _fraction(mask):
    return float(np.mean(mask)) if np.size(mask) else float('nan')

# ---------------------------------------------------------------------------------------------
# Localisation (metres between positions: geometry.distance_m)


# VIGOR's accuracy curve (its localisation figure): thresholds 1.1^(i/5) m, i = 1..499 (1.02 m .. 13.5 km).
VIGOR_THRESHOLDS_M = 1.1 ** (np.arange(1, 500) / 5.0)
RECALL_WITHIN_M = (1, 5, 10)     # retrieval-then-localisation papers' recall within 1 / 5 / 10 m


def fraction_below(err, thresholds):
    """(T,) list: the fraction of err (Q,) strictly below each threshold (VIGOR's `<`); NaN when Q = 0."""
    err = np.sort(np.asarray(err, np.float64))
    thresholds = np.asarray(thresholds, np.float64)
    if err.size == 0:
        return [float('nan')] * thresholds.size
    return (np.searchsorted(err, thresholds, side='left') / err.size).tolist()


def localisation_summary(err_with_offset, err_centre, top1_correct, thresholds=np.arange(1, 41), top1_hit=None):
    """Metre-level localisation for all queries, for those whose top-1 tile is correct and, with top1_hit,
    for those whose top-1 tile is the positive or one of its semi-positives ("hit" queries, VIGOR).

    err_with_offset: (Q,) metres from the top-1 tile's centre + predicted offset to the truth.
    err_centre: (Q,) metres from the top-1 tile's centre alone (offset zero).
    top1_correct, top1_hit: (Q,) bool. thresholds: metres of the linear accuracy curve.
    Returns {'thresholds_m': [...], 'vigor_thresholds_m': VIGOR_THRESHOLDS_M, 'all': S, 'top1_correct': S
    [, 'top1_hit': S]} where S = {'count', 'mean_m', 'median_m', 'mean_m_centre', 'median_m_centre',
    'accuracy', 'accuracy_centre', 'vigor_accuracy', 'recall_within_m'}: accuracy[i] = fraction of the
    subset with error <= thresholds[i]; vigor_accuracy[i] = fraction with error < vigor_thresholds_m[i]
    (strict, as VIGOR); recall_within_m = {'1', '5', '10'}: fraction with error < 1, 5, 10 m.
    An empty subset gives NaN.
    """
    err = np.asarray(err_with_offset, np.float64)
    centre = np.asarray(err_centre, np.float64)
    correct = np.asarray(top1_correct)
    subsets = [('all', np.ones(err.shape, bool)), ('top1_correct', correct)]
    if top1_hit is not None:
        subsets.append(('top1_hit', np.asarray(top1_hit)))
    if err.ndim != 1 or centre.shape != err.shape or any(k.shape != err.shape for _, k in subsets):
        raise ValueError(f'need (Q,) arrays, got {err.shape}, {centre.shape}, {[k.shape for _, k in subsets[1:]]}')
    for name, keep in subsets[1:]:
        if keep.dtype != np.bool_:
            raise ValueError(f'{name} must be bool, got {keep.dtype}')
    thresholds = np.asarray(thresholds, np.float64)
    out = {'thresholds_m': thresholds.tolist(), 'vigor_thresholds_m': VIGOR_THRESHOLDS_M.tolist()}
    for name, keep in subsets:
        e, c = err[keep], centre[keep]
        out[name] = {
            'count': int(e.size),
            'mean_m': _stat(np.mean, e), 'median_m': _stat(np.median, e),
            'mean_m_centre': _stat(np.mean, c), 'median_m_centre': _stat(np.median, c),
            'accuracy': _accuracy(e, thresholds), 'accuracy_centre': _accuracy(c, thresholds),
            'vigor_accuracy': fraction_below(e, VIGOR_THRESHOLDS_M),
            'recall_within_m': dict(zip(map(str, RECALL_WITHIN_M), fraction_below(e, RECALL_WITHIN_M))),
        }
    return out


def error_summary(err_m, err_px):
    """Mean and median of errors in metres and pixels (Q,) each -> {'count', 'mean_m', 'median_m',
    'mean_px', 'median_px'} (NaN when empty)."""
    err_m, err_px = np.asarray(err_m, np.float64), np.asarray(err_px, np.float64)
    if err_m.ndim != 1 or err_m.shape != err_px.shape:
        raise ValueError(f'err_m and err_px must be (Q,) arrays of one length, got {err_m.shape} and {err_px.shape}')
    return {'count': int(err_m.size), 'mean_m': _stat(np.mean, err_m), 'median_m': _stat(np.median, err_m),
            'mean_px': _stat(np.mean, err_px), 'median_px': _stat(np.median, err_px)}


def _pairs(x, name):
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f'{name} must have shape (Q, 2), got {x.shape}')
    return x


def _stat(fn, x):
    return float(fn(x)) if x.size else float('nan')


def _accuracy(err, thresholds):
    if err.size == 0:
        return [float('nan')] * thresholds.size
    return (err[:, None] <= thresholds[None, :]).mean(axis=0).tolist()

# ---------------------------------------------------------------------------------------------
# Uncertainty quality


def ellipse_coverage(mu, cov, gt):
    """Fraction of ground truths inside the 1σ and 2σ ellipses of N(mu, cov).

    mu, gt: (Q, 2); cov: (Q, 2, 2) symmetric positive definite, same units and axis order.
    Inside the kσ ellipse: Mahalanobis² (gt - mu)ᵀ cov⁻¹ (gt - mu) <= k². For a calibrated 2-D
    Gaussian the expected fractions are 1 - exp(-k²/2): 39.3 % (1σ) and 86.5 % (2σ).
    Returns {'1sigma', '2sigma', 'expected_1sigma', 'expected_2sigma', 'n'}.
    """
    maha2 = mahalanobis_sq(mu, cov, gt)
    return {'1sigma': _fraction(maha2 <= 1.0), '2sigma': _fraction(maha2 <= 4.0),
            'expected_1sigma': float(1 - np.exp(-0.5)), 'expected_2sigma': float(1 - np.exp(-2.0)),
            'n': int(maha2.size)}


def coverage_curve(mu, cov, gt, ks=np.arange(0.5, 3.01, 0.25)):
    """Fraction of ground truths inside the kσ ellipse for each k, against a calibrated 2-D Gaussian's
    1 - exp(-k²/2). Arguments as ellipse_coverage. Returns {'k', 'inside', 'calibrated'} (lists)."""
    maha2 = mahalanobis_sq(mu, cov, gt)
    ks = np.asarray(ks, np.float64)
    return {'k': ks.tolist(), 'inside': [_fraction(maha2 <= k * k) for k in ks],
            'calibrated': (1 - np.exp(-ks ** 2 / 2)).tolist()}


def mahalanobis_sq(mu, cov, gt):
    """(Q,) squared Mahalanobis distance (gt - mu)ᵀ cov⁻¹ (gt - mu); mu, gt (Q, 2), cov (Q, 2, 2) positive
    definite (ValueError naming the rows that are not)."""
    mu, gt = _pairs(mu, 'mu'), _pairs(gt, 'gt')
    cov = np.asarray(cov, np.float64)
    if gt.shape != mu.shape or cov.shape != (mu.shape[0], 2, 2):
        raise ValueError(f'need mu, gt (Q, 2) and cov (Q, 2, 2), got {mu.shape}, {gt.shape}, {cov.shape}')
    a, c = cov[:, 0, 0], cov[:, 1, 1]
    b = (cov[:, 0, 1] + cov[:, 1, 0]) / 2
    det = a * c - b * b
    bad = ~((a > 0) & (det > 0))
    if bad.any():
        raise ValueError(f'{bad.sum()} covariances are not positive definite, e.g. rows {np.flatnonzero(bad)[:5]}')
    d0, d1 = gt[:, 0] - mu[:, 0], gt[:, 1] - mu[:, 1]
    return (c * d0 * d0 - 2 * b * d0 * d1 + a * d1 * d1) / det


def rank_correlation(u, err):
    """Spearman rank correlation of uncertainty u (Q,) and error err (Q,) (scipy.stats.spearmanr;
    ties get average ranks). NaN, without a warning, when Q < 2 or either array is constant."""
    u, err = _same_length(u, err)
    if u.size < 2 or np.all(u == u[0]) or np.all(err == err[0]):
        return float('nan')
    return float(spearmanr(u, err).statistic)


def sparsification(u, err, steps=20):
    """Sparsification curve: mean error left after removing the fraction f of queries with the
    largest uncertainty, for f = 0, 1/steps, ..., (steps-1)/steps (int(f·Q) queries removed);
    the oracle removes the largest errors instead.

    Returns {'fractions', 'curve', 'oracle' (lists), 'ause': area between curve and oracle,
    'auc': area under the curve (trapezoid over fractions)}. NaN everywhere when Q = 0.
    """
    u, err = _same_length(u, err)
    steps = int(steps)
    if steps < 2:
        raise ValueError(f'steps must be >= 2, got {steps}')
    fractions = np.arange(steps) / steps
    n_keep = u.size - (fractions * u.size).astype(np.int64)               # (steps,), >= 1 if Q > 0

    def kept_mean(order):
        if u.size == 0:
            return np.full(steps, np.nan)
        return np.cumsum(err[order])[n_keep - 1] / n_keep

    curve = kept_mean(np.argsort(u, kind='stable'))       # keep the least uncertain first
    oracle = kept_mean(np.argsort(err, kind='stable'))
    return {'fractions': fractions.tolist(), 'curve': curve.tolist(), 'oracle': oracle.tolist(),
            'ause': float(trapezoid(curve - oracle, fractions)), 'auc': float(trapezoid(curve, fractions))}


def _same_length(u, err):
    u, err = np.asarray(u, np.float64), np.asarray(err, np.float64)
    if u.ndim != 1 or u.shape != err.shape:
        raise ValueError(f'u and err must be (Q,) arrays of one length, got {u.shape} and {err.shape}')
    return u, err


# ---------------------------------------------------------------------------------------------
# Paired comparison of two models on the same queries


def paired_bootstrap(stat, before, after, n_boot=2000, seed=0, level=0.95):
    """stat(after) - stat(before) over the same queries, with a percentile bootstrap interval.

    before, after: (Q,) per-query values of two models on the same queries (e.g. rank < 1, or
    metres); stat: a reducer over a (Q,) array (np.mean, np.median). Each bootstrap draw resamples
    the queries with replacement and applies the same draw to both models (paired).
    Returns {'before', 'after', 'diff', 'low', 'high', 'n', 'n_boot', 'level'}; 'excludes_zero' is True
    when the interval lies strictly on one side of 0. NaN everywhere when Q = 0.
    """
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.ndim != 1 or before.shape != after.shape:
        raise ValueError(f'before and after must be (Q,) arrays of one length, got {before.shape} and {after.shape}')
    if not 0 < level < 1:
        raise ValueError(f'level must lie in (0, 1), got {level}')
    n = before.size
    out = {'n': int(n), 'n_boot': int(n_boot), 'level': float(level)}
    if n == 0:
        return dict(out, before=float('nan'), after=float('nan'), diff=float('nan'), low=float('nan'),
                    high=float('nan'), excludes_zero=False)
    res = bootstrap((before, after), lambda b, a: stat(a) - stat(b), paired=True, vectorized=False,
                    n_resamples=int(n_boot), confidence_level=level, method='percentile',
                    random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return dict(out, before=float(stat(before)), after=float(stat(after)), diff=float(stat(after) - stat(before)),
                low=float(low), high=float(high), excludes_zero=bool(low > 0 or high < 0))
