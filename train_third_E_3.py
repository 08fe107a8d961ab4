"""E_3: uncertainty propagation — the E_2_2 uncertainty u weights VIGOR's ratio loss.

  python train_third_E_3.py [--preset demo]     # starts from runs/E_2_2 (train_second_E_2_2.py)
  python train_third_E_3.py --test              # evaluate runs/E_3

Before training, the E_2_2 model's semi-positive branch gives u (pixels) for every (training
panorama, semi-positive) pair; the table is saved as <run_dir>/u_table.npz and reused when it was
computed from the same checkpoint. Only the trunks and SAFA train (triplet + weighted ratio loss).
"""
import os
import sys

import train_lib  # first: it sets TensorFlow's environment (log level, oneDNN) and imports it
import numpy as np
import tensorflow as tf

import losses
import model

PARTS = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS + model.CHOLESKY_PARTS


def u_table(run):
    """u[p, k - 1] for training panorama p and its semi-positive k = 1..3 (0 where absent)."""
    source = train_lib.latest_checkpoint(run.init_from) or ''
    path = os.path.join(run.run_dir, 'u_table.npz')  # the chief's (other workers write theirs apart)
    if os.path.exists(path):
        saved = np.load(path)
        if str(saved['source']) == source or not source:
            run.log(f'u table: loaded {path} (from {saved["source"]})')
            return {'u_table': tf.constant(saved['u'])}
    split = train_lib.dataset_splits(run.cfg, 'train')
    pano, k = np.nonzero(split.tiles[:, 1:] >= 0)
    run.log(f'u table: {len(pano)} (panorama, semi-positive) pairs of the training split with {source}')
    _, chol, _ = train_lib.localise_pairs(run.model, split, pano, split.tiles[pano, k + 1], run.cfg,
                                          branch='semi', keep_heatmaps=0, cache=run.images)
    u = np.zeros((len(split), 3), np.float32)
    u[pano, k] = model.uncertainty(tf.constant(chol)).numpy()
    path = os.path.join(run.write_dir, 'u_table.npz')
    np.savez(path + '.tmp.npz', u=u, source=source)
    os.replace(path + '.tmp.npz', path)
    run.log(f'u table: saved {path}; u mean {u[pano, k].mean():.1f} px, range {u[pano, k].min():.1f}-{u[pano, k].max():.1f}')
    return {'u_table': tf.constant(u)}


def loss(m, batch, ctx):
    e = train_lib.embed(m, batch, needs_semi=True)
    triplet = ctx.triplet(e['grd'], e['sat'])
    u = tf.gather_nd(ctx.consts['u_table'], tf.stack([batch['pano'], batch['semi_k'] - 1], -1))
    ratio = ctx.mean(losses.uncertainty_ratio_loss(e['grd'], e['sat'], e['semi'], batch['delta'],
                                                   batch['delta_semi'], u))
    return triplet + ratio, {'triplet': triplet, 'weighted_ratio': ratio}, {'grd': e['grd'], 'sat': e['sat']}


STAGE = train_lib.Stage(
    name='E_3', parts=PARTS, train_parts=model.RETRIEVAL_PARTS, loss=loss, restore=PARTS,
    previous='E_2_2', accepts=('E_2_2',), previous_cmd='python train_second_E_2_2.py', localise='heatmap',
    prepare=u_table,
    defaults={'lr': 1e-6, 'lr_decay': 0.9, 'lr_decay_steps': 0, 'lr_staircase': 1, 'batch': 10, 'epochs': 150,
              'mining': 0},
    demo={'epochs': 2, 'lr': 1e-5})

if __name__ == '__main__':
    sys.exit(train_lib.main([STAGE]))
