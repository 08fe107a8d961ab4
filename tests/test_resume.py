"""Training survives SIGKILL and Ctrl-C, and a finished run can be extended: the end is the same as an
uninterrupted run's, bit for bit, mining included.

Fast (in-process): one chain of runs of E_1 phase a -- stopped by --max_steps inside epoch 1, extended to the
epoch's end, extended to 2 epochs -- ends with the weights, Adam slots and mining table of one uninterrupted
2-epoch run, with either mining (--mining_fill 0 and 1); without the mining descriptors saved beside the
mid-epoch checkpoint it would not. E_1 phase b, which starts from phase a's descriptor table, stopped and
resumed the same way, ends like phase b run without a stop.

Slow (subprocesses): a real `train_first_E_1.py` process is killed three times (just after its first
checkpoint appears, during a resumed start-up, inside phase b's mined epoch), stopped once by SIGINT, and
restarted each time with the same command; it must end at the step count of an uninterrupted run of that
command, with the same weights and --test metrics. A step that two processes both ran (after the checkpoint
they share) must give bit-identical losses: model, optimiser, step and the mining table behind that epoch's
batches all came back from the checkpoint.

Bit for bit, not to a tolerance: on one machine every op here is deterministic (CPU kernels, no atomics),
the batches are a function of (seed, epoch, mining table), and a resumed process restores every value
the next step reads (weights, Adam's slots and counts, step, mining table and the epoch's gathered
mining descriptors), so any difference is a resume bug.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, tensorboard_events

import model
import train_first_E_1
from geoloc import cli
from geoloc.train import train_state

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


# ----------------------------------------------------------------------------- in-process: extend, Ctrl-C, resume

# 9 steps per epoch; a mining round after epoch 1 (pool 20, top 5), epoch 2 half mined; lr 1e-3 so that the
# weights move enough between steps for stale mining descriptors to change the mining table.
CHAIN = TINY + ['--mining', '1', '--mining_start_epoch', '2', '--ckpt_every', '100', '--lr', '1e-3']


def state_of(run_dir):
    """name -> value of every variable in the run's latest checkpoint (weights, Adam, step, mining table)."""
    path = train_state.latest_checkpoint(run_dir)
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if not name.startswith('_CHECKPOINTABLE_OBJECT_GRAPH') and 'save_counter' not in name}


def differing(a, b):
    assert a.keys() == b.keys()
    return sorted(k for k in a if not np.array_equal(a[k], b[k]))


@pytest.mark.slow
@pytest.mark.parametrize('fill', ['0', '1'], ids=['released_table', 'mining_fill'])
def test_stopped_and_extended_runs_end_like_an_uninterrupted_one(data, tmp_path, capsys, fill):
    """Stopped inside epoch 1 (--max_steps 5), extended to its end (--epochs 1), extended to 2 epochs: the
    weights, Adam and mining table of one uninterrupted 2-epoch run, with either mining (--mining_fill 0: the
    run-long table of the batches' descriptors, its round pending at the stop; 1: the epoch's buffer). The
    control: without the descriptors of steps 1-5 saved beside ckpt-5 (recomputed with other weights), the table
    differs. (Ctrl-C is such a stop too: tests/test_bad_input.py checks its checkpoint, the slow test below its
    resume.)"""
    phase_a = [train_first_E_1.PHASE_A]
    chain = CHAIN + ['--mining_fill', fill]
    ref_dir, run_dir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'chain')
    assert cli.main(phase_a, chain + ['--data_root', data, '--run_dir', ref_dir, '--epochs', '2']) == 0
    reference = state_of(os.path.join(ref_dir, 'phase_a'))
    assert int(reference['step/.ATTRIBUTES/VARIABLE_VALUE']) == 18

    argv = chain + ['--data_root', data, '--run_dir', run_dir]
    ckpt_dir = os.path.join(run_dir, 'phase_a', 'ckpt')
    assert cli.main(phase_a, argv + ['--epochs', '1', '--max_steps', '5']) == 0    # stops inside epoch 1
    assert os.path.exists(os.path.join(ckpt_dir, 'ckpt-5.mining.npz'))        # the descriptors gathered so far
    copy = str(tmp_path / 'chain_without_descriptors')
    shutil.copytree(run_dir, copy)
    os.remove(os.path.join(copy, 'phase_a', 'ckpt', 'ckpt-5.mining.npz'))
    assert cli.main(phase_a, argv + ['--epochs', '1']) == 0              # extended to the epoch's end
    assert os.path.exists(os.path.join(ckpt_dir, 'ckpt-9.mining.npz'))        # the round it did not run
    capsys.readouterr()
    assert cli.main(phase_a, argv + ['--epochs', '2']) == 0              # extended: the round, then epoch 2
    out = capsys.readouterr().out
    assert 'extending the run: --epochs 1 -> 2 (9 steps done, 18 now)' in out and 'mining: epoch 1:' in out
    assert json.load(open(os.path.join(run_dir, 'phase_a', 'config.json')))['epochs'] == 2
    assert differing(state_of(os.path.join(run_dir, 'phase_a')), reference) == []
    # and so are the descriptors epoch 2 gathered for a round after it (an extension to 3 epochs would run it)
    with np.load(os.path.join(ckpt_dir, 'ckpt-18.mining.npz')) as got, \
            np.load(os.path.join(ref_dir, 'phase_a', 'ckpt', 'ckpt-18.mining.npz')) as want:
        assert sorted(got.files) == sorted(want.files) and all(np.array_equal(got[k], want[k]) for k in got.files)

    assert cli.main(phase_a, chain + ['--data_root', data, '--run_dir', copy, '--epochs', '2']) == 0
    assert 'not bit-identical' in capsys.readouterr().out
    assert 'hard/.ATTRIBUTES/VARIABLE_VALUE' in differing(state_of(os.path.join(copy, 'phase_a')), reference)


@pytest.mark.slow
def test_phase_b_carries_phase_as_table_and_resumes_like_an_uninterrupted_run(data, tmp_path, capsys):
    """E_1 phase b starts from phase a's descriptor table (the released sat_global_train) and its pending round;
    stopped inside its epoch 1 (--max_steps 5) and resumed to the end of its 2 epochs, it ends with the weights,
    Adam, mining table and descriptor table of phase b run without a stop."""
    a_dir = str(tmp_path / 'a')
    assert cli.main([train_first_E_1.PHASE_A], CHAIN + ['--data_root', data, '--run_dir', a_dir,
                                                              '--epochs', '2']) == 0
    ref_dir, run_dir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'stopped')
    for d in (ref_dir, run_dir):
        shutil.copytree(os.path.join(a_dir, 'phase_a'), os.path.join(d, 'phase_a'))
    phase_b = [train_first_E_1.PHASE_B]
    argv = lambda d: CHAIN + ['--data_root', data, '--run_dir', d, '--epochs', '2']
    capsys.readouterr()
    assert cli.main(phase_b, argv(ref_dir)) == 0
    assert 'mining: carried over the descriptor table of' in capsys.readouterr().out
    assert cli.main(phase_b, argv(run_dir) + ['--max_steps', '5']) == 0
    assert cli.main(phase_b, argv(run_dir)) == 0
    out = capsys.readouterr().out
    assert 'init: resumed this run from' in out and 'not bit-identical' not in out
    assert differing(state_of(run_dir), state_of(ref_dir)) == []
    with np.load(os.path.join(run_dir, 'ckpt', 'ckpt-18.mining.npz')) as got, \
            np.load(os.path.join(ref_dir, 'ckpt', 'ckpt-18.mining.npz')) as want:
        assert sorted(got.files) == sorted(want.files) and all(np.array_equal(got[k], want[k]) for k in got.files)


# ----------------------------------------------------------------------------- subprocesses: SIGKILL and SIGINT

def command(data, run_dir):
    return [sys.executable, 'train_first_E_1.py'] + FLAGS + ['--data_root', data, '--run_dir', run_dir]


def run(cmd, kill_when=None, sig=signal.SIGKILL, limit_s=150):
    """Run `cmd`; send it `sig` as soon as kill_when(line) holds for a line it prints (SIGKILL: no handler,
    no flush, no cleanup; SIGINT: Ctrl-C, and its last lines are read too). -> (exit status, printed lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(limit_s, proc.kill)
    watchdog.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line.rstrip('\n'))
            if kill_when is not None and not sent and kill_when(line):
                proc.send_signal(sig)
                sent = True
                if sig == signal.SIGKILL:
                    break
        proc.stdout.close()
        return proc.wait(), lines
    finally:
        watchdog.cancel()


def losses(run_dir):
    """step -> every total loss logged for it, in the order the processes wrote them."""
    out = {}
    for step, tag, value in tensorboard_events(run_dir):
        if tag == 'loss/total':
            out.setdefault(step, []).append(float(value))
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
        lambda line: os.path.exists(first_ckpt),                          # just after the first checkpoint (4),
                                                                          # inside the epoch that mining ranks after
        lambda line: line.startswith('[E_1a] init: resumed'),             # during a resumed start-up
        lambda line: line.startswith(f'[E_1] step 13/{TOTAL} '),          # phase b, mined epoch 2: from ckpt-12
    ]
    for i, kill_when in enumerate(kills):
        code, lines = run(cmd, kill_when)
        assert code == -9, f'restart {i} was not killed (exit {code}):\n' + '\n'.join(lines[-5:])
    # Ctrl-C in phase b's epoch 2: one line, and a checkpoint of the step it stopped after (15, or 16 if that
    # step was already running when the signal came through the pipe)
    code, lines = run(cmd, lambda line: line.startswith(f'[E_1] step 15/{TOTAL} '), sig=signal.SIGINT)
    stopped = re.fullmatch(rf'interrupted at step (1[56]) of {TOTAL}: checkpoint (.*) saved; run the same command '
                           'to resume', lines[-1])
    assert code == 130 and stopped, '\n'.join(lines[-5:])
    assert stopped[2] == os.path.join(run_dir, 'ckpt', f'ckpt-{stopped[1]}')
    code, lines = run(cmd)
    assert code == 0, '\n'.join(lines[-5:])
    ref_thread.join()
    ref_code, ref_lines = ref['out']
    assert ref_code == 0, '\n'.join(ref_lines[-5:])

    log_a = open(os.path.join(run_dir, 'phase_a', 'train.log')).read()
    log_b = open(os.path.join(run_dir, 'train.log')).read()
    # every restart resumed phase a (the one killed on that line may not have written it); the last found it done
    assert log_a.count('init: resumed this run from') >= 2 and f'already trained ({TOTAL} steps)' in log_a
    assert re.findall(r'init: resumed this run from .*(ckpt-\d+) \(step \d+\)', log_b) == ['ckpt-12',
                                                                                          f'ckpt-{stopped[1]}']
    assert f'done: {TOTAL} steps' in lines[-1]

    cfg = cli.configs([train_first_E_1.PHASE_B], FLAGS)[0]
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
    assert np.all((hard >= 0) & (hard < 4 * 25))        # tile indices: 4 cities x (3 + 2)^2 tiles (the ring included)
    # the end is the uninterrupted run's, bit for bit: every loss, the final weights, Adam, the mining table
    for sub in ('phase_a', ''):
        logged, ref_logged = losses(os.path.join(run_dir, sub)), losses(os.path.join(ref_dir, sub))
        assert [logged[s][0] for s in range(1, TOTAL + 1)] == [ref_logged[s][0] for s in range(1, TOTAL + 1)], sub
        assert differing(state_of(os.path.join(run_dir, sub)), state_of(os.path.join(ref_dir, sub))) == [], sub
    # and so are the --test metrics
    results = []
    for d in (run_dir, ref_dir):
        assert cli.main(train_first_E_1.STAGES, FLAGS + ['--data_root', data, '--run_dir', d, '--test']) == 0
        r = json.load(open(os.path.join(d, 'test', 'original_same_north_qall', 'test_results.json')))
        results.append({k: v for k, v in r.items() if k != 'checkpoint'})
    assert results[0] == results[1]
