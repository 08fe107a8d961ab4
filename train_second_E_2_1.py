"""E_2_1: heatmap localisation — SAMP fusion + U-Net decoder + soft-argmax, positive and semi-positive.

  python train_second_E_2_1.py [--preset demo]     # starts from runs/E_1/phase_a (train_first_E_1.py)
  python train_second_E_2_1.py --test              # evaluate runs/E_2_1

Restores the trunks and SAFA of E_1's phase a (the released script loads epoch 30, the end of phase a;
--init_from runs/E_1 takes phase b instead) with their Adam slots; fusion MLPs and decoders start fresh.
Loss: triplet + heatmap L2 (mean ||gt - mu|| / 10000) for both branches; with --localiser correlation (not
the paper's) also each branch's cross-entropy to the true cell (--ce_weight).
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

# E_2_1's own settings (its flags; ctx.cfg.heatmap_weight ...)
SETTINGS = (
    ('heatmap_weight', config.setting(1.0, 'E_2_1 weight of each branch heatmap loss', rule='>=0.')),
    ('ce_weight', config.setting(1.0, "E_2_1 weight of each branch's cross-entropy to the true cell (correlation "
                                      'localiser only)', rule='>=0.')),
)

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS


def loss(m, emb, batch, ctx):
    pos = m.localise('pos', emb['sat_raw'], emb['grd_raw'], emb['sat_skips'])
    semi = m.localise('semi', emb['semi_raw'], emb['grd_raw'], emb['semi_skips'])
    gt_pos, gt_semi = geometry.delta_to_rc(batch['delta']), geometry.delta_to_rc(batch['delta_semi'])
    w = ctx.cfg.heatmap_weight
    terms = {'triplet': losses.batch_triplet_loss(emb, ctx.cfg.alpha),
             'heatmap_pos': w * losses.heatmap_loss(pos['mu'], gt_pos),
             'heatmap_semi': w * losses.heatmap_loss(semi['mu'], gt_semi)}
    if 'logits' in pos:   # the correlation localiser (--localiser correlation) learns the true cell
        terms['cell_ce_pos'] = ctx.cfg.ce_weight * losses.cell_cross_entropy(pos['logits'], gt_pos)
        terms['cell_ce_semi'] = ctx.cfg.ce_weight * losses.cell_cross_entropy(semi['logits'], gt_semi)
    return terms


STAGE = stages.Stage(
    name='E_2_1', parts=PARTS, train_parts=PARTS, loss=loss, previous='E_1a', also_accepts=('E_1',),
    restore=model.RETRIEVAL_PARTS,
    # the released E_2 scripts validate `if epoch % 10 == 0` (1-based epochs)
    defaults={'lr': 1e-5, 'lr_decay': 1.0, 'batch': 10, 'epochs': 180, 'mining': 1, 'val_every': 10},
    # the presets train at lr 1e-4, not more: the fusion takes the un-normalised descriptors, whose scale nothing
    # holds; at 1e-3 they grow by orders of magnitude and the heatmap dies at the tile centre (benchmarks/LOG.md)
    presets={'demo': {'epochs': 10, 'lr': 1e-4}}, settings=SETTINGS)
STAGES = [STAGE]

if __name__ == '__main__':
    sys.exit(cli.main(STAGES))
