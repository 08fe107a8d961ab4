"""One writer per run directory: `<run_dir>/run.lock`, held by a training run or a --test that writes there.

The file names its holder (pid, host, what it runs, since when) and the holder keeps an exclusive flock on
it for as long as it lives; the kernel drops the flock when the process dies, however it dies. A second
process finds the flock taken and is refused in one line naming the holder. A lock file whose flock is free
is stale when its holder ran on this host and its pid is gone, or now names another process (the record keeps
the holder's start time and boot, where /proc has them, so a reused pid is told apart): it is taken over, and
the caller logs it. One written by another host, or by a pid of this host that still runs the holder, is
refused (this host cannot tell whether that process still writes): the line says to delete the file once that
process has ended.
TensorFlow-free: importing this module changes nothing.
"""
import fcntl
import json
import os
import socket
import time
from geoloc.errors import LockError  # noqa: F401 (raised here, caught as <module>.<name>)

NAME = 'run.lock'


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _identity(pid):
    """'<boot id>:<start time in clock ticks>' of process pid, or None where /proc cannot say (another OS, a pid
    gone): with the pid it names one process for as long as the host runs."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            boot = f.read().strip()
        with open(f'/proc/{int(pid)}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return f'{boot}:{fields[19]}'          # field 22 of stat, counting from the pid (comm may hold spaces)
    except (OSError, IndexError, ValueError):
        return None


def _holder_runs(holder):
    """Whether the process a record of this host names still runs: its pid lives and, where both the record and
    /proc give a start identity, it is the same process."""
    pid = int(holder.get('pid', -1))
    if not _alive(pid):
        return False
    recorded, now = holder.get('started'), _identity(pid)
    return recorded is None or now is None or recorded == now


def describe(holder):
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('what', '?')}, since "
            f"{holder.get('since', '?')})")


class RunLock:
    """The lock of `run_dir`, taken by acquire(); `took_over`: the stale holder it replaced (a dict), or None."""

    def __init__(self, run_dir, what):
        self.run_dir, self.what = run_dir, what
        self.path = os.path.join(run_dir, NAME)
        self.fd = None
        self.took_over = None

    def acquire(self):
        """Take the lock (creating the run directory) or raise LockError naming its holder."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:   # held by a live process (its flock)
                holder = _read(fd)
                os.close(fd)
                raise LockError(f'{self.run_dir}: in use by {describe(holder)}: one process writes a run '
                                f'directory at a time; wait for it to end, or use another --run_dir') from None
            except OSError:   # a file system without flock: the record alone decides below
                pass
            try:   # the file may have been released and deleted between our open and our flock: start again
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = _read(fd)
            if holder and holder.get('pid') != os.getpid():
                mine = holder.get('host') == socket.gethostname()
                if not mine or _holder_runs(holder):
                    os.close(fd)
                    where = 'another host' if not mine else 'this host, and that pid runs'
                    raise LockError(f'{self.path}: left by {describe(holder)} ({where}); delete it once that '
                                    'process has ended')
                self.took_over = holder
            record = {'pid': os.getpid(), 'host': socket.gethostname(), 'what': self.what,
                      'since': time.strftime('%Y-%m-%d %H:%M:%S')}
            started = _identity(os.getpid())
            if started:
                record['started'] = started
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
            self.fd = fd
            return self
        raise LockError(f'{self.path}: kept changing while it was being taken; try again')

    def release(self):
        """Delete the lock file and drop the flock (a process that dies keeps the file: stale, taken over)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc):
        self.release()


def _read(fd):
    """The holder's record, {} if the file is empty or unreadable (a holder that died while writing it)."""
    try:
        data = os.pread(fd, 4096, 0).decode(errors='replace')
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
