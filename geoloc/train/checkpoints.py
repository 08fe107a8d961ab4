"""Checkpoints of a training run: tf.train.CheckpointManager plus the mining descriptors gathered so far
(so a resume is exact mid-epoch), atomic writes, cleanup after a failed save, and Ctrl-C handling."""
import os
import shutil
import signal
import zipfile

import numpy as np
import tensorflow as tf

from geoloc.train import mining
from geoloc import runlog
from geoloc.train import train_state
from geoloc.errors import TrainError

class CtrlC:
    """While training: the first SIGINT asks the loop to stop after the step in flight (it then saves a
    checkpoint); a second one stops at once (KeyboardInterrupt, nothing saved). Outside the main thread
    (no signal handler allowed there) Ctrl-C keeps Python's default."""

    def __enter__(self):
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:
            self.previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Checkpoints:
    """The run's checkpoints: tf.train.CheckpointManager (the last 2 kept) and, beside a checkpoint,
    `ckpt-<N>.mining.npz`: the MiningBuffer (mining.MiningBuffer.state) as gathered up to step N, so that a
    resume ranks with the same descriptors as an uninterrupted run. The released mining (--mining_fill 0)
    saves its run-long table beside every checkpoint (with the epoch whose round is pending, if the run
    stopped at an epoch end before it). With --mining_fill 1 the file holds the epoch's buffer, beside the
    checkpoints inside a mining epoch; at an epoch end it exists only when that epoch's round has not run.

    Each file is complete or absent: the .npz is written to a temporary file and renamed before the
    checkpoint is saved, and a failed save (a full disk) removes what it left (TensorFlow's ckpt-N_temp/
    included) before it is reported in one line. Cost at paper size (docs/design.md §2: ~52,600 training
    panoramas, 90,618 tiles, a 10,000-tile pool, 4096-d): the run-long table (52,600 + 90,618) x 4096 x 2 B
    (float16) = 1.17 GB, the per-epoch buffer 52,600 x 4096 x 2 B + 10,000 x 4096 x 4 B (float32) = 0.59 GB
    per file, at most 2 on disk (one per kept checkpoint); with --ckpt_every 500 and 3,757-step epochs 8 files
    per epoch, about 1.2 s (0.6 s) each at 1 GB/s. The same size is in memory during training anyway; a
    resume reads one file (twice its size in memory while it is copied into the buffer).
    """

    def __init__(self, checkpoint, directory):
        self.dir = directory
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
        self.clean()

    @staticmethod
    def mining_path(ckpt_path):
        return ckpt_path + '.mining.npz'

    def mining_pool_size(self, ckpt_path):
        """How many tiles the mining descriptors saved beside `ckpt_path` hold (0: none saved)."""
        path = self.mining_path(ckpt_path)
        if not os.path.exists(path):
            return 0
        with np.load(path) as f:
            return len(f['pool'])

    @property
    def latest(self):
        return self.manager.latest_checkpoint

    def save(self, step, buf=None):
        """Checkpoint `step` (and `buf`, the mining epoch's buffer so far); TrainError in one line if it fails."""
        path = os.path.join(self.dir, f'ckpt-{step}')
        before = set(os.listdir(self.dir)) if os.path.isdir(self.dir) else set()
        try:
            if buf is not None:
                os.makedirs(self.dir, exist_ok=True)
                _atomic_npz(self.mining_path(path), buf.state())
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            self.clean(failed=path, before=before)
            raise TrainError(f'{path}: cannot write the checkpoint of step {step} ({runlog.error_reason(e)}); '
                             f'removed what it left; last checkpoint: {self.latest or "none"} (run the same command '
                             'to resume once the disk has room)') from None
        self.clean()
        return self.latest

    def clean(self, failed=None, before=()):
        """Remove what an interrupted save leaves (TensorFlow's ckpt-N_temp/ folders, temporary files, mining
        files of checkpoints no longer kept), or after the failed save of `failed` only what that save added:
        the names absent from `before`, the directory's listing when it started, so that it never deletes a
        checkpoint file it did not write. (The run directory's lock keeps other writers out: run_lock.)"""
        if not os.path.isdir(self.dir):
            return
        kept = {os.path.basename(k) for k in self.manager.checkpoints}
        failed = os.path.basename(failed) if failed else None
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if failed:
                stale = name not in before and (name.startswith(failed + '.') or name.startswith(failed + '_temp')
                                                or '.tmp' in name)
            else:
                stale = name.endswith('_temp') or '.tmp' in name
                if name.endswith('.mining.npz'):
                    stale = name[:-len('.mining.npz')] not in kept
            if stale:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    def load_mining(self, ckpt_path, n_panos, n_tiles, pool, dim):
        """The MiningBuffer saved beside `ckpt_path`, or None if there is none; StateError if unusable."""
        path = self.mining_path(ckpt_path)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as f:
                saved = {k: f[k] for k in ('pool', 'grd', 'sat', 'grd_seen', 'sat_seen')}
                if 'pending' in f.files:   # (absent from the files of per-epoch buffers written before it existed)
                    saved['pending'] = f['pending']
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise train_state.StateError(f'{path}: unreadable mining descriptors ({type(e).__name__}: '
                                         f'{str(e).splitlines()[0][:120] if str(e) else ""}); delete it to resume '
                                         'with them recomputed (not bit-identical)') from None
        ok = (np.array_equal(saved['pool'], pool) and saved['grd'].shape == (n_panos, dim)
              and saved['sat'].shape == (len(pool), dim) and saved['grd_seen'].shape == (n_panos,)
              and saved['sat_seen'].shape == (len(pool),))
        if not ok:
            raise train_state.StateError(f'{path}: mining descriptors of another run (pool or shapes differ); delete '
                                         'it to resume with them recomputed (not bit-identical)')
        return mining.MiningBuffer.from_state(n_tiles, saved)


def _atomic_npz(path, arrays):
    """np.savez into path.tmp, then rename: the file is complete or absent."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
