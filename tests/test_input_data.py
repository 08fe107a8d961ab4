"""VIGOR/CVACT parsing and validation, image decoding, the image cache and the batch sampler."""
import io
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

import geometry
import input_data
import synthetic_data
from fake_act_data import PANO_IDS, TRAIN_1BASED, write_act_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(4)


def test_load_same_and_cross_area(vigor):
    same = input_data.load_vigor(vigor, 'test', 'same', 'original')
    assert len(same.tile_paths) == 4 * 16 and same.tiles.shape == (len(same), 4)
    assert np.all(same.tiles[:, 0] >= 0)
    cross = input_data.load_vigor(vigor, 'test', 'cross', 'original')
    cities = {p.split(os.sep)[-3] for p in cross.pano_paths}
    assert cities == {'SanFrancisco', 'Chicago'} and len(cross.tile_paths) == 32
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


def test_read_image_checks(tmp_path):
    ok = np.full((40, 80, 3), 200, np.uint8)
    cv2.imwrite(str(tmp_path / 'p.jpg'), ok)
    img = input_data.read_image(str(tmp_path / 'p.jpg'), (32, 64), 'panorama')
    assert img.shape == (32, 64, 3) and img.dtype == np.float32
    # BGR mean subtracted: a uniform 200 image becomes 200 - mean per channel (JPEG: +-2)
    np.testing.assert_allclose(img.mean((0, 1)), 200 - np.array(geometry.VGG_MEAN_BGR), atol=2.5)
    cv2.imwrite(str(tmp_path / 'g.png'), np.zeros((40, 80), np.uint8))
    with pytest.raises(input_data.DataError, match='g.png: expected a 3-channel colour panorama, got a grayscale'):
        input_data.read_image(str(tmp_path / 'g.png'), (32, 64), 'panorama')
    cv2.imwrite(str(tmp_path / 'sq.png'), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(input_data.DataError, match='width = 2 x height, got 40x40'):
        input_data.read_image(str(tmp_path / 'sq.png'), (32, 64), 'panorama')
    with pytest.raises(input_data.DataError, match='square aerial image, got 80x40'):
        input_data.read_image(str(tmp_path / 'p.jpg'), (64, 64), 'aerial')
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(input_data.DataError, match='bad.png: unreadable image'):
        input_data.read_image(str(tmp_path / 'bad.png'), (64, 64), 'aerial')


def _smooth_colour(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(x / 23), 128 + 100 * np.cos(y / 17), 128 + 60 * np.sin((x + y) / 31)],
                    -1).astype(np.uint8)


def test_jpeg_is_decoded_at_a_reduced_scale_when_read_smaller(tmp_path):
    path = str(tmp_path / 'p.jpg')
    cv2.imwrite(path, _smooth_colour(256, 512), [cv2.IMWRITE_JPEG_QUALITY, 95])
    with open(path, 'rb') as f:
        assert input_data._jpeg_colour_size(f.read()) == (256, 512)
    pixels, on_file = input_data.decode_image(path, (64, 128))
    assert pixels.shape == (64, 128, 3) and on_file == (256, 512)       # 1/4 scale in libjpeg
    assert input_data.decode_image(path, (100, 200))[0].shape == (128, 256, 3)  # 1/4 would be < 100 rows
    assert input_data.decode_image(path)[0].shape == (256, 512, 3)
    full = cv2.resize(cv2.imread(path), (128, 64), interpolation=cv2.INTER_AREA).astype(float)
    diff = np.abs(input_data.load_image(path, (64, 128), 'panorama').astype(float) - full)
    assert diff.mean() < 1 and diff.max() <= 8
    # the checks still see the file as it is: a grayscale JPEG, a square one read as a panorama
    cv2.imwrite(str(tmp_path / 'g.jpg'), _smooth_colour(256, 512)[..., 0])
    with pytest.raises(input_data.DataError, match='g.jpg: expected a 3-channel colour panorama, got a grayscale'):
        input_data.load_image(str(tmp_path / 'g.jpg'), (64, 128), 'panorama')
    cv2.imwrite(str(tmp_path / 'sq.jpg'), _smooth_colour(256, 256))
    with pytest.raises(input_data.DataError, match='width = 2 x height, got 256x256'):
        input_data.load_image(str(tmp_path / 'sq.jpg'), (32, 64), 'panorama')


def test_jpeg_colour_size_reads_only_colour_jpeg_headers():
    def encoded(fmt, image, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()
    colour = encoded('JPEG', Image.new('RGB', (48, 24)))
    assert input_data._jpeg_colour_size(colour) == (24, 48)                  # (height, width)
    scan = colour.index(b'\xff\xda')                                         # start of scan
    assert input_data._jpeg_colour_size(colour[:scan + 20]) == (24, 48)      # the header is enough
    assert input_data._jpeg_colour_size(encoded('JPEG', Image.new('L', (48, 24)))) is None       # 1 component
    assert input_data._jpeg_colour_size(encoded('JPEG', Image.new('CMYK', (48, 24)))) is None    # 4 components
    assert input_data._jpeg_colour_size(encoded('PNG', Image.new('RGB', (48, 24)))) is None
    assert input_data._jpeg_colour_size(colour[:20]) is None                 # no frame header
    assert input_data._jpeg_colour_size(b'\xff\xd8garbage') is None


def test_no_tensorflow_import():
    """input_data (and so samples_on_cvact and synthetic_data) stays usable without TensorFlow."""
    code = ('import sys, geometry, input_data, samples_on_cvact, synthetic_data, evaluation; '
            'assert "tensorflow" not in sys.modules, "TensorFlow imported"')
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_image_cache_keeps_the_first_images_up_to_its_budget(vigor):
    split = input_data.load_vigor(vigor, 'train')
    one = 64 * 64 * 3
    cache = input_data.ImageCache(3 * one + 10)
    first = cache.load(split.tile_paths[0], (64, 64), 'aerial')
    np.testing.assert_array_equal(first, input_data.load_image(split.tile_paths[0], (64, 64), 'aerial'))
    assert cache.load(split.tile_paths[0], (64, 64), 'aerial') is first and (cache.hits, cache.misses) == (1, 1)
    for p in split.tile_paths[1:5]:
        cache.load(p, (64, 64), 'aerial')
    assert cache.bytes == 3 * one and set(cache.images) == {(p, (64, 64)) for p in split.tile_paths[:3]}
    assert cache.load(split.tile_paths[4], (64, 64), 'aerial') is not cache.load(split.tile_paths[4], (64, 64), 'aerial')
    assert cache.load(split.tile_paths[0], (32, 32), 'aerial').shape == (32, 32, 3)  # the size is part of the key


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


def test_load_act_data_maps_1based_indices(tmp_path):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path)
    act = input_data.load_act_data(path)
    assert act['pano_ids'] == PANO_IDS
    assert act['utm'].shape == (9, 2) and act['utm'].dtype == np.float64 and act['utm'][3, 1] == 7.0
    assert [act['pano_ids'][i] for i in act['train_idx']] == [PANO_IDS[i - 1] for i in TRAIN_1BASED]
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1]
    assert act['val_set'] == 'valSetAll' and act['val_idx'].tolist() == [3, 5, 7]
    assert input_data.load_act_data(path, val_set='valSet')['val_idx'].tolist() == [3, 5]


@pytest.mark.parametrize('oned_as', ['column', 'row'])
def test_load_act_data_shapes(tmp_path, oned_as):
    # char-matrix panoIds (equal lengths), 1-D index vectors saved as rows or columns, utm stored 2xN
    ids = [f'id{k:03d}' for k in range(9)]
    path = str(tmp_path / 'ACT_data.mat')
    utm = np.arange(18, dtype=np.float64).reshape(9, 2)
    write_act_data(path, pano_ids=np.array(ids), utm=utm.T, oned_as=oned_as,
               trainSet={'trainInd': np.array(TRAIN_1BASED, dtype=np.float64)},
               valSetAll={'valInd': np.array([9], dtype=np.int32)})
    act = input_data.load_act_data(path)
    assert act['pano_ids'] == ids and np.array_equal(act['utm'], utm)
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1] and act['val_idx'].tolist() == [8]


@pytest.mark.parametrize('kwargs', [{}, {'squeeze_me': True}, {'struct_as_record': False},
                                    {'squeeze_me': True, 'struct_as_record': False}, {'chars_as_strings': False}])
def test_parse_act_data_loadmat_modes(tmp_path, kwargs):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path, valSet={'valInd': np.array([[4.0]])})  # a single index squeezes to a scalar
    act = input_data.parse_act_data(scipy.io.loadmat(path, **kwargs), source=path, val_set='valSet')
    assert act['pano_ids'] == PANO_IDS
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1] and act['val_idx'].tolist() == [3]


def test_load_act_data_errors(tmp_path):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path, drop=('valSet', 'valSetAll'))
    with pytest.raises(ValueError, match=r"ACT_data\.mat: missing field 'valSet'"):
        input_data.load_act_data(path)
    write_act_data(path, drop=('utm',))
    with pytest.raises(ValueError, match="missing field 'utm'"):
        input_data.load_act_data(path)
    write_act_data(path, trainSet={'trainIdx': np.array([[1.0]])})
    with pytest.raises(ValueError, match=r"missing field 'trainSet\.trainInd'"):
        input_data.load_act_data(path)
    write_act_data(path, trainSet={'trainInd': np.array([[1.0], [99.0]])})
    with pytest.raises(ValueError, match=r'trainSet\.trainInd holds index 99 outside 1\.\.9'):
        input_data.load_act_data(path)
    write_act_data(path, valSetAll={'valInd': np.array([[0.0]])})
    with pytest.raises(ValueError, match=r'valSetAll\.valInd holds index 0'):
        input_data.load_act_data(path)
    write_act_data(path, utm=np.zeros((8, 2)))
    with pytest.raises(ValueError, match=r'utm has shape \(8, 2\), expected \(9, 2\)'):
        input_data.load_act_data(path)
    with pytest.raises(FileNotFoundError, match='nope.mat'):
        input_data.load_act_data(str(tmp_path / 'nope.mat'))
    (tmp_path / 'junk.mat').write_bytes(b'not a mat file')
    with pytest.raises(ValueError, match='junk.mat: not a readable .mat file'):
        input_data.load_act_data(str(tmp_path / 'junk.mat'))
