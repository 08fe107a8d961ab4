"""E_2_1: heatmap localisation — SAMP fusion + U-Net decoder + soft-argmax, positive and semi-positive.

  python train_second_E_2_1.py [--preset demo]     # starts from runs/E_1 (train_first_E_1.py)
  python train_second_E_2_1.py --test              # evaluate runs/E_2_1

Restores the trunks and SAFA of E_1; the fusion MLPs and decoders start fresh.
Loss: triplet + heatmap L2 (mean ||gt - mu|| / 10000) for both branches.
"""
import sys

import train_lib  # first: it sets TensorFlow's environment (log level, oneDNN) and imports it
import geometry
import losses
import model

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS


def loss(m, batch, ctx):
    e = train_lib.embed(m, batch, needs_semi=True)
    triplet = ctx.triplet(e['grd'], e['sat'])
    pos = m.localise('pos', e['sat_raw'], e['grd_raw'], e['sat_skips'], with_cholesky=False)
    semi = m.localise('semi', e['semi_raw'], e['grd_raw'], e['semi_skips'], with_cholesky=False)
    h_pos = ctx.mean(losses.heatmap_loss(pos['mu'], geometry.delta_to_rc(batch['delta'])))
    h_semi = ctx.mean(losses.heatmap_loss(semi['mu'], geometry.delta_to_rc(batch['delta_semi'])))
    return triplet + h_pos + h_semi, {'triplet': triplet, 'heatmap_pos': h_pos, 'heatmap_semi': h_semi}, \
        {'grd': e['grd'], 'sat': e['sat']}


STAGE = train_lib.Stage(
    name='E_2_1', parts=PARTS, train_parts=PARTS, loss=loss, restore=model.RETRIEVAL_PARTS,
    previous='E_1', accepts=('E_1',), previous_cmd='python train_first_E_1.py', localise='heatmap',
    defaults={'lr': 1e-5, 'lr_decay': 1.0, 'batch': 10, 'epochs': 180, 'mining': 1}, demo={'epochs': 3, 'lr': 1e-4})

if __name__ == '__main__':
    sys.exit(train_lib.main([STAGE]))
