"""--mixed_precision 1: float16 compute, float32 variables, dynamic loss scaling (loop.make_step).

Tiny E_2_2 model (every part: trunks, SAFA, fusion, decoders, Cholesky heads) on a random global batch of 4.
"""
import numpy as np
import pytest
import tensorflow as tf

import config
from geoloc.train import distribute
from geoloc.nn import embedding
from geoloc.train import loop
import stages
import train_first_E_1
import train_second_E_2_2
from geoloc.train import train_state



def random_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        'grd': rng.normal(0, 60, (n, 32, 64, 3)), 'sat': rng.normal(0, 60, (n, 64, 64, 3)),
        'semi': rng.normal(0, 60, (n, 64, 64, 3)), 'delta': rng.uniform(-150, 150, (n, 2)),
        'delta_semi': rng.uniform(-150, 150, (n, 2)) + 320,
    }
    batch = {k: tf.constant(v, tf.float32) for k, v in batch.items()}
    batch.update({k: tf.range(n, dtype=tf.int64) for k in ('pano', 'sat_idx')})
    batch['semi_k'] = tf.ones(n, tf.int64)
    return batch


def make_state(stage, mixed=0):
    cfg = config.resolve(stage.name, {'grd_size': (32, 64), 'sat_size': 64, 'width': 0.0625, 'batch': 4,
                                      'mixed_precision': mixed}, 'paper', stage.defaults, own=stage.settings)
    state = train_state.TrainState(stage, cfg, 8, 2)
    return state, cfg, loop.make_step(state, stage, cfg, distribute.make_strategy('default'))


def float16_op_types(step, batch):
    graph = step.get_concrete_function(batch).graph
    return {op.type for op in graph.get_operations() if any(t.dtype == tf.float16 for t in op.outputs)}


def test_float32_is_the_default():
    state, cfg, step = make_state(train_first_E_1.PHASE_A)
    assert cfg.mixed_precision == 0
    assert float16_op_types(step, random_batch()) == set()
    assert float(state.loss_scale.numpy()) == 1.0


def test_mixed_precision_steps_and_loss_scaling():
    run, cfg32, step = make_state(train_second_E_2_2.STAGE, mixed=1)
    batch = random_batch()
    fp16 = float16_op_types(step, batch)
    assert {'Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'MatMul', 'Einsum'} <= fp16, fp16
    assert all(v.dtype == tf.float32 for v in run.model.variables)
    assert all(v.dtype == tf.float32 for v in run.optimizer.m)

    w0 = run.model.grd_trunk.convs[0].w.numpy()
    losses, scales = [], []
    for _ in range(12):     # (the first steps overflow: the NLL's gradients at the initial 4.5-px Sigma are large)
        loss, terms, _, ok, _ = step(batch)
        assert bool(ok.numpy()) and np.isfinite(float(loss))
        assert all(np.isfinite(float(v)) for v in terms.values())
        losses.append(float(loss))
        scales.append(float(run.loss_scale.numpy()))
    # a step either updates (the scale stays) or overflows (the update is skipped, the scale halves)
    halvings = int(round(np.log2(2.0 ** 15 / scales[-1])))
    assert scales[-1] <= 2.0 ** 15 and all(b in (a, a / 2) for a, b in zip([2.0 ** 15] + scales, scales))
    assert int(run.optimizer.updates.numpy()) == 12 - halvings >= 2
    assert not np.array_equal(run.model.grd_trunk.convs[0].w.numpy(), w0)

    # the float32 loss of the same weights agrees (float16 rounding only)
    run32, cfg, _ = make_state(train_second_E_2_2.STAGE)
    emb = embedding.embed_batch(run32.model, batch)
    loss32 = sum(train_second_E_2_2.loss(run32.model, emb, batch, embedding.LossContext(cfg, {})).values())
    assert losses[0] == pytest.approx(float(loss32), rel=2e-3)

    # An overflow (float16 gradients of a loss scaled by 2^100 are inf) skips the update, halves the
    # scale, and is no reason to stop.
    run.loss_scale.assign(2.0 ** 100)
    before = [v.numpy() for v in run.optimizer.vars[:3]]
    loss, _, _, ok, _ = step(batch)
    assert bool(ok.numpy()) and np.isfinite(float(loss))
    assert float(run.loss_scale.numpy()) == 2.0 ** 99
    assert int(run.optimizer.updates.numpy()) == 12 - halvings    # skipped
    for a, v in zip(before, run.optimizer.vars[:3]):
        np.testing.assert_array_equal(a, v.numpy())


@pytest.mark.parametrize('name', stages.ORDER)
def test_every_stage_takes_a_mixed_precision_step(name):
    """Each registered stage's loss accepts float16 embeddings and head outputs against float32 labels."""
    stage = stages.get(name)
    state, cfg, step = make_state(stage, mixed=1)
    for table in state.tables.values():     # E_3's u table, which E_2_2 fills
        table.assign(np.random.default_rng(0).uniform(20, 150, table.shape).astype(np.float32))
    batch = random_batch()
    if not stage.uses_semi:
        del batch['semi']
    loss, terms, _, ok, _ = step(batch)
    assert bool(ok.numpy()) and np.isfinite(float(loss)), name
    assert 'Conv2D' in float16_op_types(step, batch)
