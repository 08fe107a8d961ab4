"""run_lock.py: one writer per run directory; a live holder is named and refused, a dead one of this host is
taken over, one of another host is left for a person to judge."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from geoloc.train import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold(run_dir):
    """A separate process that takes the lock of run_dir and sleeps; -> the process, once it holds it."""
    code = (f'import sys, time; sys.path.insert(0, {REPO!r}); from geoloc.train import run_lock; '
            f'run_lock.RunLock({run_dir!r}, "training E_x").acquire(); print("held", flush=True); time.sleep(60)')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path):
    run_dir = str(tmp_path / 'run')
    proc = hold(run_dir)
    try:
        with pytest.raises(run_lock.LockError) as e:
            run_lock.RunLock(run_dir, 'training E_x').acquire()
        msg = str(e.value)
        assert msg.startswith(f'{run_dir}: in use by pid {proc.pid} on {socket.gethostname()} (training E_x, since ')
        assert msg.endswith('one process writes a run directory at a time; wait for it to end, or use another '
                            '--run_dir') and '\n' not in msg
    finally:
        proc.kill()
        proc.wait()
    # killed: its file stays behind, its flock is gone with it, its pid too
    path = os.path.join(run_dir, run_lock.NAME)
    assert json.load(open(path))['pid'] == proc.pid
    lock = run_lock.RunLock(run_dir, 'training E_x').acquire()
    assert lock.took_over['pid'] == proc.pid and json.load(open(path))['pid'] == os.getpid()
    # a second lock of the same directory, even in this process, is refused
    with pytest.raises(run_lock.LockError, match=f'in use by pid {os.getpid()} '):
        run_lock.RunLock(run_dir, 'E_x --test').acquire()
    lock.release()
    assert not os.path.exists(path)
    with run_lock.RunLock(run_dir, 'E_x --test') as again:
        assert again.took_over is None and os.path.exists(path)
    assert not os.path.exists(path)


@pytest.mark.parametrize('host,pid', [('elsewhere', 1), (socket.gethostname(), 'parent')], ids=['another host',
                                                                                                   'a live pid'])
def test_a_lock_file_without_flock_whose_holder_may_live_is_left_alone(tmp_path, host, pid):
    """Another host's process, or a live pid of this host (a file system without flock): not taken over."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    pid = os.getppid() if pid == 'parent' else pid
    record = {'pid': pid, 'host': host, 'what': 'training E_x', 'since': time.strftime('%Y-%m-%d %H:%M:%S')}
    (run_dir / run_lock.NAME).write_text(json.dumps(record))
    with pytest.raises(run_lock.LockError) as e:
        run_lock.RunLock(str(run_dir), 'training E_x').acquire()
    assert str(e.value).startswith(f'{run_dir / run_lock.NAME}: left by pid {pid} on {host} (training E_x, since ')
    assert str(e.value).endswith('; delete it once that process has ended')
    assert json.loads((run_dir / run_lock.NAME).read_text()) == record


def test_an_empty_lock_file_is_stale(tmp_path):
    """A holder that died between creating the file and writing its record."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / run_lock.NAME).write_text('')
    with run_lock.RunLock(str(run_dir), 'training E_x') as lock:
        assert lock.took_over is None
        assert json.loads((run_dir / run_lock.NAME).read_text())['what'] == 'training E_x'


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    """A record whose pid now names another process (its start identity differs) is stale and taken over; one
    whose pid still runs the recorded process (a file system without flock) is refused."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    parent = os.getppid()
    started = run_lock._identity(parent)
    if started is None:
        pytest.skip('no /proc start times on this system')
    for identity, taken in ((started.split(':')[0] + ':1', True), (started, False)):
        record = {'pid': parent, 'host': socket.gethostname(), 'what': 'training E_x', 'since': '2026-01-01 00:00:00',
                  'started': identity}
        (run_dir / run_lock.NAME).write_text(json.dumps(record))
        if taken:
            with run_lock.RunLock(str(run_dir), 'training E_y') as lock:
                assert lock.took_over == record
                assert json.loads((run_dir / run_lock.NAME).read_text())['started'] == run_lock._identity(os.getpid())
        else:
            with pytest.raises(run_lock.LockError, match='this host, and that pid runs'):
                run_lock.RunLock(str(run_dir), 'training E_y').acquire()
