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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4']


def run_subprocess(args, timeout=240):
    env = dict(os.environ, GEOLOC_LOGICAL_CPUS='2', TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_mirrored_step_equals_single_device_step():
    out = run_subprocess([os.path.abspath(__file__), 'compare'])
    assert out.count('OK ') == 2, out


def test_mirrored_training_runs_end_to_end(tmp_path):
    """train_first_E_1.py (phase a, then phase b restoring it) for 2 steps each on 2 replicas."""
    sys.path.insert(0, ROOT)
    import synthetic_data
    data = synthetic_data.ensure_vigor(str(tmp_path / 'vigor'), grid=4, tile_px=64, pano_hw=(32, 64))
    run_dir = tmp_path / 'run'
    out = run_subprocess(['train_first_E_1.py', *TINY, '--data_root', data, '--run_dir', str(run_dir),
                          '--max_steps', '2', '--strategy', 'mirrored', '--log_every', '1'])
    assert out.count('strategy: mirrored, 2 replicas') == 2, out
    for sub in ('phase_a', ''):
        assert os.path.exists(run_dir / sub / 'ckpt' / 'checkpoint'), out
    assert 'step 2/2' in out


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


def compare(tmp):
    import train_first_E_1
    import train_second_E_2_2
    batch = random_batch(np.random.default_rng(0), 4)
    for stage in (train_first_E_1.PHASE_B, train_second_E_2_2.STAGE):
        single = one_step(stage, 'default', batch, os.path.join(tmp, stage.name, 'single'))
        mirrored = one_step(stage, 'mirrored', batch, os.path.join(tmp, stage.name, 'mirrored'))
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
    if sys.argv[1:] != ['compare']:
        sys.exit(f'usage: {sys.argv[0]} compare')
    with tempfile.TemporaryDirectory() as d:
        compare(d)
