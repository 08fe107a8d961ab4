"""tf.distribute: a step on 2 replicas equals the step on one device for the same global batch.

The CPU is split into 2 logical devices (GEOLOC_LOGICAL_CPUS=2, read by distribute.make_strategy before
TensorFlow starts), so the checks run in subprocesses and leave the devices of other tests alone.

What must hold (docs/design.md §4: the triplet loss sees every in-batch negative): replica r gets rows r·b ..
(r+1)·b - 1 of the global batch of B = 2b, its triplet term gathers the other replica's descriptors,
every term a loss returns is a mean over its replica's examples, and loop.make_step divides each by the
number of replicas and SUMs terms and gradients across them. So the loss, every term and report, and
the gradient Adam receives equal the single-device ones up to float32 summation order, for every
stage's loss. Adam's first moment after one step is m = (1 - beta1) g, which reads the gradient back out
of the optimiser without touching the step.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)   # (also when this file runs as the subprocess below)

import stages  # noqa: E402  (TensorFlow-free)
from conftest import TINY  # noqa: E402


def start(args):
    """A subprocess with 2 logical CPU devices; -> Popen (stdout and stderr merged)."""
    env = dict(os.environ, GEOLOC_LOGICAL_CPUS='2', TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-5000:]
    return out


STAGES = stages.ORDER


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_vigor):
    """The subprocesses start together (each is mostly single-threaded tracing; 2 cores share them)."""
    tmp = tmp_path_factory.mktemp('distribute')
    data = tiny_vigor(4)
    procs = {'losses': start([os.path.abspath(__file__), *STAGES])}
    procs['train'] = start(['train_first_E_1.py', *TINY, '--data_root', data, '--run_dir', str(tmp / 'run'),
                            '--max_steps', '2', '--strategy', 'mirrored'])
    yield tmp, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_every_stage_loss_on_two_replicas_equals_one_device(runs):
    """Every stage's loss terms, reports, descriptors and gradients: 2 replicas against 1 device."""
    out = finish(runs[1]['losses'], timeout=600)
    for stage in STAGES:
        assert f'OK {stage}:' in out, out


@pytest.mark.slow
def test_mirrored_training_runs_end_to_end(runs):
    """train_first_E_1.py (phase a, then phase b restoring it) for 2 steps each on 2 replicas."""
    out = finish(runs[1]['train'])
    assert out.count('strategy: mirrored, 2 replicas') == 2, out
    assert out.count('step 2/2') == 2, out
    for sub in ('phase_a', ''):
        assert os.path.exists(runs[0] / 'run' / sub / 'ckpt' / 'checkpoint'), out


# ----------------------------------------------------------------------------- the subprocess

def random_batch(rng, n):
    """A global batch of n items with the training pipeline's keys (images: BGR minus mean)."""
    return {
        'grd': rng.normal(0, 60, (n, 32, 64, 3)).astype(np.float32),
        'sat': rng.normal(0, 60, (n, 64, 64, 3)).astype(np.float32),
        'semi': rng.normal(0, 60, (n, 64, 64, 3)).astype(np.float32),
        'delta': rng.uniform(-150, 150, (n, 2)).astype(np.float32),
        'delta_semi': rng.uniform(-150, 150, (n, 2)).astype(np.float32) + np.float32(320),
        'pano': np.arange(n, dtype=np.int64), 'semi_k': rng.integers(1, 4, n).astype(np.int64),
        'sat_idx': np.arange(n, dtype=np.int64),
    }


def one_step(stage, strategy_name, batch):
    """The stage's train state under a strategy, one step on the global batch as loop.train feeds it
    -> (loss, {term}, {report}, grd descriptors in global row order, [gradient per trained variable], replicas)."""
    import tensorflow as tf
    import config
    from geoloc.train import distribute
    from geoloc.train import loop
    from geoloc.train import train_state
    explicit = dict(config.parse_flags(TINY)[0], strategy=strategy_name)
    cfg = config.resolve(stage.name, explicit, 'paper', stage.defaults, stage.presets, own=stage.settings)
    strategy = distribute.make_strategy(strategy_name)
    with strategy.scope():
        state = train_state.TrainState(stage, cfg, 8, 2)
    for table in state.tables.values():   # E_3's u table: values around b = 75 px, so W_m varies
        table.assign(np.random.default_rng(1).uniform(20, 110, table.shape).astype(np.float32))
    step = loop.make_step(state, stage, cfg, strategy)
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(len(batch['grd']), drop_remainder=True)
    loss, terms, reports, ok, desc = step(next(iter(strategy.experimental_distribute_dataset(ds))))
    assert bool(ok.numpy())
    grads = [m.numpy() / (1 - state.optimizer.beta1) for m in state.optimizer.m]
    return (float(loss), {k: float(v) for k, v in terms.items()}, {k: float(v) for k, v in reports.items()},
            desc['grd'].numpy(), grads, strategy.num_replicas_in_sync)


def compare(stage_name):
    stage = stages.get(stage_name)
    batch = random_batch(np.random.default_rng(0), 4)
    single = one_step(stage, 'default', batch)
    mirrored = one_step(stage, 'mirrored', batch)
    assert (single[5], mirrored[5]) == (1, 2), (single[5], mirrored[5])
    np.testing.assert_allclose(mirrored[0], single[0], rtol=1e-4)
    assert set(single[1]) == set(mirrored[1]) and set(single[2]) == set(mirrored[2])
    for k in single[1]:
        np.testing.assert_allclose(mirrored[1][k], single[1][k], rtol=1e-4, atol=1e-7, err_msg=k)
    for k in single[2]:
        np.testing.assert_allclose(mirrored[2][k], single[2][k], rtol=1e-4, atol=1e-7, err_msg=k)
    # replica r's rows are r*b .. (r+1)*b - 1 of the global batch
    np.testing.assert_allclose(mirrored[3], single[3], rtol=1e-4, atol=1e-6)
    assert len(single[4]) == len(mirrored[4])
    nonzero = 0
    for i, (g1, g2) in enumerate(zip(single[4], mirrored[4])):
        scale = np.abs(g1).max()
        nonzero += scale > 0
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-5 * scale, err_msg=f'{stage_name} variable {i}')
    assert nonzero >= 0.9 * len(single[4]), f'{stage_name}: only {nonzero} non-zero gradients'
    print(f'OK {stage_name}: loss {single[0]:.6f} on 1 device and {mirrored[0]:.6f} on 2 replicas, terms '
          f'{sorted(single[1])}, {len(single[4])} gradients equal ({nonzero} non-zero)', flush=True)


if __name__ == '__main__':
    if not sys.argv[1:] or set(sys.argv[1:]) - set(STAGES):
        sys.exit(f'usage: {sys.argv[0]} STAGE... (of {STAGES})')
    for name in sys.argv[1:]:
        compare(name)
