"""A checkpoint written before the package move (tests/data/pre_package_ckpt: an E_3 train state at the tiny
size, every variable filled with its own constant, by tests/data/pre_package_ckpt/written_by.py.txt at the
commit before the move) restores into today's train state: every key in the same place, every value back,
and what it predates (the loss scale's step count, E_3's u_a table) starts as built. Checkpoint keys are attribute paths, so
moving modules must not change them; renaming an attribute would fail here."""
import os

import numpy as np
import tensorflow as tf

from geoloc import cli
from geoloc.train import train_state
import stages

HERE = os.path.dirname(os.path.abspath(__file__))
OLD = os.path.join(HERE, 'data', 'pre_package_ckpt', 'ckpt')
TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4']


def test_a_checkpoint_from_before_the_package_move_restores(tmp_path):
    stage = stages.get('E_3')
    cfg = cli.configs([stage], TINY)[0]
    state = train_state.TrainState(stage, cfg, 36, 9)
    absent = train_state.absent_keys(OLD, state)
    assert set(absent) == {'loss_scale_good_steps', 'tables/u_a'}     # what the state gained since
    status = state.checkpoint(leave_out=absent).read(OLD)
    status.assert_consumed()                      # every value of the old file found its variable
    status.assert_existing_objects_matched()      # and every variable of today's state its value
    assert int(state.scaler.good_steps.numpy()) == 0 and float(state.tables['u_a'].numpy()[0, 0]) == 0   # as built
    # written back, the state holds exactly the old file's keys and values (plus the new step count)
    new = state.checkpoint().write(str(tmp_path / 'ckpt'))
    old_r, new_r = tf.train.load_checkpoint(OLD), tf.train.load_checkpoint(new)
    old_keys = set(old_r.get_variable_to_shape_map()) - {'_CHECKPOINTABLE_OBJECT_GRAPH'}
    new_keys = set(new_r.get_variable_to_shape_map()) - {'_CHECKPOINTABLE_OBJECT_GRAPH'}
    assert new_keys - old_keys == {f'{k}/.ATTRIBUTES/VARIABLE_VALUE' for k in absent}
    assert old_keys <= new_keys and len(old_keys) > 250
    constants = set()
    for k in old_keys:
        a, b = old_r.get_tensor(k), new_r.get_tensor(k)
        np.testing.assert_array_equal(a, b, err_msg=k)
        constants.add(float(np.asarray(a).ravel()[0]))
    assert len(constants) > 250      # each variable held its own value: a mix-up of two would show
