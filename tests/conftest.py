import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')  # the demo's kernels

import shutil  # noqa: E402

import pytest  # noqa: E402

# The tiny network and run every training test uses: 32x64 panoramas, 64-px tiles, width 1/16, batch 4,
# the per-batch epoch, no validation.
TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4', '--epoch_batch', '0',
        '--val_every', '0', '--log_every', '1', '--eval_batch', '16', '--mining_pool', '20', '--mining_topk', '5']


@pytest.fixture(scope='session')
def tiny_vigor(tmp_path_factory):
    """tiny_vigor(grid) -> root of a small synthetic VIGOR (64-px tiles, 32x64 panoramas), made once per grid.
    grid 3: 36 training panoramas (9 steps of 4); grid 4: 64."""
    from tools import synthetic_data
    made = {}

    def make(grid):
        if grid not in made:
            made[grid] = str(tmp_path_factory.mktemp(f'vigor_grid{grid}') / 'VIGOR')
            synthetic_data.write_vigor(made[grid], seed=0, grid=grid, tile_px=64, pano_hw=(32, 64))
        return made[grid]
    return make


@pytest.fixture
def vigor_copy(vigor, tmp_path):
    """A private copy of the module's `vigor` data set, free to corrupt."""
    root = str(tmp_path / 'VIGOR')
    shutil.copytree(vigor, root)
    return root


def tensorboard_events(run_dir):
    """[(step, tag, value as an array)] of everything a run logged to <run_dir>/tb, in the order it was written
    (event files by name, which starts with their creation time; a resumed run appends a file). Scalars are
    0-d arrays; an image summary is a 1-d array of encoded strings."""
    import glob
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, 'tb', 'events*'))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            out.extend((event.step, v.tag, tf.make_ndarray(v.tensor)) for v in event.summary.value)
    return out
