"""Training survives SIGKILL: started again with the same command, it continues from its last checkpoint.

A real `train_first_E_1.py` process is killed three times (just after its first checkpoint appears,
during a resumed start-up, inside phase b's mined epoch) and restarted each time with the same command;
it must end at the step count of an uninterrupted run of that command, with a checkpoint that restores.
A step that two processes both ran (after the checkpoint they share) must give bit-identical losses:
model, optimiser, step and the mining table behind that epoch's batches all came back from the checkpoint.
"""
import glob
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

import model
import train_first_E_1
import train_lib
import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 36 training panoramas / batch 4 = 9 steps per epoch; 2 epochs = 18 steps in each phase, the second
# one half mined from the table of the first. Checkpoints at steps 4, 8, 9, 12, 16, 18: a kill a step or
# two after one leaves steps that the next process runs again.
FLAGS = ['--preset', 'demo', '--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4',
         '--epochs', '2', '--ckpt_every', '4', '--log_every', '1', '--val_every', '0']
TOTAL = 18


@pytest.fixture(scope='module')
def data(tiny_vigor):
    return tiny_vigor(3)


def command(data, run_dir):
    return [sys.executable, 'train_first_E_1.py'] + FLAGS + ['--data_root', data, '--run_dir', run_dir]


def run(cmd, kill_when=None, limit_s=150):
    """Run `cmd`; SIGKILL it as soon as kill_when(line) holds for a line it prints.
    -> (exit status, printed lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(limit_s, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip('\n'))
            if kill_when is not None and kill_when(line):
                proc.kill()  # SIGKILL: no handler, no flush, no cleanup
                break
        proc.stdout.close()
        return proc.wait(), lines
    finally:
        watchdog.cancel()


def losses(run_dir):
    """step -> every total loss logged for it, in the order the processes wrote them."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, 'tb', 'events*'))):  # file names start with a timestamp
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == 'loss/total':
                    out.setdefault(event.step, []).append(float(tf.make_ndarray(v.tensor)))
    return out


def final_state(run_dir, stage, cfg):
    """The latest checkpoint's step and mining table, after checking it restores the stage's model."""
    path = train_state.latest_checkpoint(run_dir)
    m = model.CrossViewModel(cfg.grd_size, cfg.sat_size, cfg.width, stage.parts)
    tf.train.Checkpoint(model=m).read(path).expect_partial().assert_existing_objects_matched()
    reader = tf.train.load_checkpoint(path)
    return (int(reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')),
            bool(reader.get_tensor('hard_valid/.ATTRIBUTES/VARIABLE_VALUE')),
            reader.get_tensor('hard/.ATTRIBUTES/VARIABLE_VALUE'))


@pytest.mark.slow
def test_sigkill_and_restart_ends_like_an_uninterrupted_run(data, tmp_path):
    ref_dir, run_dir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'killed')
    ref = {}
    # the reference runs beside the killed chain: they share nothing but the read-only dataset
    ref_thread = threading.Thread(target=lambda: ref.update(out=run(command(data, ref_dir))))
    ref_thread.start()

    cmd = command(data, run_dir)
    first_ckpt = os.path.join(run_dir, 'phase_a', 'ckpt', 'checkpoint')
    kills = [
        lambda line: os.path.exists(first_ckpt),                          # just after the first checkpoint (4)
        lambda line: line.startswith('[E_1a] init: resumed'),             # during a resumed start-up
        lambda line: line.startswith(f'[E_1] step 13/{TOTAL} '),          # phase b, mined epoch 2: from ckpt-12
    ]
    for i, kill_when in enumerate(kills):
        code, lines = run(cmd, kill_when)
        assert code == -9, f'restart {i} was not killed (exit {code}):\n' + '\n'.join(lines[-5:])
    code, lines = run(cmd)
    assert code == 0, '\n'.join(lines[-5:])
    ref_thread.join()
    ref_code, ref_lines = ref['out']
    assert ref_code == 0, '\n'.join(ref_lines[-5:])

    log_a = open(os.path.join(run_dir, 'phase_a', 'train.log')).read()
    log_b = open(os.path.join(run_dir, 'train.log')).read()
    # every restart resumed phase a (the one killed on that line may not have written it); the last found it done
    assert log_a.count('init: resumed this run from') >= 2 and f'already trained ({TOTAL} steps)' in log_a
    assert len(re.findall(r'init: resumed this run from .*ckpt-\d+ \(step \d+\)', log_b)) == 1
    assert f'done: {TOTAL} steps' in lines[-1]

    cfg = train_lib.configs([train_first_E_1.PHASE_B], FLAGS)[0]
    rerun = 0
    for sub, stage in (('phase_a', train_first_E_1.PHASE_A), ('', train_first_E_1.PHASE_B)):
        killed, uninterrupted = os.path.join(run_dir, sub), os.path.join(ref_dir, sub)
        step, valid, hard = final_state(killed, stage, cfg)
        ref_step, ref_valid, ref_hard = final_state(uninterrupted, stage, cfg)
        assert step == ref_step == TOTAL
        assert valid and ref_valid and hard.shape == ref_hard.shape == (36, 100)
        logged = losses(killed)
        assert sorted(logged) == list(range(1, TOTAL + 1))
        for s, values in logged.items():   # steps run twice (by a killed and a resumed process) agree
            assert len(set(values)) == 1, f'{sub or "phase_b"} step {s}: {values}'
            rerun += len(values) > 1
    assert rerun >= 1                                  # the kills did cost re-run steps, and they were compared
    # epoch 1 of phase a comes before any mining, so it matches the uninterrupted run bit for bit
    logged, ref_logged = losses(os.path.join(run_dir, 'phase_a')), losses(os.path.join(ref_dir, 'phase_a'))
    assert [logged[s][0] for s in range(1, 10)] == [ref_logged[s][0] for s in range(1, 10)]
    assert np.all((hard >= 0) & (hard < 36))
