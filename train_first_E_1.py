"""E_1: the VIGOR baseline (retrieval + offset regression), in two phases.

  python train_first_E_1.py                 # paper settings (needs data/vgg16.npy and VIGOR on a GPU)
  python train_first_E_1.py --preset demo   # small CPU run on the built-in synthetic city
  python train_first_E_1.py --test          # evaluate runs/E_1

Phase a trains the triplet loss from ImageNet VGG16 into <run_dir>/phase_a; phase b restores
everything but the offset head from it and adds VIGOR's IoU-ratio and offset losses (<run_dir>).
E_2_1 starts from this checkpoint.
"""
import sys

import train_lib  # first: it sets TensorFlow's environment (log level, oneDNN) and imports it
import losses
import model

E_1_SCHEDULE = {'lr': 1e-5, 'lr_decay': 0.1, 'lr_decay_steps': 150000, 'lr_staircase': 0, 'mining': 1}


def loss_a(m, batch, ctx):
    e = train_lib.embed(m, batch, needs_semi=False)
    triplet = ctx.triplet(e['grd'], e['sat'])
    return triplet, {'triplet': triplet}, {'grd': e['grd'], 'sat': e['sat']}


def loss_b(m, batch, ctx):
    e = train_lib.embed(m, batch, needs_semi=True)
    triplet = ctx.triplet(e['grd'], e['sat'])
    ratio = losses.iou_ratio_loss(e['grd'], e['sat'], e['semi'], batch['delta'], batch['delta_semi'])
    offset = losses.offset_loss(m.offset_head(e['sat_raw'], e['grd_raw']), batch['delta'])
    total = triplet + ctx.mean(ratio + offset)
    return total, {'triplet': triplet, 'iou_ratio': ctx.mean(ratio), 'offset': ctx.mean(offset)}, \
        {'grd': e['grd'], 'sat': e['sat']}


PHASE_A = train_lib.Stage(
    name='E_1a', run_name='E_1', subdir='phase_a', parts=model.RETRIEVAL_PARTS,
    train_parts=model.RETRIEVAL_PARTS, loss=loss_a, needs_semi=False,
    defaults=dict(E_1_SCHEDULE, batch=14, epochs=30), demo={'epochs': 12, 'batch': 10, 'lr': 3e-4})
PHASE_B = train_lib.Stage(
    name='E_1', parts=model.RETRIEVAL_PARTS + ('offset_head',),
    train_parts=model.RETRIEVAL_PARTS + ('offset_head',), loss=loss_b,
    restore=model.RETRIEVAL_PARTS, previous='E_1a', init_subdir='phase_a', accepts=('E_1a',),
    previous_cmd='python train_first_E_1.py (phase a)', localise='offset',
    defaults=dict(E_1_SCHEDULE, batch=10, epochs=15), demo={'epochs': 3, 'lr': 1e-4})

if __name__ == '__main__':
    sys.exit(train_lib.main([PHASE_A, PHASE_B]))
