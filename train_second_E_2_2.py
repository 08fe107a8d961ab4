"""E_2_2: semantic ambiguity as a 2D Gaussian — Cholesky covariance heads trained with the NLL.

  python train_second_E_2_2.py [--preset demo]     # starts from runs/E_2_1 (train_second_E_2_1.py)
  python train_second_E_2_2.py --test              # evaluate runs/E_2_2

Restores trunks, SAFA, fusion and decoders of E_2_1 with their Adam slots (global step reset); the
covariance heads start fresh. Loss: triplet + 1e-3 NLL(positive) + 1e-4 NLL(semi-positive); --nll
chooses the corrected NLL (default) or the released formula.
"""
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

import config  # noqa: E402
from geoloc.data import geometry  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402
import stages  # noqa: E402

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS + model.CHOLESKY_PARTS
# E_2_2's own settings (its flags; ctx.cfg.nll_pos_weight ...)
SETTINGS = (
    ('nll_pos_weight', config.setting(1e-3, 'E_2_2 weight of the positive branch NLL', rule='>=0.')),
    ('nll_semi_weight', config.setting(1e-4, 'E_2_2 weight of the semi-positive branch NLL', rule='>=0.')),
)


def loss(m, emb, batch, ctx):
    cfg = ctx.cfg
    pos = m.localise('pos', emb['sat_raw'], emb['grd_raw'], emb['sat_skips'])
    semi = m.localise('semi', emb['semi_raw'], emb['grd_raw'], emb['semi_skips'])
    ctx.report('u_pos_px', model.uncertainty(pos['chol']))
    ctx.report('u_semi_px', model.uncertainty(semi['chol']))
    return {'triplet': losses.batch_triplet_loss(emb, cfg.alpha),
            'nll_pos': cfg.nll_pos_weight * losses.gaussian_nll(pos['mu'], pos['chol'],
                                                                geometry.delta_to_rc(batch['delta']), cfg.nll),
            'nll_semi': cfg.nll_semi_weight * losses.gaussian_nll(semi['mu'], semi['chol'],
                                                                  geometry.delta_to_rc(batch['delta_semi']), cfg.nll)}


STAGE = stages.Stage(
    name='E_2_2', parts=PARTS, train_parts=PARTS, loss=loss, previous='E_2_1',
    restore=model.RETRIEVAL_PARTS + model.HEATMAP_PARTS,
    defaults={'lr': 5e-6, 'lr_decay': 0.9, 'lr_decay_steps': 910, 'lr_staircase': 0, 'batch': 10, 'epochs': 80,
              'mining': 1, 'val_every': 10},   # validation: the released `if epoch % 10 == 0`
    # demo: the head's scale lets u reach the demo's ~100-px errors in 100 steps (at scale 1 it stays near 20 px)
    presets={'demo': {'epochs': 4, 'lr': 5e-5, 'cholesky_scale': 16.0}}, settings=SETTINGS)
STAGES = [STAGE]

if __name__ == '__main__':
    sys.exit(cli.main(STAGES))
