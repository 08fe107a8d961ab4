"""E_3: uncertainty propagation — the E_2_2 uncertainty u weights VIGOR's ratio loss.

  python train_third_E_3.py [--preset demo]     # starts from runs/E_2_2 (train_second_E_2_2.py)
  python train_third_E_3.py --test              # evaluate runs/E_3

Before the first step, the E_2_2 model's semi-positive branch gives u (pixels) for every (training
panorama, semi-positive) pair: its fusion and covariance heads on descriptors, each panorama and tile
embedded once. The table is part of the run's state (a resumed run reads it back, never recomputes it)
and is also written to <run_dir>/u_table.npz with its histogram. Only the trunks and SAFA train:
triplet + the uncertainty-weighted ratio loss; W_m = 1 / (1 + c exp(a (b - u))) with u on the released
NLL's scale (x sqrt 2 under the corrected NLL). --nll is E_2_2's, read from its config.json (a different
--nll is refused): it says which scale the u table is on.
"""
import os
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import config  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402
import stages  # noqa: E402

# E_3's own settings (its flags; ctx.cfg.u_a ...): W_m = 1 / (1 + c exp(a (b - u)))
SETTINGS = (
    ('u_a', config.setting(0.3, 'E_3 W_m = 1 / (1 + c exp(a (b - u))): a (1/px)', rule='>=0.')),
    ('u_b', config.setting(75.0, 'E_3 weight threshold b (pixels of the 640 frame, on the original NLL scale)',
                           rule='finite')),
    ('u_c', config.setting(2.0, 'E_3 weight constant c', rule='>=0.')),
    ('u_b_quantile', config.setting(0.0, "E_3: 0 = b is --u_b; q in (0, 1) = b is the q-quantile of E_3's u table "
                                         "(on the released NLL's scale), computed when E_3 starts and kept in its "
                                         "state: puts the weight's active band inside a u distribution of another "
                                         "scale than VIGOR's (not the paper's setting)", rule='quantile')),
    ('u_a_band', config.setting(0.0, "E_3: 0 = a is --u_a; q in (0, 1) = a is set when E_3 starts so that the active "
                                     'band 0.1 < W_m < 0.9 (4.39 / a px wide, whatever c) is as wide as the central '
                                     "q of the u table (on the released NLL's scale) (not the paper's setting)",
                                rule='quantile')),
)

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS + model.CHOLESKY_PARTS
ACTIVE = (0.1, 0.9)   # W_m strictly inside this band: E_3 reweights the pair (neither ~VIGOR's loss nor ~0)


def u_table(m, split, embedder, cfg, log, cache, out_dir):
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


def loss(m, emb, batch, ctx):
    cfg = ctx.cfg
    u = tf.gather_nd(ctx.tables['u_table'], tf.stack([batch['pano'], batch['semi_k'] - 1], -1))
    u = losses.u_on_original_scale(u, cfg.nll)
    b = ctx.tables['u_b'][0, 0]                     # --u_b, or the table's quantile (weight_threshold)
    a = table_slope(ctx.tables, cfg)                # --u_a, or from the table's spread (weight_slope)
    w = losses.uncertainty_weight(u, a, b, cfg.u_c)
    ctx.report('active_share', tf.cast((w > ACTIVE[0]) & (w < ACTIVE[1]), tf.float32))
    ctx.report('w_m', w)
    ratio = losses.uncertainty_ratio_loss(emb['grd'], emb['sat'], emb['semi'], batch['delta'], batch['delta_semi'],
                                          u, a, b, cfg.u_c)
    return {'triplet': losses.batch_triplet_loss(emb, cfg.alpha), 'weighted_ratio': ratio}


STAGE = stages.Stage(
    name='E_3', parts=PARTS, train_parts=model.RETRIEVAL_PARTS, loss=loss, previous='E_2_2', restore=PARTS,
    inherits=('nll',),   # u is on the scale of the NLL E_2_2 trained with: E_3 rescales it by that setting
    tables={'u_table': 3, 'u_b': (1, 1), 'u_a': (1, 1)}, prepare=u_table,
    defaults={'lr': 1e-6, 'lr_decay': 0.9, 'lr_decay_steps': 0, 'lr_staircase': 0, 'batch': 10, 'epochs': 150,
              'mining': 0, 'val_every': 10},   # validation: the released `if epoch % 10 == 0`
    presets={'demo': {'epochs': 2, 'lr': 1e-5, 'cholesky_scale': 16.0, 'u_b_quantile': 0.5, 'u_a_band': 0.4}},
    settings=SETTINGS)
STAGES = [STAGE]

if __name__ == '__main__':
    sys.exit(cli.main(STAGES))
