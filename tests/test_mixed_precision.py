"""--mixed_precision 1: float16 compute, float32 variables, dynamic loss scaling (train_lib.Run.make_step).

Tiny E_2_2 model (every part: trunks, SAFA, fusion, decoders, Cholesky heads) on a random global batch of 4.
"""
import numpy as np
import pytest
import tensorflow as tf

import train_first_E_1
import train_lib
import train_second_E_2_2

TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4']


def random_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        'grd': rng.normal(0, 60, (n, 32, 64, 3)), 'sat': rng.normal(0, 60, (n, 64, 64, 3)),
        'semi': rng.normal(0, 60, (n, 64, 64, 3)), 'delta': rng.uniform(-150, 150, (n, 2)),
        'delta_semi': rng.uniform(-150, 150, (n, 2)) + 320,
    }
    batch = {k: tf.constant(v, tf.float32) for k, v in batch.items()}
    batch.update({k: tf.range(n, dtype=tf.int64) for k in ('pano', 'sat_idx', 'semi_idx')})
    batch['semi_k'] = tf.ones(n, tf.int64)
    return batch


def make_run(stage, tmp_path, *flags):
    cfg = train_lib.parse_config([stage], TINY + ['--run_dir', str(tmp_path), *flags])[0]
    run = train_lib.Run(stage, cfg)
    run.build(range(8))
    return run, cfg


def float16_op_types(step, batch):
    graph = step.get_concrete_function(batch).graph
    return {op.type for op in graph.get_operations() if any(t.dtype == tf.float16 for t in op.outputs)}


def test_float32_is_the_default(tmp_path):
    run, cfg = make_run(train_first_E_1.PHASE_A, tmp_path)
    assert cfg['mixed_precision'] == 0
    step = run.make_step({})
    assert float16_op_types(step, random_batch()) == set()
    assert float(run.loss_scale.numpy()) == 1.0


def test_mixed_precision_steps_and_loss_scaling(tmp_path):
    run, _ = make_run(train_second_E_2_2.STAGE, tmp_path, '--mixed_precision', '1')
    step = run.make_step({})
    batch = random_batch()
    fp16 = float16_op_types(step, batch)
    assert {'Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'MatMul', 'Einsum'} <= fp16, fp16
    assert all(v.dtype == tf.float32 for v in run.model.variables)
    assert all(v.dtype == tf.float32 for v in run.opt.m)

    w0 = run.model.grd_trunk.convs[0].w.numpy()
    losses = []
    for _ in range(2):
        loss, scalars, ok, _ = step(batch)
        assert bool(ok.numpy()) and np.isfinite(float(loss))
        assert all(np.isfinite(float(v)) for v in scalars.values())
        losses.append(float(loss))
    assert float(run.loss_scale.numpy()) == 2.0 ** 15        # no overflow: the scale stays
    assert int(run.opt.iterations.numpy()) == 2
    assert not np.array_equal(run.model.grd_trunk.convs[0].w.numpy(), w0)

    # the float32 loss of the same weights agrees (float16 rounding only)
    run32, _ = make_run(train_second_E_2_2.STAGE, tmp_path / 'fp32')
    loss32 = train_second_E_2_2.loss(run32.model, batch, train_lib.LossContext(run32.cfg, {}))[0]
    assert losses[0] == pytest.approx(float(loss32), rel=2e-3)

    # An overflow (float16 gradients of a loss scaled by 2^100 are inf) skips the update, halves the
    # scale, and is no reason to stop.
    run.loss_scale.assign(2.0 ** 100)
    before = [v.numpy() for v in run.opt.vars[:3]]
    loss, _, ok, _ = step(batch)
    assert bool(ok.numpy()) and np.isfinite(float(loss))
    assert float(run.loss_scale.numpy()) == 2.0 ** 99
    assert int(run.opt.iterations.numpy()) == 2               # skipped
    for a, v in zip(before, run.opt.vars[:3]):
        np.testing.assert_array_equal(a, v.numpy())
