"""VIGOR/CVACT parsing and validation, image decoding, the image cache and the batch sampler."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from geoloc.data import geometry
import input_data
from tools import synthetic_data
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(4)


def test_load_same_and_cross_area(vigor):
    same = input_data.load_vigor(vigor, 'test', 'same', 'original')
    # 4 cities x (4 + 2)^2 tiles: the 4 x 4 with panoramas and the ring of reference tiles around them
    assert len(same.tile_paths) == 4 * 36 and same.tiles.shape == (len(same), 4)
    assert np.all(same.tiles >= 0)               # every semi-positive is in the reference set too
    cross = input_data.load_vigor(vigor, 'test', 'cross', 'original')
    cities = {p.split(os.sep)[-3] for p in cross.pano_paths}
    assert cities == {'SanFrancisco', 'Chicago'} and len(cross.tile_paths) == 2 * 36
    train = input_data.load_vigor(vigor, 'train', 'same', 'original')
    assert not set(train.pano_paths) & set(same.pano_paths)


def test_positions_agree_with_names(vigor):
    # original labels: the ground truth is the panorama's GPS; moving the positive tile's centre by the
    # original delta at 0.114 m/px lands on it (up to the 6-decimal rounding of the names, < 0.1 m).
    for labels in ('original', 'corrected'):
        s = input_data.load_vigor(vigor, 'test', 'same', labels)
        moved = geometry.delta_to_position(s.tile_centres[s.tiles[:, 0]], s.deltas[:, 0].astype(float),
                                           s.mpp, 'haversine')
        names = np.array([input_data.vigor_pano_latlon(os.path.basename(p)) for p in s.pano_paths])
        err = geometry.distance_m(moved, names, 'haversine')
        assert err.max() < 0.2, labels
    corrected = input_data.load_vigor(vigor, 'test', 'same', 'corrected')
    assert set(np.round(corrected.mpp, 6)) == set(np.round(list(geometry.CORRECTED_MPP.values()), 6))


def _rewrite_line(path, fn, line=0):
    with open(path) as f:
        lines = f.read().splitlines()
    lines[line] = fn(lines[line])
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def test_bad_label_files(vigor_copy):
    split = os.path.join(vigor_copy, 'splits', 'Seattle', 'same_area_balanced_test.txt')
    _rewrite_line(split, lambda l: ' '.join(l.split()[:12]), line=1)
    with pytest.raises(input_data.DataError, match=r'same_area_balanced_test.txt:2: expected 13'):
        input_data.load_vigor(vigor_copy, 'test')
    _rewrite_line(split, lambda l: l + ' 0.0')   # restore a 13-token line below
    shutil.copy(os.path.join(vigor_copy, 'splits', 'Seattle', 'same_area_balanced_train.txt'), split)
    _rewrite_line(split, lambda l: l.replace('satellite_', 'satellite_9', 1), line=2)
    with pytest.raises(input_data.DataError, match=r':3: tile satellite_9.* not in satellite_list'):
        input_data.load_vigor(vigor_copy, 'train' if False else 'test')


def test_missing_root_split_and_duplicates(vigor_copy, tmp_path):
    with pytest.raises(input_data.DataError, match='dataset root not found'):
        input_data.load_vigor(str(tmp_path / 'nowhere'), 'train')
    split = os.path.join(vigor_copy, 'splits', 'Chicago', 'same_area_balanced_train.txt')
    with open(split) as f:
        first = f.readline()
    with open(split, 'a') as f:
        f.write(first)
    with pytest.raises(input_data.DataError, match='listed twice'):
        input_data.load_vigor(vigor_copy, 'train')
    open(split, 'w').close()
    with pytest.raises(input_data.DataError, match='is empty'):
        input_data.load_vigor(vigor_copy, 'train')
    os.remove(split)
    with pytest.raises(input_data.DataError, match='same_area_balanced_train.txt: split file not found'):
        input_data.load_vigor(vigor_copy, 'train')


def test_corrected_only_tree_loads(vigor_copy):
    """SliceMatch's instructions: replace splits/ by splits__corrected/, which holds satellite_list.txt too
    (as the synthetic tree's does). A corrected folder without the list falls back to splits/'s."""
    both = input_data.load_vigor(vigor_copy, 'test', 'same', 'corrected')
    lists = [os.path.join(vigor_copy, 'splits__corrected', city, 'satellite_list.txt')
             for city in geometry.VIGOR_CITIES]
    for path in lists:
        os.rename(path, path + '.away')
    fallback = input_data.load_vigor(vigor_copy, 'test', 'same', 'corrected')
    for path in lists:
        os.rename(path + '.away', path)
    shutil.rmtree(os.path.join(vigor_copy, 'splits'))
    only = input_data.load_vigor(vigor_copy, 'test', 'same', 'corrected')
    for split in (fallback, only):
        assert split.tile_paths == both.tile_paths and split.pano_paths == both.pano_paths
        np.testing.assert_array_equal(split.tiles, both.tiles)
        np.testing.assert_array_equal(split.deltas, both.deltas)
    # the original labels are not there: the error names their split file
    with pytest.raises(input_data.DataError, match=r'splits/NewYork/same_area_balanced_test.txt: split file not found'):
        input_data.load_vigor(vigor_copy, 'test', 'same', 'original')


def test_tree_without_a_satellite_list_names_both_places(vigor_copy):
    for city in geometry.VIGOR_CITIES:
        for folder in ('splits', 'splits__corrected'):
            os.remove(os.path.join(vigor_copy, folder, city, 'satellite_list.txt'))
    for labels, first, second in (('original', 'splits', 'splits__corrected'),
                                  ('corrected', 'splits__corrected', 'splits')):
        with pytest.raises(input_data.DataError) as e:
            input_data.load_vigor(vigor_copy, 'test', 'same', labels)
        where = [os.path.join(vigor_copy, folder, 'NewYork', 'satellite_list.txt') for folder in (first, second)]
        assert str(e.value) == f'{where[0]}: satellite list not found (nor at {where[1]})'


def test_no_tensorflow_import():
    """The data, metric and configuration modules (and the command-line tools built on them) load no
    TensorFlow, and importing them changes no environment variable."""
    code = ('import os, sys; tf_env = lambda: {k: v for k, v in os.environ.items() if k.startswith("TF_")}; '
            'env = tf_env(); '
            'import input_data, samples_on_cvact, config, stages; '
            'from geoloc.data import geometry, images, act_data, splits; from tools import synthetic_data; '
            'from geoloc.eval import evaluation, figures, protocols; from geoloc import cli, errors, runlog; '
            'assert "tensorflow" not in sys.modules, "TensorFlow imported"; '
            'assert tf_env() == env, "TensorFlow environment changed"')
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_sampler_never_repeats_a_tile_and_is_reproducible(vigor):
    split = input_data.load_vigor(vigor, 'train')
    sampler = input_data.BatchSampler(split, batch=6, seed=1)
    panos, semi = sampler.epoch_plan(0)
    assert panos.shape == (len(split) // 6, 6)
    rng = np.random.default_rng(0)
    hard = rng.integers(0, len(split.tile_paths), size=(len(split), 5))
    for plan in (panos, sampler.epoch_plan(1, hard)[0]):
        for row in plan:
            tiles = split.tiles[row].ravel()
            tiles = tiles[tiles >= 0]
            assert len(tiles) == len(set(tiles.tolist())), 'a tile appears twice in a batch'
    np.testing.assert_array_equal(panos, input_data.BatchSampler(split, 6, 1).epoch_plan(0)[0])
    assert not np.array_equal(panos, sampler.epoch_plan(1)[0])
    assert np.all((semi >= 1) & (semi <= 3))


def test_mined_half_follows_the_hard_table(vigor):
    split = input_data.load_vigor(vigor, 'train')
    sampler = input_data.BatchSampler(split, batch=4, seed=0)
    # every panorama's only hard tile is the positive of panorama (p + n/2) % n, two cities away
    n = len(split)
    hard = np.stack([split.tiles[(np.arange(n) + n // 2) % n, 0]] * 3, 1)
    panos, _ = sampler.epoch_plan(2, hard)
    mined = 0
    for row in panos:
        anchors = row[:2]
        for p in row[2:]:
            mined += any(split.tiles[p, 0] == hard[a, 0] for a in anchors)
    assert mined >= 0.6 * panos.shape[0] * 2


def test_cvact_resampled_loader(tmp_path):
    import samples_on_cvact
    root = str(tmp_path / 'cvact')
    synthetic_data.write_cvact(root, seed=0, n_panos=8, pano_hw=(32, 64))
    samples_on_cvact.resample(root, str(tmp_path / 'res'), seed=0, progress=False)
    s = input_data.load_cvact(root, str(tmp_path / 'res'), 'test', synthetic_data.CVACT_MPP_1200)
    assert s.metric == 'euclidean' and len(s.tile_paths) == 4 * len(s)
    # the positive crop's centre moved by the label delta lands on the panorama's UTM position
    moved = geometry.delta_to_position(s.tile_centres[s.tiles[:, 0]], s.deltas[:, 0].astype(float), s.mpp,
                                       'euclidean')
    np.testing.assert_allclose(moved, s.gt_positions, atol=1e-6)


def test_a_reference_subset_keeps_every_query_tile_and_draws_the_rest(vigor):
    split = input_data.load_vigor(vigor, 'test')
    queries = np.arange(5)
    sub = input_data.reference_subset(split, queries, 30, seed=1)
    assert len(sub) == 5 and len(sub.tile_paths) == 30
    for q in range(5):        # every positive / semi-positive is kept, at its new index
        for k in range(4):
            old = split.tiles[q, k]
            assert (sub.tiles[q, k] == -1) == (old == -1)
            if old >= 0:
                assert sub.tile_paths[sub.tiles[q, k]] == split.tile_paths[old]
                np.testing.assert_array_equal(sub.tile_centres[sub.tiles[q, k]], split.tile_centres[old])
    again = input_data.reference_subset(split, queries, 30, seed=1)
    other = input_data.reference_subset(split, queries, 30, seed=2)
    assert again.tile_paths == sub.tile_paths and other.tile_paths != sub.tile_paths
    everything = input_data.reference_subset(split, queries, 0, seed=1)   # fewer than needed: the needed ones
    assert len(everything.tile_paths) == len(np.unique(split.tiles[:5][split.tiles[:5] >= 0]))
