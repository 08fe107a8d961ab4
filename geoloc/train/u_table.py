"""E_3's u table (docs/design.md §4): u (pixels) of every (training panorama, semi-positive) pair from the E_2_2
model's semi-positive branch, computed once before E_3's first step and kept in its train state, and the
weight W_m = 1 / (1 + c exp(a (b - u))) that E_3's ratio loss takes from it: b and a are --u_b and --u_a, or
set from the table (--u_b_quantile, --u_a_band). `build` is E_3's Stage.prepare; it also writes
<run_dir>/u_table.npz with u's histogram and the share of pairs the weight acts on."""
import os

import numpy as np
import tensorflow as tf

import losses
import model

ACTIVE = (0.1, 0.9)   # W_m strictly inside this band: E_3 reweights the pair (neither ~VIGOR's loss nor ~0)


def build(m, split, embedder, cfg, log, cache, out_dir):
    """u[p, k - 1] (pixels, the model's own scale) for training panorama p and its semi-positive k = 1..3."""
    pano, k = np.nonzero(split.tiles[:, 1:] >= 0)
    log(f'u table: {len(pano)} (panorama, semi-positive) pairs of the training split')
    grd = embedder.describe(split.pano_paths, 'panorama', cfg.grd_size, cfg.eval_batch, cache)
    if m.cholesky == 'moments':   # the covariance of the pair's heatmap: the aerial trunk runs on every pair
        paths = [split.tile_paths[t] for t in split.tiles[pano, k + 1]]
        chol = embedder.localise_tiles('semi', paths, grd[pano], cfg.sat_size, cfg.eval_batch, cache)[1]
    else:
        tiles = np.unique(split.tiles[pano, k + 1])
        sat = np.zeros((len(split.tile_paths), grd.shape[1]), np.float32)
        sat[tiles] = embedder.describe([split.tile_paths[t] for t in tiles], 'aerial', (cfg.sat_size,) * 2,
                                       cfg.eval_batch, cache)
        chol = embedder.cholesky_from_descriptors('semi', sat[split.tiles[pano, k + 1]], grd[pano])
    u = np.zeros((len(split), 3), np.float32)
    u[pano, k] = model.uncertainty(tf.constant(chol)).numpy()
    b, a = weight_threshold(u[pano, k], cfg), weight_slope(u[pano, k], cfg)
    summarise(u[pano, k], a, b, cfg, log, out_dir)
    return {'u_table': u, 'u_b': np.full((1, 1), b, np.float32), 'u_a': np.full((1, 1), a, np.float32)}


def weight_threshold(u, cfg):
    """E_3's b (pixels, the released NLL's scale): --u_b, or with --u_b_quantile q > 0 the q-quantile of the
    table's u on that scale, so W_m's active band sits inside this model's u distribution whatever its scale
    (the paper's b = 75 px was chosen for VIGOR's)."""
    if cfg.u_b_quantile <= 0 or not len(u):
        return float(cfg.u_b)
    return float(np.quantile(losses.u_on_original_scale(u.astype(np.float64), cfg.nll), cfg.u_b_quantile))


# W_m = 1 / (1 + c exp(a (b - u))) is 0.1 at u = b - ln(9 / c) / a and 0.9 at u = b + ln(9 c) / a: the active
# band is 2 ln 9 / a wide whatever c
BAND_WIDTH_X_A = 2 * np.log(9.0)


def weight_slope(u, cfg):
    """E_3's a (1/px): --u_a, or with --u_a_band q > 0 the a whose active band is as wide as the central q of
    the table's u on the released NLL's scale (between its (1 - q) / 2 and (1 + q) / 2 quantiles)."""
    if cfg.u_a_band <= 0 or not len(u):
        return float(cfg.u_a)
    lo, hi = np.quantile(losses.u_on_original_scale(u.astype(np.float64), cfg.nll),
                         [(1 - cfg.u_a_band) / 2, (1 + cfg.u_a_band) / 2])
    return float(BAND_WIDTH_X_A / max(hi - lo, 1e-6))


def table_slope(tables, cfg):
    """a of a run: its table's (set when E_3 started), or --u_a for a run whose state predates the table."""
    a = tables['u_a'][0, 0]
    return tf.where(a > 0, a, tf.constant(cfg.u_a, a.dtype))


def active_share(u, b, cfg, a=None):
    """(W_m of each pair, the share of pairs with W_m inside the active band) for threshold b, slope a (default
    --u_a)."""
    a = cfg.u_a if a is None else a
    w = losses.uncertainty_weight(losses.u_on_original_scale(tf.constant(u), cfg.nll), a, b, cfg.u_c).numpy()
    return w, (float(np.mean((w > ACTIVE[0]) & (w < ACTIVE[1]))) if len(w) else float('nan'))


def summarise(u, a, b, cfg, log, out_dir):
    """Log and save how much E_3 will reweight: u's histogram and the share of pairs in the active band, for
    the a and b in use and for the paper's --u_a and --u_b."""
    w, active = active_share(u, b, cfg, a)
    _, paper_active = active_share(u, cfg.u_b, cfg)
    counts, edges = np.histogram(u, bins=20)
    log(f'u table: u mean {u.mean():.1f} px, range {u.min():.1f}-{u.max():.1f}; b {b:.1f} px'
        + (f' (the {cfg.u_b_quantile:g} quantile of u)' if b != cfg.u_b else '')
        + (f', a {a:.4g} / px (its band as wide as the central {cfg.u_a_band:g} of u)' if a != cfg.u_a else '')
        + (f'; the paper\'s a {cfg.u_a:g}, b {cfg.u_b:g} px would put {100 * paper_active:.1f} % of pairs in the '
           'band' if (a, b) != (cfg.u_a, cfg.u_b) else '')
        + f'; W_m mean {w.mean():.3f}; active band {ACTIVE[0]} < W_m < {ACTIVE[1]}: {100 * active:.1f} % of pairs')
    log('u table: histogram (px): ' + ', '.join(f'{edges[i]:.4g}-{edges[i + 1]:.4g}: {c}'
                                                  for i, c in enumerate(counts) if c))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'u_table.npz')
    np.savez(path + '.tmp.npz', u=u, w_m=w, hist_counts=counts, hist_edges=edges, active_share=active,
             active_band=np.array(ACTIVE), u_b=b, paper_u_b=cfg.u_b, u_a=a, paper_u_a=cfg.u_a,
             paper_active_share=paper_active)
    os.replace(path + '.tmp.npz', path)
