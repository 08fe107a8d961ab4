"""prepare_data.py: the resized copy of a dataset, read as the original is, and the size check of a run."""
import os

import cv2
import numpy as np
import pytest

import config
from geoloc.data import images
import input_data
from geoloc.data import pipeline
from tools import prepare_data
import samples_on_cvact
from tools import synthetic_data
import train_first_E_1
from geoloc import cli

GRD, SAT = (32, 64), 64


@pytest.fixture(scope='module')
def original(tmp_path_factory):
    """A small synthetic VIGOR larger than the training size: 96-px tiles, 48x96 panoramas (4 cities, 2x2 grid)."""
    root = str(tmp_path_factory.mktemp('original') / 'VIGOR')
    synthetic_data.write_vigor(root, seed=0, grid=2, tile_px=96, pano_hw=(48, 96))
    return root


@pytest.fixture(scope='module')
def prepared(original, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('prepared') / 'VIGOR_32')
    assert prepare_data.prepare('vigor', original, out, GRD, SAT, workers=2, log=lambda m: None) == []
    return out


def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_the_copy_has_the_layout_names_and_reference_pixels(original, prepared):
    assert files(prepared) == sorted(files(original) + [input_data.PREPARED])
    a, b = input_data.load_vigor(original, 'train'), input_data.load_vigor(prepared, 'train')
    assert [os.path.relpath(p, original) for p in a.pano_paths] == [os.path.relpath(p, prepared) for p in b.pano_paths]
    np.testing.assert_array_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.deltas, b.deltas)
    # tiles: PNG, exactly docs/design.md §2's OpenCV full decode + INTER_AREA; panoramas: that, through JPEG quality 95
    # 4:4:4 (on these 32x64 panoramas, all fine detail, measured mean 2.0, 99th percentile 8, max 17 grey
    # levels; 0.9 / 5 / 21 on the paper-size city at 320x640: benchmarks/README.md)
    reference = lambda p, hw: cv2.resize(cv2.imread(p), (hw[1], hw[0]), interpolation=cv2.INTER_AREA).astype(int)
    for p, q in zip(a.tile_paths[:6], b.tile_paths[:6]):
        np.testing.assert_array_equal(cv2.imread(q), reference(p, (SAT, SAT)))
    diff = np.concatenate([np.abs(cv2.imread(q).astype(int) - reference(p, GRD)).ravel()
                           for p, q in zip(a.pano_paths[:6], b.pano_paths[:6])])
    assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 10 and diff.max() <= 20
    # read through the pipeline at its own size: the decoded file, nothing resized
    x, _ = next(iter(pipeline.image_dataset(b.tile_paths[:2], (SAT, SAT), 'aerial', 2)))
    np.testing.assert_allclose(x.numpy()[1], images.read_image(b.tile_paths[1], (SAT, SAT), 'aerial'))


def test_a_run_reads_the_copy_at_its_size_only(prepared, tmp_path, capsys):
    cfg = config.resolve('E_1a', {'data_root': prepared, 'grd_size': GRD, 'sat_size': SAT})
    assert len(cli.dataset_splits(cfg, 'train')) > 0
    marker = os.path.join(prepared, input_data.PREPARED)
    argv = ['--data_root', prepared, '--grd_size', '64', '128', '--sat_size', '64', '--width', '0.0625', '--batch', '4',
            '--max_steps', '1', '--val_every', '0', '--mining', '0', '--run_dir', str(tmp_path / 'run')]
    assert cli.main([train_first_E_1.PHASE_A], argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {marker}: this copy holds images prepared for --grd_size 32 64 --sat_size 64, this run '
                   'reads --grd_size 64 128 --sat_size 64; use those sizes, the original tree or another copy '
                   '(prepare_data.py)']
    assert not os.path.exists(tmp_path / 'run' / 'phase_a' / 'config.json')


def test_preparation_refuses_bad_images_and_resumes(original, tmp_path):
    root, out = str(tmp_path / 'VIGOR'), str(tmp_path / 'VIGOR_32')
    import shutil
    shutil.copytree(original, root)
    split = input_data.load_vigor(root, 'train')
    pano, tile = split.pano_paths[0], split.tile_paths[1]
    good_pano = open(pano, 'rb').read()
    data = bytearray(good_pano)
    middle = len(data) // 2
    data[middle:middle + 40] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
    open(pano, 'wb').write(bytes(data))
    images.load_image(pano, GRD, 'panorama', exact=True)        # OpenCV alone decodes it, garbled, and says nothing
    cv2.imwrite(tile, cv2.imread(tile)[:8, :8])                  # smaller than the read size: refused, never upscaled
    errors = prepare_data.prepare('vigor', root, out, GRD, SAT, workers=2, log=lambda m: None)
    assert len(errors) == 2
    assert errors[0].startswith(f'{pano}: corrupt JPEG data (libjpeg: Corrupt JPEG data: ')
    assert errors[1] == f'{tile}: too small: 8x8, read at 64x64 (images are never upscaled)'
    assert not os.path.exists(os.path.join(out, input_data.PREPARED))
    done = os.path.join(out, os.path.relpath(split.pano_paths[1], root))
    before = os.stat(done).st_mtime_ns
    open(pano, 'wb').write(good_pano)
    shutil.copyfile(os.path.join(original, os.path.relpath(tile, root)), tile)
    assert prepare_data.prepare('vigor', root, out, GRD, SAT, workers=2, log=lambda m: None) == []
    assert os.stat(done).st_mtime_ns == before                  # resumed: what was written stays
    assert os.path.isfile(os.path.join(out, input_data.PREPARED))
    with pytest.raises(input_data.DataError, match='holds a copy of other settings'):
        prepare_data.prepare('vigor', root, out, (64, 128), SAT, workers=1)
    assert prepare_data.main(['--data_root', str(tmp_path / 'nowhere'), '--out', out]) == 2


def test_a_cvact_copy_loads_as_the_original(tmp_path):
    root = synthetic_data.ensure_cvact(str(tmp_path / 'CVACT'), n_panos=8, pano_hw=(64, 128))
    samples_on_cvact.resample(root, os.path.join(root, 'resampled'), seed=0)
    out = str(tmp_path / 'CVACT_32')
    assert prepare_data.prepare('cvact', root, out, GRD, SAT, workers=2, log=lambda m: None) == []
    for name in ('train', 'test'):
        a = input_data.load_cvact(root, os.path.join(root, 'resampled'), name, 1.0)
        b = input_data.load_cvact(out, os.path.join(out, 'resampled'), name, 1.0)
        np.testing.assert_array_equal(a.tiles, b.tiles)
        assert cv2.imread(b.tile_paths[0]).shape == (SAT, SAT, 3) and cv2.imread(b.pano_paths[0]).shape == GRD + (3,)
    input_data.check_prepared(os.path.join(out, 'resampled'), GRD, SAT)
    with pytest.raises(input_data.DataError, match='prepared for --grd_size 32 64 --sat_size 64'):
        input_data.check_prepared(os.path.join(out, 'resampled'), GRD, 96)
