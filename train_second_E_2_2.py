"""E_2_2: semantic ambiguity as a 2D Gaussian — Cholesky covariance heads trained with the NLL.

  python train_second_E_2_2.py [--preset demo]     # starts from runs/E_2_1 (train_second_E_2_1.py)
  python train_second_E_2_2.py --test              # evaluate runs/E_2_2

Restores trunks, SAFA, fusion and decoders of E_2_1; the covariance heads start fresh.
Loss: triplet + 1e-3 NLL(positive) + 1e-4 NLL(semi-positive), NLL with the 1/2 and an eps (SPEC §4).
"""
import sys

import train_lib  # first: it sets TensorFlow's environment (log level, oneDNN) and imports it
import geometry
import losses
import model

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS + model.CHOLESKY_PARTS


def loss(m, batch, ctx):
    e = train_lib.embed(m, batch, needs_semi=True)
    triplet = ctx.triplet(e['grd'], e['sat'])
    pos = m.localise('pos', e['sat_raw'], e['grd_raw'], e['sat_skips'])
    semi = m.localise('semi', e['semi_raw'], e['grd_raw'], e['semi_skips'])
    nll_pos = ctx.mean(losses.gaussian_nll(pos['mu'], pos['chol'], geometry.delta_to_rc(batch['delta'])))
    nll_semi = ctx.mean(losses.gaussian_nll(semi['mu'], semi['chol'], geometry.delta_to_rc(batch['delta_semi'])))
    total = triplet + 1e-3 * nll_pos + 1e-4 * nll_semi
    return total, {'triplet': triplet, 'nll_pos': nll_pos, 'nll_semi': nll_semi}, {'grd': e['grd'], 'sat': e['sat']}


STAGE = train_lib.Stage(
    name='E_2_2', parts=PARTS, train_parts=PARTS, loss=loss,
    restore=model.RETRIEVAL_PARTS + model.HEATMAP_PARTS, previous='E_2_1', accepts=('E_2_1',),
    previous_cmd='python train_second_E_2_1.py', localise='heatmap',
    defaults={'lr': 5e-6, 'lr_decay': 0.9, 'lr_decay_steps': 910, 'lr_staircase': 0, 'batch': 10,
              'epochs': 80, 'mining': 1},
    demo={'epochs': 2, 'lr': 5e-5})

if __name__ == '__main__':
    sys.exit(train_lib.main([STAGE]))
