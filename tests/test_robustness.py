"""Numerical safety and determinism of training.

- A non-finite loss or gradient skips the update, stops the run with a message and keeps the last good
  checkpoint.
- Every loss has finite gradients on degenerate inputs (identical descriptors, zero heatmap, mu == gt,
  near-singular Sigma), through the model heads where it matters.
- The same seed gives bit-identical losses: two runs of 20 steps (two epochs of mined batches included).
"""
import dataclasses
import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import losses
import model
import pipeline
import synthetic_data
import train_first_E_1
import train_lib

TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4', '--val_every', '0',
        '--log_every', '1']


@pytest.fixture(scope='module')
def vigor(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('robust') / 'VIGOR')
    synthetic_data.write_vigor(root, grid=3, tile_px=64, pano_hw=(32, 64))
    return root


def finite(*tensors):
    return all(np.all(np.isfinite(t.numpy())) for t in tensors)


# ----------------------------------------------------------------------------- non-finite loss

def poison_third_batch(monkeypatch):
    """train_dataset's third batch (step 3 of a fresh run) gets a NaN delta."""
    real = pipeline.train_dataset

    def poisoned(*args, **kwargs):
        def poison(i, batch):
            return dict(batch, delta=tf.where(i == 2, tf.fill(tf.shape(batch['delta']), np.nan), batch['delta']))
        return real(*args, **kwargs).enumerate().map(poison)
    monkeypatch.setattr(pipeline, 'train_dataset', poisoned)


def nan_loss(m, batch, ctx):        # phase a's loss, NaN when the batch's delta is
    total, scalars, desc = train_first_E_1.loss_a(m, batch, ctx)
    return total + 0.0 * tf.reduce_mean(batch['delta']), scalars, desc


def nan_gradient(m, batch, ctx):    # phase a's loss, finite, with NaN gradients when the batch's delta is NaN
    total, scalars, desc = train_first_E_1.loss_a(m, batch, ctx)
    poisoned = tf.math.is_nan(tf.reduce_mean(batch['delta']))

    @tf.custom_gradient
    def nan_grad(x):
        return tf.identity(x), lambda dy: dy * tf.where(poisoned, np.nan, 1.0)
    return nan_grad(total), scalars, desc


@pytest.mark.parametrize('loss', [nan_loss, nan_gradient], ids=['loss', 'gradient'])
def test_non_finite_step_stops_and_keeps_last_good_checkpoint(vigor, tmp_path, monkeypatch, loss):
    poison_third_batch(monkeypatch)
    stage = dataclasses.replace(train_first_E_1.PHASE_A, loss=loss)
    argv = TINY + ['--epochs', '1', '--ckpt_every', '2', '--mining', '0', '--data_root', vigor,
                   '--run_dir', str(tmp_path)]
    run = train_lib.Run(stage, train_lib.parse_config([stage], argv)[0])
    with pytest.raises(train_lib.UserError) as e:
        run.train()
    ckpt = os.path.join(str(tmp_path), 'phase_a', 'ckpt', 'ckpt-2')
    assert str(e.value).startswith('non-finite loss or gradient at step 3 (loss ' + ('nan' if loss is nan_loss else '0.'))
    assert str(e.value).endswith(f'last good checkpoint: {ckpt}')
    assert train_lib.latest_checkpoint(os.path.join(str(tmp_path), 'phase_a')) == ckpt
    # the bad step changed nothing: the weights in memory are those of the checkpoint, and finite
    assert int(run.step.numpy()) == 2 and int(run.opt.iterations.numpy()) == 2
    saved = model.CrossViewModel((32, 64), 64, 0.0625, stage.parts)
    tf.train.Checkpoint(model=saved).read(ckpt).expect_partial().assert_existing_objects_matched()
    for a, b in zip(run.model.trainable_variables, saved.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert finite(*run.model.trainable_variables)


# ----------------------------------------------------------------------------- degenerate inputs

def gradients(loss_fn, *variables):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    return loss, tape.gradient(loss, list(variables))


def test_identical_descriptors_give_finite_gradients():
    same = tf.Variable(tf.math.l2_normalize(tf.ones([4, 8]), -1))     # every grd = every sat = every semi
    d_pos, d_semi, u = tf.zeros([4, 2]), tf.fill([4, 2], 300.0), tf.constant([0.0, 10.0, 75.0, 500.0])
    for fn in (lambda: losses.triplet_loss(same, same),
               lambda: losses.iou_ratio_loss(same, same, same, d_pos, d_semi),
               lambda: losses.uncertainty_ratio_loss(same, same, same, d_pos, d_semi, u)):
        loss, (g,) = gradients(fn, same)
        assert finite(loss, g)


def test_zero_heatmap_gives_finite_gradients():
    heat = tf.Variable(tf.zeros([2, 16, 16]))
    gt = tf.constant([[100.0, 200.0], [320.0, 320.0]])
    loss, (g,) = gradients(lambda: losses.heatmap_loss(model.soft_argmax(heat), gt), heat)
    assert finite(loss, g)
    # through the decoder: a dead last layer (relu of negative logits) gives a zero heatmap
    init = model.Init(0)
    trunk = model.VGG16(init, 0.0625)
    dec = model.HeatmapDecoder(init, 8, 64, 0.0625, {c.name: c.w.shape[-1] for c in trunk.convs})
    dec.logits.b.assign(tf.fill(dec.logits.b.shape, -1e3))
    _, skips = trunk(tf.zeros([2, 64, 64, 3]))
    bottleneck = tf.Variable(tf.ones([2, 8]))
    loss, grads = gradients(lambda: losses.heatmap_loss(model.soft_argmax(dec(bottleneck, skips)), gt),
                            bottleneck, *dec.trainable_variables)
    assert float(tf.reduce_max(dec(bottleneck, skips))) == 0.0
    assert finite(loss, *[g for g in grads if g is not None])


def test_heatmap_loss_at_the_ground_truth_has_zero_gradient():
    # a uniform heatmap puts mu at the tile centre (320, 320); a panorama exactly there: distance 0
    heat = tf.Variable(tf.ones([1, 8, 8]))
    loss, (g,) = gradients(lambda: losses.heatmap_loss(model.soft_argmax(heat), tf.constant([[320.0, 320.0]])), heat)
    assert float(loss) == 0.0 and finite(g)
    mu = tf.Variable([[3.0, 4.0]])
    loss, (g,) = gradients(lambda: losses.heatmap_loss(mu, tf.zeros([1, 2])), mu)
    np.testing.assert_allclose(g.numpy(), [[0.6e-4, 0.8e-4]], rtol=1e-5)   # d|mu|/dmu / 10000 away from 0


def test_near_singular_sigma_gives_finite_gradients():
    mu, gt = tf.Variable([[300.0, 300.0], [10.0, 600.0]]), tf.constant([[320.0, 310.0], [600.0, 10.0]])
    for chol in ([[1e-4, 50.0, 1e-4], [1e-4, 0.0, 1e-4]],       # raw factors: Sigma ~ rank one / ~ 0
                 [[1.0, 1e4, 1.0], [1.0, -1e4, 1.0]]):          # the head's floor with a huge correlation
        chol = tf.Variable(chol)
        loss, grads = gradients(lambda: losses.gaussian_nll(mu, chol, gt), mu, chol)
        assert finite(loss, *grads)
    # through the covariance head: saturated inputs
    head = model.CholeskyHead(model.Init(0), 8, 0.0625)
    x = tf.Variable(tf.constant([[1e4] * 8, [-1e4] * 8, [0.0] * 8]))
    loss, grads = gradients(lambda: losses.gaussian_nll(tf.zeros([3, 2]), head(x), tf.fill([3, 2], 640.0)),
                            x, *head.trainable_variables)
    assert finite(loss, *grads)


# ----------------------------------------------------------------------------- determinism

def logged_losses(run_dir):
    """step -> total loss, from the run's TensorBoard events."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, 'tb', 'events*'))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == 'loss/total':
                    out[event.step] = float(tf.make_ndarray(v.tensor))
    return out


@pytest.fixture(scope='module')
def two_runs(vigor, tmp_path_factory):
    """Two runs of the same command: 20 steps = two mining rounds and 2 epochs of half-mined batches."""
    dirs = []
    for name in ('first', 'second'):
        run_dir = str(tmp_path_factory.mktemp('determinism') / name)
        argv = TINY + ['--epochs', '3', '--max_steps', '20', '--ckpt_every', '100',
                       '--data_root', vigor, '--run_dir', run_dir]
        assert train_lib.main([train_first_E_1.PHASE_A], argv) == 0
        dirs.append(os.path.join(run_dir, 'phase_a'))
    return dirs


def test_same_seed_same_losses(two_runs):
    first, second = (logged_losses(d) for d in two_runs)
    assert sorted(first) == list(range(1, 21))
    assert [first[s] for s in range(1, 21)] == [second[s] for s in range(1, 21)]   # bit for bit
    assert len(set(first.values())) > 10


def test_resumed_run_restores_the_mining_table(two_runs, vigor):
    """A new process on the finished run reads back the table mined at the end of epoch 2."""
    run_dir = os.path.dirname(two_runs[0])
    argv = TINY + ['--epochs', '3', '--max_steps', '20', '--ckpt_every', '100',
                   '--data_root', vigor, '--run_dir', run_dir]
    cfg = train_lib.parse_config([train_first_E_1.PHASE_A], argv)[0]
    run = train_lib.Run(train_first_E_1.PHASE_A, cfg)
    run.build(train_lib.dataset_splits(cfg, 'train'))
    run.initialise()
    saved = tf.train.load_checkpoint(train_lib.latest_checkpoint(two_runs[0]))
    assert bool(run.hard_valid.numpy()) and run.hard.shape == (36, 100)
    np.testing.assert_array_equal(run.hard.numpy(), saved.get_tensor('hard/.ATTRIBUTES/VARIABLE_VALUE'))
    assert int(run.step.numpy()) == 20
