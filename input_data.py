"""VIGOR and CVACT on disk: split parsing, validation, image decoding and batch sampling.

This is the one place that knows the datasets' file layout (SPEC §1, §7): VIGOR's split files,
CVACT's ACT_data.mat and the resampled CVACT of samples_on_cvact.py. Everything takes explicit
arguments; nothing reads flags. Bad input raises DataError with a one-line message naming the file
(and line) and what was expected. No TensorFlow here: pipeline.py builds the tf.data datasets.
"""
import dataclasses
import io
import os
import threading

import cv2
import numpy as np
import scipy.io
from PIL import Image

from geometry import CORRECTED_MPP, CROSS_AREA, ORIGINAL_MPP, VGG_MEAN_BGR, VIGOR_CITIES, delta_to_position


class DataError(ValueError):
    """Bad dataset input; str() is a one-line message naming the file (and line)."""


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
    if not os.path.isfile(path):
        _fail(f'{path}: {what} not found')
    with open(path) as f:
        lines = [(i + 1, line.strip()) for i, line in enumerate(f)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        _fail(f'{path}: {what} is empty')
    return lines


def parse_label_file(path):
    """13-token VIGOR label lines -> list of (line_no, pano, [4 tile names], (4, 2) deltas)."""
    out, seen = [], {}
    for n, line in _read_lines(path, 'split file'):
        tok = line.split()
        if len(tok) != 13:
            _fail(f'{path}:{n}: expected 13 space-separated tokens '
                  f'(pano sat dy dx + 3 x semi dy dx), got {len(tok)}')
        try:
            deltas = np.array([[float(tok[2 + 3 * k]), float(tok[3 + 3 * k])] for k in range(4)], np.float32)
        except ValueError:
            _fail(f'{path}:{n}: a delta is not a number')
        if not np.all(np.isfinite(deltas)):
            _fail(f'{path}:{n}: a delta is not finite')
        if tok[0] in seen:
            _fail(f'{path}:{n}: panorama {tok[0]} listed twice (first at line {seen[tok[0]]})')
        seen[tok[0]] = n
        out.append((n, tok[0], [tok[1 + 3 * k] for k in range(4)], deltas))
    return out


def vigor_pano_latlon(name):
    """`<panoid>,<lat>,<lon>,.jpg` -> (lat, lon)."""
    parts = name.split(',')
    return float(parts[1]), float(parts[2])


def vigor_sat_latlon(name):
    """`satellite_<lat>_<lon>.png` -> (lat, lon)."""
    parts = name[:-4].split('_')
    return float(parts[1]), float(parts[2])


def vigor_split_file(root, city, split, area, labels):
    """Path of a city's label file for ('train'|'test', 'same'|'cross', 'original'|'corrected')."""
    stem = f'same_area_balanced_{split}' if area == 'same' else 'pano_label_balanced'
    if labels == 'corrected':
        return os.path.join(root, 'splits__corrected', city, f'{stem}__corrected.txt')
    return os.path.join(root, 'splits', city, f'{stem}.txt')


def load_vigor(root, split, area='same', labels='original', cities=None):
    """Parse and validate one VIGOR split. Same-area references: every tile of all cities;
    cross-area: the tiles of that side's cities (train NewYork+Seattle, test SanFrancisco+Chicago)."""
    if not os.path.isdir(root):
        _fail(f'{root}: VIGOR dataset root not found (see data/DATASET.md)')
    if area not in ('same', 'cross') or split not in ('train', 'test') or labels not in ('original', 'corrected'):
        _fail(f'unknown split {split!r} / area {area!r} / labels {labels!r}')
    cities = tuple(cities or (VIGOR_CITIES if area == 'same' else CROSS_AREA[split]))
    tile_paths, tile_index, tile_city = [], {}, []
    for ci, city in enumerate(cities):
        list_path = os.path.join(root, 'splits', city, 'satellite_list.txt')
        for n, name in _read_lines(list_path, 'satellite list'):
            if name in tile_index:
                _fail(f'{list_path}:{n}: tile {name} listed twice')
            tile_index[name] = len(tile_paths)
            tile_paths.append(os.path.join(root, city, 'satellite', name))
            tile_city.append(ci)
    tile_centres = np.array([vigor_sat_latlon(os.path.basename(p)) for p in tile_paths], np.float64)

    pano_paths, tiles, deltas, mpp, pano_gps = [], [], [], [], []
    for city in cities:
        path = vigor_split_file(root, city, split, area, labels)
        city_mpp = CORRECTED_MPP.get(city, ORIGINAL_MPP) if labels == 'corrected' else ORIGINAL_MPP
        for n, pano, names, d in parse_label_file(path):
            idx = []
            for k, name in enumerate(names):
                if name not in tile_index:
                    if k == 0:
                        _fail(f'{path}:{n}: tile {name} is not in satellite_list.txt of {cities}')
                    idx.append(-1)  # a semi-positive outside the reference set (cross-area border)
                else:
                    idx.append(tile_index[name])
            try:
                pano_gps.append(vigor_pano_latlon(pano))
            except (IndexError, ValueError):
                _fail(f'{path}:{n}: panorama name {pano} is not <id>,<lat>,<lon>,.jpg')
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


# ----------------------------------------------------------------------------- CVACT: ACT_data.mat, resampled crops

def _as_strings(value):
    """Flatten whatever loadmat made of a MATLAB char matrix / cell array of strings into a list of str."""
    if isinstance(value, bytes):
        return [value.decode()]
    if isinstance(value, str):
        return [value]
    arr = np.asarray(value)
    if arr.dtype.kind in 'US':
        if arr.dtype.itemsize == np.dtype(arr.dtype.kind + '1').itemsize and arr.ndim >= 2:
            arr = np.array([''.join(row) for row in arr.reshape(-1, arr.shape[-1])])  # chars_as_strings=False
        return [s.decode() if isinstance(s, bytes) else str(s) for s in arr.ravel()]
    if arr.dtype == object:
        out = []
        for element in arr.ravel():  # a cell array: one (possibly wrapped) string per cell
            strings = _as_strings(element)
            if len(strings) > 1:
                raise TypeError('a cell holds several strings')
            out.append(strings[0] if strings else '')
        return out
    raise TypeError(f'not strings: dtype {arr.dtype}')


def _unwrap(value):
    """Strip the 1x1 object arrays loadmat wraps around struct fields and cells."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]
    return value


def _struct_field(struct, name):
    """struct.name for every shape loadmat gives a MATLAB struct (record array, 0-d, mat_struct, dict)."""
    struct = _unwrap(struct)
    if isinstance(struct, dict):
        return struct.get(name)
    if isinstance(struct, (np.ndarray, np.void)) and struct.dtype.names is not None:
        if name not in struct.dtype.names:
            return None
        if struct.size != 1:
            raise TypeError(f'a {struct.shape} struct array, expected a single struct')
        return struct[name] if isinstance(struct, np.void) else struct.reshape(-1)[0][name]
    if hasattr(struct, '_fieldnames'):  # struct_as_record=False
        return getattr(struct, name, None)
    return None


def parse_act_data(mat, source='ACT_data.mat', val_set=None):
    """The dict of load_act_data from an already loaded .mat (any loadmat squeeze_me / struct_as_record mode).

    source: the file name used in error messages. val_set: 'valSetAll', 'valSet' or None (valSetAll if present).
    """
    def fail(what):
        raise ValueError(f'{source}: {what}')

    for key in ('panoIds', 'utm', 'trainSet'):
        if key not in mat:
            fail(f"missing field '{key}'")
    try:
        pano_ids = [s.strip().strip('\x00') for s in _as_strings(mat['panoIds'])]
    except TypeError as e:
        fail(f'panoIds is not a list of strings ({e})')
    n = len(pano_ids)
    for i, pid in enumerate(pano_ids):
        if not pid or any(c.isspace() for c in pid) or '/' in pid:
            fail(f'panoIds entry {i + 1} = {pid!r} is empty or holds whitespace or "/"')

    utm = np.asarray(_unwrap(mat['utm']), dtype=np.float64)
    if utm.shape == (2, n) and n != 2:
        utm = utm.T  # stored as 2xN
    if utm.shape != (n, 2):
        fail(f'utm has shape {utm.shape}, expected ({n}, 2) for {n} panoIds')

    def indices(struct_name, field):
        if struct_name not in mat:
            fail(f"missing field '{struct_name}'")
        try:
            value = _struct_field(mat[struct_name], field)
        except TypeError as e:
            fail(f'{struct_name} is not a struct ({e})')
        if value is None:
            fail(f"missing field '{struct_name}.{field}'")
        idx = np.atleast_1d(np.asarray(_unwrap(value), dtype=np.float64)).ravel()
        if idx.size == 0:
            fail(f'{struct_name}.{field} is empty')
        bad = idx[(idx != np.round(idx)) | (idx < 1) | (idx > n)]
        if bad.size:
            fail(f'{struct_name}.{field} holds index {bad[0]:g} outside 1..{n} (1-based MATLAB indices)')
        return idx.astype(np.int64) - 1

    if val_set is None:
        val_set = 'valSetAll' if 'valSetAll' in mat else 'valSet'
    if val_set not in ('valSetAll', 'valSet'):
        raise ValueError(f"val_set must be 'valSetAll' or 'valSet', got {val_set!r}")
    return {'pano_ids': pano_ids, 'utm': utm, 'train_idx': indices('trainSet', 'trainInd'),
            'val_idx': indices(val_set, 'valInd'), 'val_set': val_set}


def load_act_data(mat_path, val_set=None):
    """Read CVACT's ACT_data.mat.

    Returns {'pano_ids': list[str] (N), 'utm': (N, 2) float64 easting/northing metres, 'train_idx': int64 0-based
    indices of trainSet.trainInd, 'val_idx': 0-based indices of valSetAll.valInd if present else valSet.valInd
    (or of the set named by val_set), 'val_set': the set used}. Raises ValueError naming the file and the field.
    """
    if not os.path.isfile(mat_path):
        raise FileNotFoundError(f'{mat_path}: no such file')
    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as e:  # scipy raises several types for a corrupt file
        raise ValueError(f'{mat_path}: not a readable .mat file ({e})') from None
    return parse_act_data(mat, source=mat_path, val_set=val_set)


def load_cvact(cvact_root, resampled_root, split, mpp_1200):
    """Resampled CVACT (samples_on_cvact.py) in VIGOR line format; geometry from ACT_data.mat UTM.

    mpp_1200: metres per pixel of the original 1200x1200 aerial; a 600-px crop shown as a 640-px
    tile has mpp_1200 * 600 / 640 m/px.
    """
    for d, what in ((cvact_root, 'CVACT root'), (resampled_root, 'resampled CVACT (run samples_on_cvact.py)')):
        if not os.path.isdir(d):
            _fail(f'{d}: {what} not found')
    act = load_act_data(os.path.join(cvact_root, 'ACT_data.mat'))
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


# ----------------------------------------------------------------------------- images

def _jpeg_colour_size(data):
    """(height, width) of a 3-component (colour) JPEG from its header, read by Pillow; None for any
    other JPEG or a header Pillow cannot read (OpenCV then decodes, or rejects, the whole file)."""
    try:
        with Image.open(io.BytesIO(data), formats=('JPEG',)) as img:     # reads the header only
            return (img.height, img.width) if img.mode == 'RGB' else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(path, min_hw=None):
    """The 8-bit BGR(A) or grayscale pixels of a JPEG/PNG file and its (height, width) on file; DataError
    naming what is wrong.

    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey), so a JPEG
    must end with its end-of-image marker and a PNG with its IEND chunk. With min_hw, a 3-component
    JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT (the largest
    reduction that keeps both sides >= min_hw): a 2048x1024 panorama read at 320x640 costs 2.2x less
    than a full decode + area resize, read at 64x128 5.0x less, for a result within 0.35 grey levels on
    average (benchmarks/bench_decode.py).
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        _fail(f'{path}: unreadable image ({e.strerror})')
    if not data:
        _fail(f'{path}: unreadable image (empty file)')
    flags, shape = cv2.IMREAD_UNCHANGED, None
    if data[:2] == b'\xff\xd8':
        if b'\xff\xd9' not in data[-64:]:
            _fail(f'{path}: truncated JPEG (no end-of-image marker)')
        shape = _jpeg_colour_size(data) if min_hw is not None else None
        if shape is not None:
            factor = max((f for f in (2, 4, 8) if -(-shape[0] // f) >= min_hw[0] and -(-shape[1] // f) >= min_hw[1]),
                         default=1)
            if factor > 1:
                flags = _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    if data[:8] == b'\x89PNG\r\n\x1a\n' and b'IEND' not in data[-64:]:
        _fail(f'{path}: truncated PNG (no IEND chunk)')
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        _fail(f'{path}: unreadable image (missing, corrupt or not JPEG/PNG)')
    return img, (shape or img.shape[:2])


def load_image(path, hw, kind):
    """Read with OpenCV (BGR), check, resize with INTER_AREA to hw = (H, W). Returns uint8 [H, W, 3].

    kind: 'panorama' (expects W = 2H) or 'aerial' (expects a square).
    """
    if isinstance(path, bytes):
        path = path.decode()
    img, (h, w) = decode_image(path, hw)
    if img.dtype != np.uint8:
        _fail(f'{path}: expected 8 bits per channel, got {img.dtype}')
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        _fail(f'{path}: expected a 3-channel colour {kind}, got a grayscale image')
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if kind == 'panorama' and w != 2 * h:
        _fail(f'{path}: wrong size: expected a 360-degree panorama with width = 2 x height, got {w}x{h}')
    if kind == 'aerial' and w != h:
        _fail(f'{path}: wrong size: expected a square aerial image, got {w}x{h}')
    if img.shape[:2] != tuple(hw):
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def read_image(path, hw, kind):
    """load_image minus the VGG mean: the network's float32 [H, W, 3] input."""
    return load_image(path, hw, kind).astype(np.float32) - np.array(VGG_MEAN_BGR, np.float32)


class ImageCache:
    """Decoded, resized images (uint8) kept in memory, up to max_bytes.

    The first images read are kept and never evicted (no lock-step LRU churn when the data set is
    larger than the budget: the hit rate is then the budget's share of the data). A training run
    reads every image once per epoch, so from the second epoch on a data set that fits (the demo
    city, or VIGOR at demo size) costs a copy instead of a decode.
    """

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.images, self.lock = {}, threading.Lock()
        self.hits = self.misses = 0

    def load(self, path, hw, kind):
        key = (path, tuple(hw))
        img = self.images.get(key)
        if img is not None:
            self.hits += 1
            return img
        self.misses += 1
        img = load_image(path, hw, kind)
        with self.lock:
            if key not in self.images and self.bytes + img.nbytes <= self.max_bytes:
                self.images[key] = img
                self.bytes += img.nbytes
        return img


# ----------------------------------------------------------------------------- training batches

class BatchSampler:
    """Training batches with no aerial tile twice (SPEC §2), reproducible from (seed, epoch).

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
