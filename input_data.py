"""VIGOR and CVACT on disk: split parsing, validation and batch sampling.

This is the one place that knows the datasets' file layout (docs/design.md §1, §7): VIGOR's split files,
the resampled CVACT of samples_on_cvact.py (ACT_data.mat: act_data.py; image files: images.py). Everything takes explicit
arguments; nothing reads flags. Bad input raises DataError with a one-line message naming the file
(and line) and what was expected. No TensorFlow here: pipeline.py builds the tf.data datasets.
"""
import dataclasses
import json
import os

import numpy as np

from geoloc.data.geometry import CORRECTED_MPP, CROSS_AREA, ORIGINAL_MPP, TILE_PX, VIGOR_CITIES, delta_to_position
from geoloc.errors import DataError  # noqa: F401 (raised here, caught as <module>.<name>)


@dataclasses.dataclass
class Split:
    """One split: queries (panoramas), the reference set (aerial tiles) and their geometry.

    tiles[q] = reference indices of (positive, semi1, semi2, semi3); -1 = not in the reference set.
    deltas[q] = (dy, dx) per tile, pixels of the 640-px tile. positions are (lat, lon) degrees when
    metric == 'haversine', (north, east) metres when metric == 'euclidean'.
    """
    name: str
    pano_paths: list
    tile_paths: list
    tiles: np.ndarray          # (Q, 4) int64
    deltas: np.ndarray         # (Q, 4, 2) float32
    mpp: np.ndarray            # (Q,) float64, metres per pixel of the 640-px tile
    tile_centres: np.ndarray   # (N, 2)
    gt_positions: np.ndarray   # (Q, 2)
    metric: str

    def __len__(self):
        return len(self.pano_paths)


def _fail(msg):
    raise DataError(msg)


def _read_lines(path, what):
    """The non-blank lines of a UTF-8 text file as (line number, stripped text); a byte-order mark is dropped."""
    if not os.path.isfile(path):
        _fail(f'{path}: {what} not found')
    with open(path, 'rb') as f:
        data = f.read()
    lines = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode('utf-8-sig' if n == 1 else 'utf-8')
        except UnicodeDecodeError as e:
            _fail(f'{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})')
        if line.strip():
            lines.append((n, line.strip()))
    if not lines:
        _fail(f'{path}: {what} is empty')
    return lines


# The label format's bounds (docs/design.md §1): the positive tile holds the panorama, so |dy|, |dx| <= 320 px of
# the 640-px tile; the four tiles are a 2x2 block of a grid of step 320 px, so a semi-positive's delta is
# the positive's +-320 in each coordinate: |dy|, |dx| <= 640 (corrected labels put some beyond the
# tile's own 320, legitimately; nothing can lie beyond 640).
MAX_POSITIVE_DELTA_PX = TILE_PX / 2
MAX_SEMI_DELTA_PX = TILE_PX


def parse_label_file(path):
    """13-token VIGOR label lines -> list of (line_no, pano, [4 tile names], (4, 2) deltas).

    Deltas must be finite and within the format's bounds (MAX_POSITIVE_DELTA_PX for the positive,
    MAX_SEMI_DELTA_PX for the semi-positives); names are checked by the callers."""
    out, seen = [], {}
    for n, line in _read_lines(path, 'split file'):
        tok = line.split()
        if len(tok) != 13:
            _fail(f'{path}:{n}: expected 13 space-separated tokens '
                  f'(pano sat dy dx + 3 x semi dy dx), got {len(tok)}')
        try:
            deltas = np.array([[float(tok[2 + 3 * k]), float(tok[3 + 3 * k])] for k in range(4)], np.float64)
        except ValueError:
            _fail(f'{path}:{n}: a delta is not a number')
        if not np.all(np.isfinite(deltas)):
            _fail(f'{path}:{n}: a delta is not finite')
        for k in range(4):
            bound = MAX_POSITIVE_DELTA_PX if k == 0 else MAX_SEMI_DELTA_PX
            if np.abs(deltas[k]).max() > bound:
                what = 'positive' if k == 0 else f'semi-positive {k}'
                _fail(f'{path}:{n}: {what} delta ({deltas[k, 0]:g}, {deltas[k, 1]:g}) px lies beyond '
                      f'+-{bound:g} px (pixels of the 640-px tile; ' +
                      ('the panorama must lie in its positive tile)' if k == 0 else
                       'a semi-positive is the positive tile\'s neighbour in a grid of step 320 px)'))
        if tok[0] in seen:
            _fail(f'{path}:{n}: panorama {tok[0]} listed twice (first at line {seen[tok[0]]})')
        seen[tok[0]] = n
        out.append((n, tok[0], [tok[1 + 3 * k] for k in range(4)], deltas.astype(np.float32)))
    return out


def _check_latlon(lat, lon):
    if not -90 <= lat <= 90:      # (False for nan)
        raise ValueError(f'latitude {lat:g} is not in [-90, 90]')
    if not -180 <= lon <= 180:
        raise ValueError(f'longitude {lon:g} is not in [-180, 180]')
    return lat, lon


def vigor_pano_latlon(name):
    """`<panoid>,<lat>,<lon>,.jpg` -> (lat, lon); ValueError unless both are finite and in range."""
    parts = name.split(',')
    if len(parts) != 4 or not parts[0]:
        raise ValueError('expected <id>,<lat>,<lon>,.jpg')
    return _check_latlon(float(parts[1]), float(parts[2]))


def vigor_sat_latlon(name):
    """`satellite_<lat>_<lon>.png` -> (lat, lon); ValueError unless both are finite and in range."""
    parts = name[:-4].split('_')
    if len(parts) != 3 or parts[0] != 'satellite' or name[-4:] not in ('.png', '.jpg'):
        raise ValueError('expected satellite_<lat>_<lon>.png')
    return _check_latlon(float(parts[1]), float(parts[2]))


def vigor_split_file(root, city, split, area, labels):
    """Path of a city's label file for ('train'|'test', 'same'|'cross', 'original'|'corrected')."""
    stem = f'same_area_balanced_{split}' if area == 'same' else 'pano_label_balanced'
    if labels == 'corrected':
        return os.path.join(root, 'splits__corrected', city, f'{stem}__corrected.txt')
    return os.path.join(root, 'splits', city, f'{stem}.txt')


def vigor_satellite_list(root, city, labels):
    """Path of a city's satellite_list.txt: splits/<City>/ or splits__corrected/<City>/, the labels' own
    folder first (SliceMatch's folder holds the list too, and its README has users replace splits/ by
    it); DataError naming both places when neither has it."""
    folders = ('splits__corrected', 'splits') if labels == 'corrected' else ('splits', 'splits__corrected')
    paths = [os.path.join(root, f, city, 'satellite_list.txt') for f in folders]
    for p in paths:
        if os.path.isfile(p):
            return p
    _fail(f'{paths[0]}: satellite list not found (nor at {paths[1]})')


def load_vigor(root, split, area='same', labels='original', cities=None):
    """Parse and validate one VIGOR split. Same-area references: every tile of all cities;
    cross-area: the tiles of that side's cities (train NewYork+Seattle, test SanFrancisco+Chicago)."""
    if not os.path.isdir(root):
        _fail(f'{root}: VIGOR dataset root not found (see data/DATASET.md)')
    if area not in ('same', 'cross') or split not in ('train', 'test') or labels not in ('original', 'corrected'):
        _fail(f'unknown split {split!r} / area {area!r} / labels {labels!r}')
    cities = tuple(cities or (VIGOR_CITIES if area == 'same' else CROSS_AREA[split]))
    tile_paths, tile_index, tile_centres = [], {}, []
    for city in cities:
        list_path = vigor_satellite_list(root, city, labels)
        for n, name in _read_lines(list_path, 'satellite list'):
            if name in tile_index:
                _fail(f'{list_path}:{n}: tile {name} listed twice')
            try:
                tile_centres.append(vigor_sat_latlon(name))
            except (ValueError, IndexError) as e:
                _fail(f'{list_path}:{n}: tile name {name}: {e}')
            tile_index[name] = len(tile_paths)
            tile_paths.append(os.path.join(root, city, 'satellite', name))
    tile_centres = np.array(tile_centres, np.float64)

    pano_paths, tiles, deltas, mpp, pano_gps = [], [], [], [], []
    for city in cities:
        path = vigor_split_file(root, city, split, area, labels)
        city_mpp = CORRECTED_MPP.get(city, ORIGINAL_MPP) if labels == 'corrected' else ORIGINAL_MPP
        for n, pano, names, d in parse_label_file(path):
            idx = [tile_index.get(name, -1) for name in names]
            if idx[0] < 0:
                _fail(f'{path}:{n}: tile {names[0]} is not in satellite_list.txt of {cities}')
            if max(idx[1:]) < 0:  # one may lie outside the reference set (a city's border), not all three
                _fail(f'{path}:{n}: none of the semi-positive tiles {", ".join(names[1:])} is in '
                      f'satellite_list.txt of {cities}')
            try:
                pano_gps.append(vigor_pano_latlon(pano))
            except (IndexError, ValueError) as e:
                _fail(f'{path}:{n}: panorama name {pano}: {e}')
            pano_paths.append(os.path.join(root, city, 'panorama', pano))
            tiles.append(idx)
            deltas.append(d)
            mpp.append(city_mpp)
    tiles = np.array(tiles, np.int64)
    deltas = np.stack(deltas).astype(np.float32)
    mpp = np.array(mpp, np.float64)
    if labels == 'corrected':  # the corrected deltas, not the names' GPS, are the ground truth
        gt = delta_to_position(tile_centres[tiles[:, 0]], deltas[:, 0].astype(np.float64), mpp, 'haversine')
    else:
        gt = np.array(pano_gps, np.float64)
    _check_exist(pano_paths, 'panorama')
    _check_exist(tile_paths, 'aerial tile')
    return Split(f'VIGOR {area}-area {split} ({labels} labels)', pano_paths, tile_paths, tiles, deltas,
                 mpp, tile_centres, gt, 'haversine')


def _check_exist(paths, what):
    for p in paths:
        if not os.path.isfile(p):
            _fail(f'{p}: {what} not found')


def check_cvact_root(root):
    """A --dataset cvact root holds CVACT's ACT_data.mat: said first, before anything else is asked of the tree
    (its --cvact_mpp); DataError naming the file otherwise, and a VIGOR tree by name."""
    if not os.path.isdir(root):
        _fail(f'{root}: CVACT root not found')
    mat_path = os.path.join(root, 'ACT_data.mat')
    if not os.path.isfile(mat_path):
        vigor = any(os.path.isdir(os.path.join(root, d)) for d in ('splits', 'splits__corrected'))
        _fail(f'{mat_path}: CVACT ACT_data.mat not found: {root} holds no CVACT data'
              + ('; it is a VIGOR tree (leave out --dataset cvact)' if vigor else ' (see data/DATASET.md)'))


def load_cvact(cvact_root, resampled_root, split, mpp_1200):
    """Resampled CVACT (samples_on_cvact.py) in VIGOR line format; geometry from ACT_data.mat UTM.

    mpp_1200: metres per pixel of the original 1200x1200 aerial; a 600-px crop shown as a 640-px
    tile has mpp_1200 * 600 / 640 m/px.
    """
    for d, what in ((cvact_root, 'CVACT root'), (resampled_root, 'resampled CVACT (run samples_on_cvact.py)')):
        if not os.path.isdir(d):
            _fail(f'{d}: {what} not found')
    from geoloc.data.act_data import load_act_data
    mat_path = os.path.join(cvact_root, 'ACT_data.mat')
    if not os.path.isfile(mat_path):
        _fail(f'{mat_path}: CVACT ACT_data.mat not found')
    try:
        act = load_act_data(mat_path)
    except (OSError, ValueError) as e:  # act_data's messages name the file and the field
        _fail(str(e).splitlines()[0])
    utm = {pid: act['utm'][i] for i, pid in enumerate(act['pano_ids'])}
    name = 'train' if split == 'train' else 'test'
    list_path = os.path.join(resampled_root, 'splits', f'satellite_list_{name}.txt')
    tile_names = [t for _, t in _read_lines(list_path, 'satellite list')]
    tile_index = {t: i for i, t in enumerate(tile_names)}
    tile_paths = [os.path.join(resampled_root, 'satellite', t) for t in tile_names]
    mpp = mpp_1200 * 600.0 / 640.0
    path = os.path.join(resampled_root, 'splits', f'{name}.txt')
    pano_paths, tiles, deltas, gt = [], [], [], []
    tile_centres = np.full((len(tile_names), 2), np.nan)
    for n, pano, names, d in parse_label_file(path):
        pid = pano[:-len('_grdView.jpg')] if pano.endswith('_grdView.jpg') else pano
        if pid not in utm:
            _fail(f'{path}:{n}: panorama {pid} is not in ACT_data.mat')
        east, north = utm[pid]
        idx = []
        for k, t in enumerate(names):
            if t not in tile_index:
                _fail(f'{path}:{n}: tile {t} is not in {list_path}')
            idx.append(tile_index[t])
            # the crop's centre lies (dy, dx) px north/east of the panorama (VIGOR convention)
            tile_centres[tile_index[t]] = (north + d[k, 0] * mpp, east + d[k, 1] * mpp)
        pano_paths.append(os.path.join(cvact_root, 'streetview', pano))
        tiles.append(idx)
        deltas.append(d)
        gt.append((north, east))
    if np.isnan(tile_centres).any():
        _fail(f'{list_path}: some tiles belong to no panorama of {path}')
    _check_exist(pano_paths, 'panorama')
    _check_exist(tile_paths, 'aerial crop')
    q = len(pano_paths)
    return Split(f'CVACT {name}', pano_paths, tile_paths, np.array(tiles, np.int64),
                 np.stack(deltas).astype(np.float32), np.full(q, mpp), tile_centres,
                 np.array(gt, np.float64), 'euclidean')


PREPARED = 'prepared.json'   # written last by prepare_data.py in a resized copy: its sizes


def check_prepared(root, grd_hw, sat_side):
    """A copy written by prepare_data.py holds its images at one size: refuse a run that reads them at another
    (it would resize resized images, or upscale them). A tree without the marker passes."""
    path = os.path.join(root, PREPARED)
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            made = json.load(f)
        grd, sat = tuple(made['grd_size']), made['sat_size']
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(f'{path}: unreadable marker of a prepared copy ({type(e).__name__}); prepare it again')
    if grd != tuple(grd_hw) or sat != sat_side:
        _fail(f'{path}: this copy holds images prepared for --grd_size {grd[0]} {grd[1]} --sat_size {sat}, this run '
              f'reads --grd_size {grd_hw[0]} {grd_hw[1]} --sat_size {sat_side}; use those sizes, the original tree '
              'or another copy (prepare_data.py)')


# ----------------------------------------------------------------------------- training batches

class BatchSampler:
    """Training batches with no aerial tile twice (docs/design.md §2), reproducible from (seed, epoch).

    Each slot picks a random positive tile, then a random panorama whose positive it is; a panorama
    is rejected if any of its 4 tiles is already among the batch's tiles. With a hard-negative table
    (hard[p] = tile ids ranked close to panorama p), half of the batch is random and each of those
    items brings one panorama whose positive is among its hard tiles.
    """

    def __init__(self, split, batch, seed, steps_per_epoch=None, max_tries=100):
        self.split, self.batch, self.seed, self.max_tries = split, batch, seed, max_tries
        self.panos_of_tile = {}
        for p, t in enumerate(split.tiles[:, 0]):
            self.panos_of_tile.setdefault(int(t), []).append(p)
        self.pos_tiles = np.array(sorted(self.panos_of_tile), np.int64)
        self.steps_per_epoch = len(split) // batch if steps_per_epoch is None else steps_per_epoch
        if self.steps_per_epoch == 0:
            _fail(f'{split.name}: {len(split)} panoramas: an epoch of no step (batch {batch})')
        if len(self.pos_tiles) < batch:
            _fail(f'{split.name}: only {len(self.pos_tiles)} positive tiles, a batch of {batch} '
                  'needs that many distinct tiles')

    def _tiles(self, p):
        return [int(t) for t in self.split.tiles[p] if t >= 0]

    def _try_add(self, p, chosen, used):
        tiles = self._tiles(p)
        if p in chosen or any(t in used for t in tiles):
            return False
        chosen.append(p)
        used.update(tiles)
        return True

    def _random_item(self, rng, chosen, used):
        for _ in range(self.max_tries * 10):
            t = self.pos_tiles[rng.integers(len(self.pos_tiles))]
            cands = self.panos_of_tile[int(t)]
            if self._try_add(cands[rng.integers(len(cands))], chosen, used):
                return True
        return False

    def epoch_plan(self, epoch, hard=None):
        """-> (panos [steps, B] int64, semi choice [steps, B] int64 in 1..3) for this epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        panos = np.zeros((self.steps_per_epoch, self.batch), np.int64)
        for s in range(self.steps_per_epoch):
            chosen, used = [], set()
            n_random = self.batch if hard is None else (self.batch + 1) // 2
            while len(chosen) < n_random:
                if not self._random_item(rng, chosen, used):
                    _fail(f'{self.split.name}: cannot fill a batch of {self.batch} without repeating a tile')
            if hard is not None:
                for anchor in list(chosen):
                    if len(chosen) == self.batch:
                        break
                    for _ in range(self.max_tries):
                        t = int(hard[anchor][rng.integers(hard.shape[1])])
                        cands = self.panos_of_tile.get(t)
                        if cands and self._try_add(cands[rng.integers(len(cands))], chosen, used):
                            break
                    else:
                        self._random_item(rng, chosen, used)
                while len(chosen) < self.batch:
                    if not self._random_item(rng, chosen, used):
                        _fail(f'{self.split.name}: cannot fill a batch of {self.batch} without repeating a tile')
            panos[s] = chosen
        semi = self._semi_choice(rng, panos)
        return panos, semi

    def _semi_choice(self, rng, panos):
        """One random semi-positive (1..3) per item among those in the reference set."""
        semi = np.zeros(panos.shape, np.int64)
        for idx in np.ndindex(panos.shape):
            valid = [k for k in (1, 2, 3) if self.split.tiles[panos[idx], k] >= 0]
            semi[idx] = valid[rng.integers(len(valid))]
        return semi


def reference_subset(split, queries, n, seed):
    """split[queries] ranked against n reference tiles only: every positive and semi-positive tile of the
    queries, then distractors drawn with `seed` from the rest (all of them when n is smaller than that);
    -> a Split of those queries whose tiles index the kept tiles, in the original order."""
    queries = np.asarray(queries)
    needed = np.unique(split.tiles[queries][split.tiles[queries] >= 0])
    rest = np.setdiff1d(np.arange(len(split.tile_paths)), needed)
    extra = np.random.default_rng(seed).permutation(rest)[:max(0, n - len(needed))]
    kept = np.sort(np.concatenate([needed, extra])).astype(np.int64)
    new_index = np.full(len(split.tile_paths), -1, np.int64)
    new_index[kept] = np.arange(len(kept))
    tiles = split.tiles[queries]
    return dataclasses.replace(
        split, name=f'{split.name} ({len(kept)} of {len(split.tile_paths)} references)',
        pano_paths=[split.pano_paths[q] for q in queries], tile_paths=[split.tile_paths[k] for k in kept],
        tiles=np.where(tiles >= 0, new_index[np.maximum(tiles, 0)], -1), deltas=split.deltas[queries],
        mpp=split.mpp[queries], tile_centres=split.tile_centres[kept], gt_positions=split.gt_positions[queries])

