"""Resample CVACT into VIGOR-style crops: one positive and three semi-positives per panorama.

    python samples_on_cvact.py --cvact_root data/CVACT --out data/CVACT_sampled --seed 0

Input (raw CVACT, Liu & Li, CVPR 2019):
    <cvact_root>/ACT_data.mat                                panoIds, utm, trainSet.trainInd, valSet(All).valInd
    <cvact_root>/streetview/<panoId>_grdView.jpg             panoramas (checked to exist, not copied)
    <cvact_root>/satview_polish/<panoId>_satView_polish.jpg  1200x1200, north-up, panorama at (600, 600)

Output (<out> must be empty or absent; built in a temporary sibling and renamed into place when complete):
    satellite/<panoId>_sampled_<i>.jpg   600x600 JPEG crops, i = 0 positive, 1..3 semi-positives
    centers.txt                          "<panoId>_sampled_<i>.jpg: (x, y)" panorama position in the crop, px
    splits/train.txt, splits/test.txt    VIGOR 13-token label lines (deltas in px of the 640-px tile)
    splits/satellite_list_train.txt, splits/satellite_list_test.txt   crop names of that split
    resample_config.json                 seed, crop, sources, counts; written last = the run completed

Geometry. A crop starting at (x0, y0) holds the panorama at x = 600 - x0, y = 600 - y0. The positive starts in
[150, 450)^2, so x, y in (150, 450]: the crop's central region. A semi-positive starts in [0, 600)^2 with at
least one coordinate outside [150, 450), so x, y in (0, 600] with x or y in (0, 150] U (450, 600]: the panorama
is always inside the crop (on its right/bottom edge when x0 or y0 = 0), never in its central region.
VIGOR deltas: dy = (y - 300) * 640/600, dx = (300 - x) * 640/600, so row = 320 + dy, col = 320 - dx in the
640-px version of the crop. Ranges: positive dy in (-160, 160], dx in [-160, 160); semi-positive
dy in (-320, 320], dx in [-320, 320) with |dy| or |dx| >= 160. No delta exceeds +-320.

The original release's Samples_on_CVACT.py set no seed. Here the crops of the panorama at 0-based position i of
panoIds come from numpy.random.default_rng([seed, i]): the same seed gives byte-identical outputs, and a
panorama's crops do not depend on which validation set is chosen.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np

from geoloc.data import images
from geoloc.data.geometry import TILE_PX
from geoloc.data.act_data import load_act_data

AERIAL_SIZE = 1200  # px, side of a satview_polish aerial; the panorama sits at (AERIAL_SIZE/2, AERIAL_SIZE/2)
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------- crops

def _crop_ranges(size, crop):
    """([lo, hi) of a positive's start, [lo, hi) of a semi-positive's start), per axis, px."""
    if size % 2 or crop % 4 or not 0 < crop <= size // 2:
        raise ValueError(f'need an even aerial size and a crop divisible by 4 with 0 < crop <= size/2, '
                         f'got size {size}, crop {crop}')
    centre = size // 2
    positive = (centre - 3 * crop // 4, centre - crop // 4)  # panorama in the crop's central half
    semi = (centre - crop, centre)                            # panorama anywhere in the crop
    return positive, semi


def sample_crops(rng, size=AERIAL_SIZE, crop=600):
    """Four (x0, y0) top-left starts, px, of crops of a size x size aerial with the panorama at its centre.

    Crop 0 (positive): x0, y0 uniform integers in [size/2 - 3crop/4, size/2 - crop/4) = [150, 450).
    Crops 1-3 (semi-positives): uniform in [size/2 - crop, size/2)^2 = [0, 600)^2, redrawn until at least one
    coordinate is outside the positive range.
    """
    (p_lo, p_hi), (s_lo, s_hi) = _crop_ranges(size, crop)
    starts = [tuple(int(v) for v in rng.integers(p_lo, p_hi, size=2))]
    while len(starts) < 4:
        x0, y0 = (int(v) for v in rng.integers(s_lo, s_hi, size=2))
        if not (p_lo <= x0 < p_hi and p_lo <= y0 < p_hi):
            starts.append((x0, y0))
    return starts


def crop_name(pano_id, i):
    return f'{pano_id}_sampled_{i}.jpg'


def vigor_delta(x, y, crop=600):
    """(dy, dx) in px of the 640-px tile for a panorama at (x, y) px of a crop x crop image."""
    scale = TILE_PX / crop
    return (y - crop / 2) * scale, (crop / 2 - x) * scale


# ----------------------------------------------------------------------------- resampling

def _write_text(path, lines):
    """Write lines via a .tmp file and a rename, so a reader never sees half a file."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(line + '\n' for line in lines)
    os.replace(tmp, path)


def _read_aerial(path, index):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: aerial missing (panoIds entry {index + 1} of ACT_data.mat)')
    with open(path, 'rb') as f:
        data = f.read()
    images.check_complete(path, data)   # OpenCV would decode a truncated aerial, its missing rows flat grey
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # (H, W, 3) uint8 BGR
    if image is None:
        raise ValueError(f'{path}: unreadable image')
    h, w = image.shape[:2]
    if (h, w) != (AERIAL_SIZE, AERIAL_SIZE):
        raise ValueError(f'{path}: expected a {AERIAL_SIZE}x{AERIAL_SIZE} aerial, got {w}x{h}')
    return image


def resample(cvact_root, out_root, seed=0, crop=600, progress=True, val_set=None):
    """Cut 4 crops from the aerial of every panorama of the train and val/test sets; write the layout above.

    Panoramas of panoIds that no split lists are left out (counted in the summary). Returns a summary dict
    (the contents of resample_config.json plus 'out_root'). Raises FileNotFoundError / ValueError naming the
    offending file (a missing, unreadable, truncated or wrongly sized aerial among them). The output is built
    in a temporary sibling of out_root and renamed into place when complete: a failed run leaves out_root as
    it was (absent or empty), so the same command runs again.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    _crop_ranges(AERIAL_SIZE, crop)
    if os.path.isdir(out_root) and os.listdir(out_root):
        raise ValueError(f'{out_root}: output folder is not empty; remove it or choose another')
    mat_path = os.path.join(cvact_root, 'ACT_data.mat')
    act = load_act_data(mat_path, val_set=val_set)
    pano_ids = act['pano_ids']
    splits = {'train': act['train_idx'], 'test': act['val_idx']}
    used = np.unique(np.concatenate([splits['train'], splits['test']]))  # sorted 0-based indices
    overlap = len(np.intersect1d(splits['train'], splits['test']))
    if len({pano_ids[i] for i in used}) != len(used):
        raise ValueError(f'{mat_path}: the train and val sets list two entries with the same panoId')

    # Every ground panorama the split files will name must exist; checked before any work is done.
    for i in used:
        grd = os.path.join(cvact_root, 'streetview', f'{pano_ids[i]}_grdView.jpg')
        if not os.path.isfile(grd):
            raise FileNotFoundError(f'{grd}: panorama missing (panoIds entry {i + 1} of ACT_data.mat)')

    parent = os.path.dirname(os.path.abspath(out_root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_root))}.tmp-', dir=parent)
    try:
        summary = _resample_into(staging, cvact_root, mat_path, act, splits, used, overlap, seed, crop, progress,
                                 out_root)
        os.chmod(staging, 0o755)
        if os.path.isdir(out_root):
            os.rmdir(out_root)        # empty (checked above): the complete output takes its place
        os.rename(staging, out_root)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return dict(summary, out_root=os.path.abspath(out_root))


def _resample_into(out_root, cvact_root, mat_path, act, splits, used, overlap, seed, crop, progress, shown):
    """resample's work, written into the staging folder out_root; -> resample_config.json's contents."""
    pano_ids = act['pano_ids']
    sat_dir = os.path.join(out_root, 'satellite')
    split_dir = os.path.join(out_root, 'splits')
    os.makedirs(sat_dir, exist_ok=True)
    os.makedirs(split_dir, exist_ok=True)
    if progress:
        print(f'samples_on_cvact: {len(used)} aerials (train {len(splits["train"])}, test {len(splits["test"])} '
              f'from {act["val_set"]}, {overlap} in both; {len(pano_ids) - len(used)} panoIds in no split left out) '
              f'-> {shown}', flush=True)

    centres = {}  # 0-based pano index -> [(x, y)] * 4, panorama position in each crop, px
    centre = AERIAL_SIZE // 2
    step = max(1, -(-len(used) // 10))
    start = time.time()
    for k, i in enumerate(used, 1):
        path = os.path.join(cvact_root, 'satview_polish', f'{pano_ids[i]}_satView_polish.jpg')
        aerial = _read_aerial(path, i)  # (1200, 1200, 3)
        starts = sample_crops(np.random.default_rng([seed, int(i)]), AERIAL_SIZE, crop)
        centres[i] = []
        for j, (x0, y0) in enumerate(starts):
            ok, data = cv2.imencode('.jpg', np.ascontiguousarray(aerial[y0:y0 + crop, x0:x0 + crop]),
                                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise ValueError(f'{path}: JPEG encoding of crop {j} failed')
            with open(os.path.join(sat_dir, crop_name(pano_ids[i], j)), 'wb') as f:
                f.write(data.tobytes())
            centres[i].append((centre - x0, centre - y0))
        if progress and (k % step == 0 or k == len(used)):
            print(f'samples_on_cvact: {k}/{len(used)} aerials, {4 * k} crops, {time.time() - start:.1f} s', flush=True)

    # Text outputs only now, each written whole; the config last marks the run complete.
    _write_text(os.path.join(out_root, 'centers.txt'),
                [f'{crop_name(pano_ids[i], j)}: ({x}, {y})' for i in used for j, (x, y) in enumerate(centres[i])])
    for split, idx in splits.items():
        lines, names = [], []
        for i in idx:
            tokens = [f'{pano_ids[i]}_grdView.jpg']
            for j, (x, y) in enumerate(centres[i]):
                dy, dx = vigor_delta(x, y, crop)
                tokens += [crop_name(pano_ids[i], j), f'{dy:.6f}', f'{dx:.6f}']
                names.append(crop_name(pano_ids[i], j))
            lines.append(' '.join(tokens))
        _write_text(os.path.join(split_dir, f'satellite_list_{split}.txt'), names)
        _write_text(os.path.join(split_dir, f'{split}.txt'), lines)
    config = {'seed': int(seed), 'crop': crop, 'aerial_size': AERIAL_SIZE, 'tile': TILE_PX,
              'jpeg_quality': JPEG_QUALITY, 'cvact_root': os.path.abspath(cvact_root), 'act_data': os.path.abspath(mat_path),
              'val_set': act['val_set'], 'n_pano_ids': len(pano_ids), 'n_aerials': len(used),
              'n_crops': 4 * len(used), 'n_train': len(splits['train']), 'n_test': len(splits['test']),
              'n_train_test_overlap': overlap, 'n_left_out': len(pano_ids) - len(used)}
    tmp = os.path.join(out_root, 'resample_config.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, os.path.join(out_root, 'resample_config.json'))
    if progress:
        print(f'samples_on_cvact: done, {4 * len(used)} crops in {time.time() - start:.1f} s', flush=True)
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cvact_root', required=True, help='folder with ACT_data.mat, streetview/, satview_polish/')
    parser.add_argument('--out', required=True, help='output folder (must be empty or absent)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--crop', type=int, default=600, help='crop side, px of the 1200-px aerial')
    parser.add_argument('--val_set', choices=['valSetAll', 'valSet'], default=None,
                        help='test split source (default: valSetAll if ACT_data.mat has it, else valSet)')
    args = parser.parse_args(argv)
    try:
        resample(args.cvact_root, args.out, seed=args.seed, crop=args.crop, val_set=args.val_set)
    except (ValueError, OSError) as e:   # bad input: one line and status 2, as the stage scripts
        print(f'samples_on_cvact: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
