"""E_3: uncertainty propagation — the E_2_2 uncertainty u weights VIGOR's ratio loss.

  python train_third_E_3.py [--preset demo]     # starts from runs/E_2_2 (train_second_E_2_2.py)
  python train_third_E_3.py --test              # evaluate runs/E_3

Before the first step, the E_2_2 model's semi-positive branch gives u (pixels) for every (training
panorama, semi-positive) pair (geoloc/train/u_table.py): its fusion and covariance heads on descriptors,
each panorama and tile embedded once (with --cholesky moments, the covariance of each pair's heatmap). The
table is part of the run's state (a resumed run reads it back, never recomputes it) and is also written to
<run_dir>/u_table.npz with its histogram. Only the trunks and SAFA train:
triplet + the uncertainty-weighted ratio loss; W_m = 1 / (1 + c exp(a (b - u))) with u on the released
NLL's scale (x sqrt 2 under the corrected NLL). --nll is E_2_2's, read from its config.json (a different
--nll is refused): it says which scale the u table is on.
"""
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

import tensorflow as tf  # noqa: E402

import config  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402
import stages  # noqa: E402
from geoloc.train import u_table  # noqa: E402

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
def loss(m, emb, batch, ctx):
    cfg = ctx.cfg
    u = tf.gather_nd(ctx.tables['u_table'], tf.stack([batch['pano'], batch['semi_k'] - 1], -1))
    u = losses.u_on_original_scale(u, cfg.nll)
    b = ctx.tables['u_b'][0, 0]                     # --u_b, or the table's quantile (u_table.weight_threshold)
    a = u_table.table_slope(ctx.tables, cfg)        # --u_a, or from the table's spread (u_table.weight_slope)
    w = losses.uncertainty_weight(u, a, b, cfg.u_c)
    active = u_table.ACTIVE
    ctx.report('active_share', tf.cast((w > active[0]) & (w < active[1]), tf.float32))
    ctx.report('w_m', w)
    ratio = losses.uncertainty_ratio_loss(emb['grd'], emb['sat'], emb['semi'], batch['delta'], batch['delta_semi'],
                                          u, a, b, cfg.u_c)
    return {'triplet': losses.batch_triplet_loss(emb, cfg.alpha), 'weighted_ratio': ratio}


STAGE = stages.Stage(
    name='E_3', parts=PARTS, train_parts=model.RETRIEVAL_PARTS, loss=loss, previous='E_2_2', restore=PARTS,
    inherits=('nll',),   # u is on the scale of the NLL E_2_2 trained with: E_3 rescales it by that setting
    tables={'u_table': 3, 'u_b': (1, 1), 'u_a': (1, 1)}, prepare=u_table.build,
    defaults={'lr': 1e-6, 'lr_decay': 0.9, 'lr_decay_steps': 0, 'lr_staircase': 0, 'batch': 10, 'epochs': 150,
              'mining': 0, 'val_every': 10},   # validation: the released `if epoch % 10 == 0`
    presets={'demo': {'epochs': 2, 'lr': 1e-5, 'cholesky_scale': 16.0, 'u_b_quantile': 0.5, 'u_a_band': 0.4}},
    settings=SETTINGS)
STAGES = [STAGE]

if __name__ == '__main__':
    sys.exit(cli.main(STAGES))
