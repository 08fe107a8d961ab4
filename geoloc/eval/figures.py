"""Figures of --test and validation: a query localised in its tile (heatmap, 1-/2-sigma ellipses), recall@k,
accuracy against metres (linear, and VIGOR's log-spaced curve), sparsification, the reliability diagram and
selective prediction of a covariance head, a stage's own metrics. matplotlib's object API
with the Agg canvas (no pyplot, no global backend switch); each function writes a PNG, or returns the
RGB image when its path is None.
"""
import os

import numpy as np

from geoloc.data.geometry import TILE_PX, VGG_MEAN_BGR


def plot_localisation(path, pano_bgr, sat_bgr, gt_rc, pred_rc, heatmap=None, cov=None, title=''):
    """Panorama above, aerial tile below with the true point, the predicted point, an optional
    heatmap overlay and the 1σ / 2σ ellipses of an optional covariance.

    pano_bgr, sat_bgr: (H, W, 3) BGR, uint8 or float with VGG_MEAN_BGR subtracted (added back).
    gt_rc, pred_rc: (row, col) pixels of the 640-px tile frame (scaled to the tile's real size),
        or None to leave that marker out (e.g. no ground truth in a wrongly retrieved tile).
    heatmap: (h, w) any size, stretched over the tile. cov: (2, 2) pixels² of the 640-px frame in
    (row, col) order, centred on pred_rc; a covariance of (dy, dx) needs its off-diagonal negated
    (row = 320 + dy, col = 320 - dx). Writes a PNG and returns path (path None: returns the RGB image).
    """
    pano, sat = _rgb_uint8(pano_bgr, 'pano_bgr'), _rgb_uint8(sat_bgr, 'sat_bgr')
    scale = np.array([sat.shape[0], sat.shape[1]], np.float64) / TILE_PX
    if cov is not None and pred_rc is None:
        raise ValueError('cov needs pred_rc, the centre of its ellipses')

    fig = _figure((6.0, 6.0 * (pano.shape[0] / pano.shape[1] + sat.shape[0] / sat.shape[1]) + 0.8))
    grid = fig.add_gridspec(2, 1, height_ratios=[pano.shape[0] / pano.shape[1], sat.shape[0] / sat.shape[1]])
    ax = fig.add_subplot(grid[0])
    ax.imshow(pano)
    ax.set_axis_off()
    ax.set_title(title)
    ax = fig.add_subplot(grid[1])
    ax.imshow(sat)
    extent = (-0.5, sat.shape[1] - 0.5, sat.shape[0] - 0.5, -0.5)
    if heatmap is not None:
        heatmap = np.asarray(heatmap, np.float64)
        if heatmap.ndim != 2:
            raise ValueError(f'heatmap must be 2-D, got shape {heatmap.shape}')
        shown = np.ma.masked_less(heatmap, 0.02 * heatmap.max())        # keep the tile visible
        ax.imshow(shown, extent=extent, alpha=0.5, cmap='jet', interpolation='bilinear')
    if cov is not None:
        cov = np.asarray(cov, np.float64)
        if cov.shape != (2, 2):
            raise ValueError(f'cov must be (2, 2), got {cov.shape}')
        eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
        if eigval[0] <= 0:
            raise ValueError(f'cov is not positive definite: eigenvalues {eigval}')
        t = np.linspace(0, 2 * np.pi, 200)
        circle = np.stack([np.cos(t), np.sin(t)])                          # (2, 200)
        axes = eigvec * np.sqrt(eigval)                                    # columns: σ axes, (row, col)
        for k, style in ((1, '-'), (2, '--')):
            rc = np.asarray(pred_rc, np.float64)[:, None] + k * (axes @ circle)   # (2, 200), 640 frame
            ax.plot(rc[1] * scale[1], rc[0] * scale[0], style, color='yellow', lw=1.5, label=f'{k}σ')
    for rc, marker, colour, size, label in ((gt_rc, '*', 'lime', 14, 'ground truth'),
                                            (pred_rc, 'X', 'red', 11, 'prediction')):
        if rc is not None:
            row, col = np.asarray(rc, np.float64) * scale
            ax.plot(col, row, marker, color=colour, ms=size, mec='black', label=label)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_axis_off()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc='lower right', fontsize=8)
    return _save(fig, path)


def plot_recall_curve(path, ranks, n_ref, kmax=None):
    """Recall@k against k = 1..kmax (default: max(10, the 1 % cut-off)) from ranks (Q,)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f'ranks must be a non-empty (Q,) array, got shape {ranks.shape}')
    n_ref = int(n_ref)
    kmax = min(n_ref, max(10, int(0.01 * n_ref) + 1)) if kmax is None else int(kmax)
    k = np.arange(1, kmax + 1)
    recall = np.cumsum(np.bincount(np.minimum(ranks, kmax), minlength=kmax + 1))[:kmax] / ranks.size
    fig = _figure((5.0, 4.0))
    ax = fig.add_subplot()
    ax.plot(k, 100 * recall, '-', lw=2)
    ax.set_xscale('log')
    ax.set_xlabel('k')
    ax.set_ylabel('recall@k (%)')
    ax.set_ylim(0, 100)
    ax.set_title(f'{ranks.size} queries, {n_ref} references')
    ax.grid(True, which='both', alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_metres(path, summary):
    """Fraction of queries localised within t metres (localisation_summary's curves)."""
    t = summary['thresholds_m']
    fig = _figure((5.0, 4.0))
    ax = fig.add_subplot()
    for subset, colour in (('all', 'tab:blue'), ('top1_correct', 'tab:orange')):
        s = summary[subset]
        ax.plot(t, 100 * np.asarray(s['accuracy']), '-', color=colour, label=f'{subset}, offset (n={s["count"]})')
        ax.plot(t, 100 * np.asarray(s['accuracy_centre']), '--', color=colour, label=f'{subset}, tile centre')
    ax.set_xlabel('threshold (m)')
    ax.set_ylabel('queries within threshold (%)')
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_vigor_accuracy(path, localisation, positive=None, protocol=''):
    """VIGOR's localisation figure: the fraction of queries with an error below each of its log-spaced
    thresholds (localisation_summary's 'vigor_accuracy'), for every subset it holds and, when given,
    the queries localised in their positive tile; log-scaled metres, so curves from VIGOR's own figure
    can be laid over it."""
    t = np.asarray(localisation['vigor_thresholds_m'])
    fig = _figure((5.5, 4.0))
    ax = fig.add_subplot()
    labels = {'all': 'top-1 tile, all queries', 'top1_correct': 'top-1 tile is the positive',
              'top1_hit': 'top-1 tile is the positive or a semi-positive'}
    curves = [(text, localisation[k]) for k, text in labels.items() if k in localisation]
    if positive is not None:
        curves.append(('in the positive tile, all queries', positive))
    for label, s in curves:
        ax.plot(t, 100 * np.asarray(s['vigor_accuracy'], np.float64), '-', label=f'{label} (n={s["count"]})')
    ax.set_xscale('log')
    ax.set_xlabel('threshold (m), 1.1^(i/5), i = 1..499')
    ax.set_ylabel('queries below threshold (%)')
    ax.set_ylim(0, 100)
    if protocol:
        ax.set_title(f'protocol: {protocol}', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sparsification(path, sp):
    """Sparsification curve and oracle (sparsification's output)."""
    fig = _figure((5.0, 4.0))
    ax = fig.add_subplot()
    f = 100 * np.asarray(sp['fractions'])
    ax.plot(f, sp['curve'], '-o', ms=3, label='by uncertainty')
    ax.plot(f, sp['oracle'], '--', label='oracle (by error)')
    ax.set_xlabel('queries removed (%)')
    ax.set_ylabel('mean error of the rest')
    ax.set_title(f'AUSE {sp["ause"]:.3g}, AUC {sp["auc"]:.3g}')
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_reliability(path, ence):
    """The reliability diagram of calibration.ence's bins: RMSE against RMV per bin of sigma (the diagonal:
    calibrated), pixels of the 640 frame."""
    rmv, rmse = np.asarray(ence['rmv'], np.float64), np.asarray(ence['rmse'], np.float64)
    fig = _figure((4.5, 4.5))
    ax = fig.add_subplot()
    top = 1.05 * float(np.nanmax(np.concatenate([rmv, rmse, [1.0]])))
    ax.plot([0, top], [0, top], '--', color='grey', label='calibrated')
    ax.plot(rmv, rmse, '-o', ms=4, label=f'{len(rmv)} bins of equal count')
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel('root mean predicted variance, RMV (px)')
    ax.set_ylabel('per-axis RMSE (px)')
    ax.set_title(f'ENCE {ence["ence"]:.3g}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_selective_prediction(path, sel):
    """calibration.selective_prediction: the median error (m) and the recall within each threshold against
    the share of queries kept (most certain first)."""
    kept = 100 * np.asarray(sel['kept'], np.float64)
    fig = _figure((8.0, 3.6))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot(kept, np.asarray(sel['median_m'], np.float64), '-o', ms=4)
    left.set_ylabel('median error (m)')
    for t, recall in sel['recall_within_m'].items():
        right.plot(kept, 100 * np.asarray(recall, np.float64), '-o', ms=4, label=f'within {t} m')
    right.set_ylabel('queries within (%)')
    right.set_ylim(0, 100)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel('queries kept, smallest sigma first (%)')
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_stage_metrics(path, metrics, stage=''):
    """A stage's own metrics (testing.stage_metrics' dict {name: value}) as horizontal bars."""
    names = list(metrics)
    values = np.array([metrics[k] for k in names], np.float64)
    fig = _figure((5.0, 1.0 + 0.4 * len(names)))
    ax = fig.add_subplot()
    ax.barh(np.arange(len(names)), np.nan_to_num(values))
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.annotate(f'{v:.4g}', (0, i), va='center', fontsize=8)
    ax.set_title(f'{stage} stage metrics' if stage else 'stage metrics')
    ax.grid(True, axis='x', alpha=0.3)
    return _save(fig, path)


def _rgb_uint8(img, name):
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'{name} must be (H, W, 3) BGR, got shape {img.shape}')
    if np.issubdtype(img.dtype, np.floating):
        img = np.clip(img + np.asarray(VGG_MEAN_BGR), 0, 255).astype(np.uint8)
    return img[..., ::-1]


def _figure(figsize):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, dpi=100, layout='constrained')


def _save(fig, path):
    """Write the figure as a PNG at path and return path; with path None return it as RGB uint8 (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    if path is None:
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format='png')
    return path
