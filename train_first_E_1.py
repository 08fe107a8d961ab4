"""E_1: the VIGOR baseline (retrieval + offset regression), in two phases.

  python train_first_E_1.py                 # paper settings (needs data/vgg16.npy and VIGOR on a GPU)
  python train_first_E_1.py --preset demo   # small CPU run on the built-in synthetic city
  python train_first_E_1.py --test          # evaluate runs/E_1
  python train_first_E_1.py --area cross --epochs_a 11 --epochs 10   # the released cross-area recipe

Phase a (E_1a) trains the triplet loss from ImageNet VGG16 into <run_dir>/phase_a. Phase b (E_1)
restores everything but the offset head from it, INCLUDING the global step, Adam's slots and the
mining table (as the released code does), and adds VIGOR's IoU-ratio and offset losses (<run_dir>).
E_2_1 starts from the end of phase a (runs/E_1/phase_a).
"""
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

import losses  # noqa: E402
import model  # noqa: E402
import stages  # noqa: E402

# the released E_1 validates after every epoch of both phases
SCHEDULE = {'lr': 1e-5, 'lr_decay': 0.1, 'lr_decay_steps': 150000, 'lr_staircase': 0, 'mining': 1, 'val_every': 1}


def loss_a(m, emb, batch, ctx):
    return {'triplet': losses.batch_triplet_loss(emb, ctx.cfg.alpha)}


def loss_b(m, emb, batch, ctx):
    ratio = losses.iou_ratio_loss(emb['grd'], emb['sat'], emb['semi'], batch['delta'], batch['delta_semi'])
    offset = losses.offset_loss(m.offset_head(emb['sat_raw'], emb['grd_raw']), batch['delta'])
    return {'triplet': losses.batch_triplet_loss(emb, ctx.cfg.alpha), 'iou_ratio': ratio, 'offset': offset}


PHASE_A = stages.Stage(
    name='E_1a', home='E_1', subdir='phase_a', parts=model.RETRIEVAL_PARTS, train_parts=model.RETRIEVAL_PARTS,
    loss=loss_a, uses_semi=False, defaults=dict(SCHEDULE, batch=14, epochs=30),
    # --epochs and --max_steps set both phases; these set phase a's alone (the released cross-area recipe:
    # --epochs_a 11 --epochs 10)
    flags={'epochs_a': ('epochs', "phase a's epochs, over --epochs (which then sets phase b's only); default "
                                  '--epochs, else 30; like --epochs, a larger value extends a finished phase a'),
           'max_steps_a': ('max_steps', "phase a's --max_steps, over --max_steps (which then sets phase b's only); "
                                        'default --max_steps, else 0')},
    presets={'demo': {'epochs': 12, 'lr': 3e-4}})
PHASE_B = stages.Stage(
    name='E_1', parts=model.RETRIEVAL_PARTS + ('offset_head',), train_parts=model.RETRIEVAL_PARTS + ('offset_head',),
    loss=loss_b, previous='E_1a', restore=model.RETRIEVAL_PARTS, carry='all',
    defaults=dict(SCHEDULE, batch=10, epochs=15, mining_start_epoch=1),
    presets={'demo': {'epochs': 3, 'lr': 1e-4}})
STAGES = [PHASE_A, PHASE_B]

if __name__ == '__main__':
    sys.exit(cli.main(STAGES))
