import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')  # the stage scripts' kernels

import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_vigor(tmp_path_factory):
    """tiny_vigor(grid) -> root of a small synthetic VIGOR (64-px tiles, 32x64 panoramas), made once per grid."""
    import synthetic_data
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
