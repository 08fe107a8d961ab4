"""--strategy multiworker: two worker processes on this machine train exactly like one process.

Both workers run train_first_E_1.py (phase a with a mining round, then phase b restoring phase a) with
the same --run_dir, as on a shared file system. What must hold:
  * the losses of every step equal a single-process run on the same global batches, including the
    epochs whose batches follow the mined table (so both workers mined the same table, from the whole
    global batch's descriptors, as one process does);
  * only the chief writes the run directory (one log, one event file, its checkpoints); the other
    worker reads phase a's final checkpoint from it, so phase b starts only once that is on disk.
"""
import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARGS = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4', '--epochs', '3',
        '--mining_start_epoch', '2', '--mining_pool', '16', '--mining_topk', '4', '--val_every', '0',
        '--log_every', '1', '--eval_batch', '8', '--epoch_batch', '0']
STEP = re.compile(r'\[(E_1a?)[^\]]*\] step (\d+)/\d+ epoch \d+ loss ([-\d.e+]+)')


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(('localhost', 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start(args, log_path, tf_config=None):
    """Each process writes to its own file, never to a pipe: a worker blocked on a full pipe that nobody reads
    yet would stall the collectives of the other one."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    env.pop('GEOLOC_LOGICAL_CPUS', None)
    if tf_config:
        env['TF_CONFIG'] = json.dumps(tf_config)
    with open(log_path, 'w') as out:
        proc = subprocess.Popen([sys.executable, 'train_first_E_1.py'] + args, cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def wait_all(procs, timeout):
    """Wait for every process; stop them all as soon as one fails (its peer would wait for it forever) or at
    the timeout. -> their outputs; fails with the tail of each one that did not end well."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outs = []
    for p in procs:
        with open(p.log_path) as f:
            outs.append(f.read())
    bad = [f'{p.log_path} (exit {p.returncode}):\n{out[-3000:]}' for p, out in zip(procs, outs) if p.returncode != 0]
    assert not bad, '\n\n'.join(bad)
    return outs


def losses(out):
    return [(m[1], int(m[2]), float(m[3])) for m in STEP.finditer(out)]


pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_vigor):
    tmp = tmp_path_factory.mktemp('multiworker')
    data = tiny_vigor(3)
    cluster = {'worker': [f'localhost:{p}' for p in free_ports(2)]}
    procs = [start(ARGS + ['--data_root', data, '--run_dir', str(tmp / 'multi'), '--strategy', 'multiworker'],
                   tmp / f'worker{i}.txt', {'cluster': cluster, 'task': {'type': 'worker', 'index': i}})
             for i in range(2)]
    procs.append(start(ARGS + ['--data_root', data, '--run_dir', str(tmp / 'single')], tmp / 'single.txt'))
    outs = wait_all(procs, 600)
    return tmp, outs


def test_two_workers_train_like_one_process(runs):
    tmp, (chief, worker, single) = runs
    assert 'strategy: multiworker, 2 replicas' in chief and '[E_1a worker 1]' in worker
    # one strategy per process: E_1's phase b reuses phase a's (a second one, made after TensorFlow ops exist,
    # warns so and could hang both workers at its first collective)
    assert chief.count('strategy: multiworker, 2 replicas') == 2
    assert all('Enabling collective ops after program startup' not in out for out in (chief, worker))
    one = losses(single)
    mined_steps = [s for s in one if s[0] == 'E_1a' and s[1] > len([t for t in one if t[0] == 'E_1a']) // 3]
    assert len(one) > 12 and mined_steps, single
    assert 'mining: epoch 1' in single and 'mining: epoch 1' in chief and 'mining: epoch 1' in worker
    for out in (chief, worker):
        got = losses(out)
        assert [s[:2] for s in got] == [s[:2] for s in one]
        np.testing.assert_allclose([s[2] for s in got], [s[2] for s in one], rtol=2e-3, atol=2e-4)


def test_only_the_chief_writes_the_run_directory(runs):
    tmp, (chief, worker, single) = runs
    for sub in ('phase_a', ''):
        run_dir = tmp / 'multi' / sub
        with open(run_dir / 'train.log') as f:
            log = f.read()
        assert 'worker 1' not in log and log.count('done:') == 1, log
        assert len(glob.glob(str(run_dir / 'tb' / 'events.*'))) == 1
        assert len(glob.glob(str(run_dir / 'ckpt' / '*.index'))) == 2  # max_to_keep
    # the non-chief worker restored phase b from the chief's final phase-a checkpoint
    final_a = re.search(r'checkpoint (\S+phase_a\S+ckpt-\d+)', chief)[1]
    assert f'from {final_a}' in worker, worker
    # and kept its own checkpoints in a temporary directory, removed at the end
    own = [os.path.dirname(os.path.dirname(p)) for p in re.findall(r'done: .* checkpoint (\S+)', worker)]
    assert len(own) == 2 and not any(str(tmp) in d or os.path.exists(d) for d in own), own
