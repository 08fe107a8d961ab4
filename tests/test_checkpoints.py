"""checkpoints.py: the mining descriptors beside a checkpoint, cleanup after failed saves, refusals."""
import os

import numpy as np
import pytest
import tensorflow as tf

from geoloc.train import checkpoints
from geoloc.train import mining
from geoloc.train import train_state


def _buffer(pool=(2, 5, 7)):
    buf = mining.MiningBuffer(n_panos=4, n_tiles=9, pool=np.array(pool), dim=3)
    buf.add(np.array([1]), np.array([[1.0, 2.0, 3.0]]), np.array([5]), np.array([[4.0, 5.0, 6.0]]))
    return buf


def test_save_round_trips_the_mining_buffer_and_keeps_two(tmp_path):
    v = tf.Variable(1.0)
    ck = checkpoints.Checkpoints(tf.train.Checkpoint(v=v), str(tmp_path))
    for step in (1, 2, 3):
        v.assign(float(step))
        path = ck.save(step, _buffer())
    assert path.endswith('ckpt-3') and ck.latest == path
    # ckpt-1 is no longer kept by the manager: its mining file went with it
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.mining.npz')) == ['ckpt-2.mining.npz',
                                                                                   'ckpt-3.mining.npz']
    back = ck.load_mining(path, n_panos=4, n_tiles=9, pool=np.array([2, 5, 7]), dim=3)
    assert back.grd_seen.tolist() == [False, True, False, False] and back.sat_seen.tolist() == [False, True, False]
    np.testing.assert_array_equal(back.grd[1], [1, 2, 3])
    np.testing.assert_array_equal(back.sat[1], [4, 5, 6])
    assert ck.load_mining(os.path.join(str(tmp_path), 'ckpt-9'), 4, 9, np.array([2, 5, 7]), 3) is None


def test_another_runs_mining_file_is_refused_in_one_line(tmp_path):
    ck = checkpoints.Checkpoints(tf.train.Checkpoint(v=tf.Variable(0.0)), str(tmp_path))
    path = ck.save(1, _buffer())
    with pytest.raises(train_state.StateError, match=r'ckpt-1\.mining\.npz: mining descriptors of another run'):
        ck.load_mining(path, 4, 9, np.array([2, 5, 8]), 3)
    with open(checkpoints.Checkpoints.mining_path(path), 'wb') as f:
        f.write(b'PK\x03\x04 not a zip')
    with pytest.raises(train_state.StateError, match='unreadable mining descriptors'):
        ck.load_mining(path, 4, 9, np.array([2, 5, 7]), 3)


def test_clean_removes_what_an_interrupted_save_left(tmp_path):
    ck = checkpoints.Checkpoints(tf.train.Checkpoint(v=tf.Variable(0.0)), str(tmp_path))
    kept = ck.save(4)
    (tmp_path / 'ckpt-5_temp').mkdir()
    (tmp_path / 'ckpt-5_temp' / 'part').write_bytes(b'x')
    (tmp_path / 'ckpt-5.mining.npz.tmp').write_bytes(b'x')
    (tmp_path / 'ckpt-3.mining.npz').write_bytes(b'x')          # of a checkpoint that is not kept
    ck.clean()
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if not (
        n.endswith('_temp') or '.tmp' in n or n == 'ckpt-3.mining.npz'))
    assert not (tmp_path / 'ckpt-5_temp').exists() and not (tmp_path / 'ckpt-3.mining.npz').exists()
    assert ck.latest == kept and os.path.exists(kept + '.index')


def test_a_failed_save_removes_only_what_it_wrote(tmp_path, monkeypatch):
    """The files of a ckpt-5 that this save did not write (another writer's) survive its failure; what the failed
    save wrote itself (the mining file, TensorFlow's ckpt-5_temp/, a temporary index) is removed."""
    ck = checkpoints.Checkpoints(tf.train.Checkpoint(v=tf.Variable(0.0)), str(tmp_path))
    kept = ck.save(4)
    theirs = ['ckpt-5.index', 'ckpt-5.data-00000-of-00001']
    for name in theirs:
        (tmp_path / name).write_bytes(b'another writer')

    def fail(**kwargs):
        (tmp_path / 'ckpt-5_temp').mkdir()
        (tmp_path / 'ckpt-5_temp' / 'part').write_bytes(b'x')
        (tmp_path / 'checkpoint.tmp123').write_bytes(b'x')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(ck.manager, 'save', fail)
    with pytest.raises(checkpoints.TrainError, match=r'ckpt-5: cannot write the checkpoint of step 5 \(No space'):
        ck.save(5, _buffer())
    assert sorted(os.listdir(tmp_path)) == sorted(['checkpoint', 'ckpt-4.index', 'ckpt-4.data-00000-of-00001'] + theirs)
    assert all((tmp_path / name).read_bytes() == b'another writer' for name in theirs)
    assert ck.latest == kept
