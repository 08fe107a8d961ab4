"""tf.distribute: a step on 2 replicas equals the step on one device for the same global batch.

The CPU is split into 2 logical devices (GEOLOC_LOGICAL_CPUS=2, read by train_lib.make_strategy before
TensorFlow starts), so the checks run in subprocesses and leave the devices of other tests alone.

What must hold (SPEC §4: the triplet loss sees every in-batch negative): replica r gets rows r·b ..
(r+1)·b - 1 of the global batch of B = 2b, its triplet term gathers the other replica's descriptors,
per-replica batch means count 1/2 each, and make_step SUMs losses and gradients across replicas. So
the summed loss and the gradient Adam receives equal the single-device ones up to float32 summation
order. Adam's first moment after one step is m = (1 - beta1) g, which reads the gradient back out
of the optimiser without touching the step.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4']


def start(args):
    """A subprocess with 2 logical CPU devices; -> Popen (stdout and stderr merged)."""
    env = dict(os.environ, GEOLOC_LOGICAL_CPUS='2', TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """All three subprocesses start together (each is mostly single-threaded tracing; 2 cores share them)."""
    import synthetic_data
    tmp = tmp_path_factory.mktemp('distribute')
    data = synthetic_data.ensure_vigor(str(tmp / 'vigor'), grid=4, tile_px=64, pano_hw=(32, 64))
    procs = {stage: start([os.path.abspath(__file__), stage]) for stage in ('E_1', 'E_2_2')}
    procs['train'] = start(['train_first_E_1.py', *TINY, '--data_root', data, '--run_dir', str(tmp / 'run'),
                            '--max_steps', '2', '--strategy', 'mirrored', '--log_every', '1'])
    yield tmp, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize('stage', ['E_1', 'E_2_2'])
def test_mirrored_step_equals_single_device_step(runs, stage):
    """E_1 phase b (triplet + IoU ratio + offset) and E_2_2 (triplet + Gaussian NLL of both branches)."""
    out = finish(runs[1][stage])
    assert f'OK {stage}:' in out, out


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
        'pano': np.arange(n, dtype=np.int64), 'semi_k': np.ones(n, np.int64),
        'sat_idx': np.arange(n, dtype=np.int64), 'semi_idx': np.arange(n, dtype=np.int64) + n,
    }


def one_step(stage, strategy, batch, run_dir):
    """Build the stage's Run under `strategy`, take one step on the global batch as Run.train feeds it
    -> (loss, {scalar}, grd descriptors in global row order, [gradient per trained variable])."""
    import tensorflow as tf
    import train_lib
    cfg = train_lib.parse_config([stage], TINY + ['--run_dir', run_dir, '--strategy', strategy])[0]
    run = train_lib.Run(stage, cfg)
    run.build(range(8))
    step = run.make_step({})
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(len(batch['grd']), drop_remainder=True)
    loss, scalars, ok, desc = step(next(iter(run.strategy.experimental_distribute_dataset(ds))))
    assert bool(ok.numpy())
    grads = [m.numpy() / (1 - run.opt.beta1) for m in run.opt.m]
    return float(loss), {k: float(v) for k, v in scalars.items()}, desc['grd'].numpy(), grads, \
        run.strategy.num_replicas_in_sync


def compare(stage_name, tmp):
    import train_first_E_1
    import train_second_E_2_2
    stage = {'E_1': train_first_E_1.PHASE_B, 'E_2_2': train_second_E_2_2.STAGE}[stage_name]
    batch = random_batch(np.random.default_rng(0), 4)
    single = one_step(stage, 'default', batch, os.path.join(tmp, 'single'))
    mirrored = one_step(stage, 'mirrored', batch, os.path.join(tmp, 'mirrored'))
    assert (single[4], mirrored[4]) == (1, 2), (single[4], mirrored[4])
    np.testing.assert_allclose(mirrored[0], single[0], rtol=1e-4)
    for k in single[1]:
        np.testing.assert_allclose(mirrored[1][k], single[1][k], rtol=1e-4, atol=1e-7, err_msg=k)
    # replica r's rows are r*b .. (r+1)*b - 1 of the global batch
    np.testing.assert_allclose(mirrored[2], single[2], rtol=1e-4, atol=1e-6)
    assert len(single[3]) == len(mirrored[3])
    nonzero = 0
    for i, (g1, g2) in enumerate(zip(single[3], mirrored[3])):
        # (exact zeros are expected where a zero-initialised layer blocks the gradient: E_1's offset fc1)
        scale = np.abs(g1).max()
        nonzero += scale > 0
        np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-5 * scale, err_msg=f'{stage.name} variable {i}')
    assert nonzero >= len(single[3]) - 2, f'{stage.name}: only {nonzero} non-zero gradients'
    print(f'OK {stage.name}: loss {single[0]:.6f} on 1 device and {mirrored[0]:.6f} on 2 replicas, '
          f'{len(single[3])} gradients equal ({nonzero} non-zero)', flush=True)


if __name__ == '__main__':
    import tempfile
    sys.path.insert(0, ROOT)
    if sys.argv[1:] not in (['E_1'], ['E_2_2']):
        sys.exit(f'usage: {sys.argv[0]} E_1|E_2_2')
    with tempfile.TemporaryDirectory() as d:
        compare(sys.argv[1], d)
