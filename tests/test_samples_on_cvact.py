"""Tests of samples_on_cvact.py on a tiny fake CVACT built in a temp dir (9 panoIds, 8 of them in a split)."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import samples_on_cvact as soc  # noqa: E402
from fake_act_data import PANO_IDS, TRAIN_1BASED, VAL_1BASED, VAL_ALL_1BASED, write_act_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = (slice(594, 606), slice(594, 606))  # 12x12 px pure red block centred on the continuous point (600, 600)


def _aerial(rng, size=1200):
    """(size, size, 3) uint8 BGR: 8-px random texture (red channel <= 120) plus the red marker at the centre."""
    coarse = rng.integers(0, 256, size=(size // 8, size // 8, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image[..., 2] *= 120 / 255
    image = np.clip(image, 0, 255).astype(np.uint8)
    if size == 1200:
        image[MARKER] = (0, 0, 255)
    return image


def _make_cvact(root, aerial_sizes=None):
    """Fake CVACT under root: aerials + small panoramas for the 8 listed panoIds, ACT_data.mat for all 9."""
    rng = np.random.default_rng(123)
    os.makedirs(os.path.join(root, 'streetview'))
    os.makedirs(os.path.join(root, 'satview_polish'))
    for k, pid in enumerate(PANO_IDS[:8]):
        size = (aerial_sizes or {}).get(k, 1200)
        cv2.imwrite(os.path.join(root, 'satview_polish', f'{pid}_satView_polish.jpg'), _aerial(rng, size),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(os.path.join(root, 'streetview', f'{pid}_grdView.jpg'), np.full((16, 32, 3), k, np.uint8))
    write_act_data(os.path.join(root, 'ACT_data.mat'))
    return str(root)


@pytest.fixture(scope='module')
def cvact(tmp_path_factory):
    return _make_cvact(tmp_path_factory.mktemp('cvact'))


@pytest.fixture(scope='module')
def sampled(cvact, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('sampled') / 'out')
    summary = soc.resample(cvact, out, seed=0, progress=False)
    return out, summary


def _centers(out):
    centers = {}
    with open(os.path.join(out, 'centers.txt')) as f:
        for line in f:
            name, xy = line.rstrip('\n').rsplit(': ', 1)
            x, y = xy.strip('()').split(', ')
            centers[name] = (int(x), int(y))
    return centers


def _split(out, split):
    with open(os.path.join(out, 'splits', f'{split}.txt')) as f:
        return [line.split() for line in f]


def _tree(out):
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(dirpath, name), 'rb') as f:
                files[os.path.relpath(os.path.join(dirpath, name), out)] = f.read()
    return files


# ----------------------------------------------------------------------------- sample_crops

def test_sample_crops_ranges():
    rng = np.random.default_rng(0)
    positives, semis = [], []
    for _ in range(2000):
        starts = soc.sample_crops(rng)
        assert len(starts) == 4 and all(isinstance(v, int) for s in starts for v in s)
        positives.append(starts[0])
        semis += starts[1:]
    positives, semis = np.array(positives), np.array(semis)
    assert positives.min() == 150 and positives.max() == 449          # [150, 450), both ends reached
    assert semis.min() == 0 and semis.max() == 599                    # [0, 600)
    outside = (semis < 150) | (semis >= 450)
    assert outside.any(axis=1).all()                                  # never both coordinates central
    assert not outside.all(axis=1).all()                              # but one of them may be


def test_sample_crops_seeded_and_validated():
    assert soc.sample_crops(np.random.default_rng(5)) == soc.sample_crops(np.random.default_rng(5))
    assert soc.sample_crops(np.random.default_rng(5)) != soc.sample_crops(np.random.default_rng(6))
    # crop 400 of a 1200 aerial: positive start in [600-300, 600-100), semi-positive in [200, 600)
    starts = np.array([soc.sample_crops(np.random.default_rng(s), crop=400) for s in range(200)])
    assert starts[:, 0].min() >= 300 and starts[:, 0].max() < 500
    assert starts[:, 1:].min() >= 200 and starts[:, 1:].max() < 600
    for crop in (602, 700, 0):
        with pytest.raises(ValueError, match='crop'):
            soc.sample_crops(np.random.default_rng(0), crop=crop)


def test_vigor_delta():
    # panorama at the crop centre -> (0, 0); at (450, 150) -> dy = -150*640/600 = -160, dx = -150*640/600 = -160
    assert soc.vigor_delta(300, 300) == (0.0, 0.0)
    assert soc.vigor_delta(450, 150) == pytest.approx((-160.0, -160.0))
    # x = y = 600 (crop started at 0): dy = 320, dx = -320; row = 320 + dy = 640, col = 320 - dx = 640
    assert soc.vigor_delta(600, 600) == pytest.approx((320.0, -320.0))


# ----------------------------------------------------------------------------- resample

def test_layout_and_counts(sampled):
    out, summary = sampled
    listed = PANO_IDS[:8]
    assert sorted(os.listdir(os.path.join(out, 'satellite'))) == sorted(
        f'{pid}_sampled_{i}.jpg' for pid in listed for i in range(4))
    assert sorted(os.listdir(os.path.join(out, 'splits'))) == [
        'satellite_list_test.txt', 'satellite_list_train.txt', 'test.txt', 'train.txt']
    assert not any(name.endswith('.tmp') for name in _tree(out))
    config = json.load(open(os.path.join(out, 'resample_config.json')))
    assert config['seed'] == 0 and config['crop'] == 600 and config['val_set'] == 'valSetAll'
    assert (config['n_aerials'], config['n_crops'], config['n_train'], config['n_test']) == (8, 32, 5, 3)
    assert config['n_left_out'] == 1 and config['n_train_test_overlap'] == 0
    assert summary['n_crops'] == 32 and summary['out_root'] == os.path.abspath(out)
    for name in os.listdir(os.path.join(out, 'satellite')):
        assert cv2.imread(os.path.join(out, 'satellite', name)).shape == (600, 600, 3)


def test_splits_map_indices_and_list_crops(sampled):
    out, _ = sampled
    for split, one_based in (('train', TRAIN_1BASED), ('test', VAL_ALL_1BASED)):
        lines = _split(out, split)
        assert all(len(tokens) == 13 for tokens in lines)
        assert [tokens[0] for tokens in lines] == [f'{PANO_IDS[i - 1]}_grdView.jpg' for i in one_based]
        for tokens in lines:
            pid = tokens[0][:-len('_grdView.jpg')]
            assert tokens[1::3] == [f'{pid}_sampled_{i}.jpg' for i in range(4)]
        with open(os.path.join(out, 'splits', f'satellite_list_{split}.txt')) as f:
            assert f.read().split('\n')[:-1] == [name for tokens in lines for name in tokens[1::3]]


def test_positive_central_semi_not(sampled):
    out, _ = sampled
    centers = _centers(out)
    assert len(centers) == 32
    for name, (x, y) in centers.items():
        if name.endswith('_0.jpg'):
            # start in [150, 450) -> panorama at 600 - start in (150, 450]: the crop's central region
            assert 150 < x <= 450 and 150 < y <= 450, name
        else:
            assert 0 < x <= 600 and 0 < y <= 600, name  # always inside the crop
            assert not (150 < x <= 450 and 150 < y <= 450), name


def test_deltas_agree_with_centers(sampled):
    out, _ = sampled
    centers = _centers(out)
    for split in ('train', 'test'):
        for tokens in _split(out, split):
            for name, dy, dx in zip(tokens[1::3], tokens[2::3], tokens[3::3]):
                x, y = centers[name]
                dy, dx = float(dy), float(dx)
                assert dy == pytest.approx((y - 300) * 640 / 600, abs=1e-5)
                assert dx == pytest.approx((300 - x) * 640 / 600, abs=1e-5)
                # VIGOR convention: row = 320 + dy, col = 320 - dx is the panorama in the 640-px tile
                assert 320 + dy == pytest.approx(y * 640 / 600, abs=1e-5)
                assert 320 - dx == pytest.approx(x * 640 / 600, abs=1e-5)
                if name.endswith('_0.jpg'):
                    assert -160 < dy <= 160 and -160 <= dx < 160
                else:
                    assert -320 < dy <= 320 and -320 <= dx < 320 and max(abs(dy), abs(dx)) >= 160 - 1e-6


def test_crops_are_the_aerial_regions(cvact, sampled):
    """Each crop equals aerial[600-y : 1200-y, 600-x : 1200-x] (within JPEG error) and shows the marker at (x, y)."""
    out, _ = sampled
    centers = _centers(out)
    window = slice(200, 400)  # compare a central 200x200 window at the claimed offset and at +-2 px shifts
    for name, (x, y) in centers.items():
        pid = name.rsplit('_sampled_', 1)[0]
        aerial = cv2.imread(os.path.join(cvact, 'satview_polish', f'{pid}_satView_polish.jpg')).astype(np.float32)
        crop = cv2.imread(os.path.join(out, 'satellite', name)).astype(np.float32)
        x0, y0 = 600 - x, 600 - y
        errors = {}
        for sy in range(-2, 3):
            for sx in range(-2, 3):
                ref = aerial[y0 + sy:y0 + sy + 600, x0 + sx:x0 + sx + 600][window, window]
                if ref.shape == (200, 200, 3):
                    errors[sy, sx] = np.abs(crop[window, window] - ref).mean()
        assert min(errors, key=errors.get) == (0, 0), name
        assert errors[0, 0] < 3.0, name
        if 8 <= x <= 592 and 8 <= y <= 592:  # the 12-px marker lies wholly inside the crop
            marker = (crop[..., 2] > 180) & (crop[..., 1] < 100) & (crop[..., 0] < 100)
            rows, cols = np.nonzero(marker)
            assert 64 <= len(rows) <= 196, name  # 144 px less what chroma subsampling blurs
            assert abs(cols.mean() + 0.5 - x) < 1 and abs(rows.mean() + 0.5 - y) < 1, name


def test_same_seed_same_bytes_other_seed_differs(cvact, sampled, tmp_path):
    out, _ = sampled
    again = str(tmp_path / 'again')
    soc.resample(cvact, again, seed=0, progress=False)
    assert _tree(again) == _tree(out)
    other = str(tmp_path / 'other')
    soc.resample(cvact, other, seed=1, progress=False)
    assert _tree(other).keys() == _tree(out).keys()
    assert _tree(other)['centers.txt'] != _tree(out)['centers.txt']


def test_val_set_choice_keeps_crops(cvact, sampled, tmp_path):
    out, _ = sampled
    val = str(tmp_path / 'val')
    soc.resample(cvact, val, seed=0, progress=False, val_set='valSet')
    assert [t[0] for t in _split(val, 'test')] == [f'{PANO_IDS[i - 1]}_grdView.jpg' for i in VAL_1BASED]
    assert _split(val, 'train') == _split(out, 'train')  # a panorama's crops depend on (seed, index) only


def test_progress_lines(cvact, tmp_path, capsys):
    soc.resample(cvact, str(tmp_path / 'out'), seed=0, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert '8 aerials (train 5, test 3 from valSetAll, 0 in both; 1 panoIds in no split left out)' in lines[0]
    assert any('8/8 aerials, 32 crops' in line for line in lines)


def test_wrong_size_refused_and_no_complete_looking_output(tmp_path):
    root = _make_cvact(tmp_path / 'cvact', aerial_sizes={4: 1000})  # panoIds entry 5, processed 5th
    bad = os.path.join(root, 'satview_polish', f'{PANO_IDS[4]}_satView_polish.jpg')
    out = str(tmp_path / 'out')
    with pytest.raises(ValueError) as info:
        soc.resample(root, out, progress=False)
    assert str(info.value) == f'{bad}: expected a 1200x1200 aerial, got 1000x1000'
    # the crops of the four aerials before it were written to a temporary sibling, removed with it
    assert os.listdir(tmp_path) == ['cvact']


def test_a_failed_run_leaves_out_as_it_was_and_the_same_command_runs_again(tmp_path):
    """A missing aerial (the 8th, after 7 aerials' crops were cut): --out absent (or the empty folder it was) and
    no temporary folder left; with the aerial back, the same command writes the whole output."""
    root = _make_cvact(tmp_path / 'cvact')
    aerial = os.path.join(root, 'satview_polish', f'{PANO_IDS[7]}_satView_polish.jpg')
    os.rename(aerial, aerial + '.away')
    out = str(tmp_path / 'out')
    for before in ('absent', 'empty'):
        with pytest.raises(FileNotFoundError, match=re.escape(f'{aerial}: aerial missing (panoIds entry 8')):
            soc.resample(root, out, progress=False)
        assert sorted(os.listdir(tmp_path)) == (['cvact'] if before == 'absent' else ['cvact', 'out'])
        if before == 'empty':
            assert os.listdir(out) == []
        os.makedirs(out, exist_ok=True)
    os.rename(aerial + '.away', aerial)
    summary = soc.resample(root, out, progress=False)
    assert summary['n_crops'] == 32 and len(os.listdir(os.path.join(out, 'satellite'))) == 32
    assert os.path.exists(os.path.join(out, 'resample_config.json'))
    assert sorted(os.listdir(tmp_path)) == ['cvact', 'out']


def test_truncated_aerial_is_refused(tmp_path):
    """OpenCV decodes the first half of a JPEG and greys out the rest without an error: refused, in one line."""
    root = _make_cvact(tmp_path / 'cvact')
    aerial = os.path.join(root, 'satview_polish', f'{PANO_IDS[3]}_satView_polish.jpg')
    data = open(aerial, 'rb').read()
    open(aerial, 'wb').write(data[:len(data) // 2])
    assert cv2.imread(aerial) is not None                  # what the release would have cut crops from
    with pytest.raises(ValueError) as info:
        soc.resample(root, str(tmp_path / 'out'), progress=False)
    assert str(info.value) == f'{aerial}: truncated JPEG (no end-of-image marker)'
    assert os.listdir(tmp_path) == ['cvact']
    run = _cli('--cvact_root', root, '--out', str(tmp_path / 'out'))
    assert run.returncode == 2 and run.stderr.strip() == (f'samples_on_cvact: error: {aerial}: truncated JPEG (no '
                                                          'end-of-image marker)')


def test_missing_files_and_non_empty_out(tmp_path):
    root = _make_cvact(tmp_path / 'cvact')
    aerial = os.path.join(root, 'satview_polish', f'{PANO_IDS[7]}_satView_polish.jpg')
    os.remove(aerial)
    with pytest.raises(FileNotFoundError, match=re.escape(f'{aerial}: aerial missing (panoIds entry 8')):
        soc.resample(root, str(tmp_path / 'out1'), progress=False)
    pano = os.path.join(root, 'streetview', f'{PANO_IDS[2]}_grdView.jpg')
    os.remove(pano)
    with pytest.raises(FileNotFoundError, match=re.escape(f'{pano}: panorama missing')):
        soc.resample(root, str(tmp_path / 'out2'), progress=False)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('x')
    with pytest.raises(ValueError, match='output folder is not empty'):
        soc.resample(root, str(tmp_path / 'full'), progress=False)
    os.remove(os.path.join(root, 'ACT_data.mat'))
    with pytest.raises(FileNotFoundError, match='ACT_data.mat: no such file'):
        soc.resample(root, str(tmp_path / 'out3'), progress=False)


def test_unreadable_aerial(tmp_path):
    root = _make_cvact(tmp_path / 'cvact')
    aerial = os.path.join(root, 'satview_polish', f'{PANO_IDS[0]}_satView_polish.jpg')
    with open(aerial, 'wb') as f:
        f.write(b'not a jpeg')
    with pytest.raises(ValueError, match=re.escape(f'{aerial}: unreadable image')):
        soc.resample(root, str(tmp_path / 'out'), progress=False)


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'samples_on_cvact.py'), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli(cvact, sampled, tmp_path):
    out, _ = sampled
    run = _cli('--cvact_root', cvact, '--out', str(tmp_path / 'cli'), '--seed', '0')
    assert run.returncode == 0, run.stderr
    assert _tree(str(tmp_path / 'cli')) == _tree(out)
    assert 'done, 32 crops' in run.stdout


def test_cli_bad_input_exits_with_status_2(tmp_path):
    root = _make_cvact(tmp_path / 'cvact', aerial_sizes={0: 1000})
    run = _cli('--cvact_root', root, '--out', str(tmp_path / 'out'))
    assert run.returncode == 2
    bad = os.path.join(root, 'satview_polish', f'{PANO_IDS[0]}_satView_polish.jpg')
    assert run.stderr.strip() == f'samples_on_cvact: error: {bad}: expected a 1200x1200 aerial, got 1000x1000'
    run = _cli('--cvact_root', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out2'))
    assert run.returncode == 2 and 'ACT_data.mat: no such file' in run.stderr and 'Traceback' not in run.stderr
