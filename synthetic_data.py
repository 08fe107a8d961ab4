"""Small deterministic synthetic datasets in the exact on-disk layouts of VIGOR and raw CVACT.

They exist so the real loaders can be tested end to end and a short CPU training run can show
retrieval far above chance, without the 100+ GB real datasets.

    python synthetic_data.py vigor --root data/synthetic_vigor      # 4 cities x 36 tiles x 2 panoramas
    python synthetic_data.py cvact --root data/synthetic_cvact      # 40 panoramas, 1200x1200 aerials

Both commands are idempotent: the dataset is built in `<root>.tmp-XXXX`, a marker file
`<root>/.synthetic_complete` (the generator's arguments as JSON) is written, and the folder is renamed
into place; a later call with the same arguments returns at once.

The scene: one seeded aerial raster per city (background tint, saturated blocks, grey roads with
white/yellow markings, green trees). Aerial tiles are crops of it; a panorama is rendered from the same
raster at the panorama's point, so a network can learn to match the two.

Panorama convention (both datasets): north-aligned equirectangular 360 deg, H x W with W = 2H.
Column c looks at azimuth theta = 2*pi*(c + 0.5)/W - pi, clockwise from north (pano_azimuth): the left
edge looks south, column W/4 west, the centre (between columns W/2-1 and W/2) north, 3W/4 east.
Rows [H/2, H) are the ground seen from above (pano_ground_distance_m: GROUND_FAR_M at the horizon,
~0 at the bottom row); rows [0, H/2) are sky with facades whose colour is the aerial raster FACADE_M
metres away in that direction.

Geometry (VIGOR): a tile is 640 px "of the 640-px tile" across; the true ground resolution of the
rendered images is CORRECTED_MPP[city] m per px of the 640-px tile (geometry.py). Tile centres form a
grid x grid lattice with step 320 px (50 % overlap), centred on CITY_ORIGIN[city]. Row i of the lattice
runs north to south, column j west to east. The original labels (splits/) divide metres by
ORIGINAL_MPP = 0.114, VIGOR's real mistake; the corrected labels (splits__corrected/) divide by
CORRECTED_MPP[city], like SliceMatch's.
"""
import argparse
import inspect
import json
import math
import os
import shutil
import tempfile
import zlib

import cv2
import numpy as np
import scipy.io

from geometry import CORRECTED_MPP, ORIGINAL_MPP, TILE_PX, VIGOR_CITIES, gps_delta_px, latlon_offset

# Metres per pixel of a synthetic 1200x1200 CVACT aerial: Google zoom 20 at Canberra is ~0.122 m/px,
# so a 600x600 crop of the CVACT resampler covers ~72 m, about one VIGOR 640-px tile (~73 m).
CVACT_MPP_1200 = 0.12

CITY_ORIGIN = {'NewYork': (40.75, -73.98), 'Seattle': (47.61, -122.33),
               'SanFrancisco': (37.77, -122.42), 'Chicago': (41.88, -87.63)}
CVACT_UTM_ORIGIN = (693000.0, 6091000.0)   # (easting, northing) of raster pixel (0, 0), UTM 55H (Canberra)
MARKER = '.synthetic_complete'
PANOID_ALPHABET = np.array(list('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'))

# Scene and camera sizes, metres (1 px of the 640-px tile is ~0.11 m).
BLOCK_M = (4.5, 28.0)            # block side, ~40-250 px of the 640-px tile
ROAD_SPACING_M = (24.0, 38.0)
ROAD_WIDTH_M = (2.2, 3.6)
TREE_RADIUS_M = (0.8, 2.6)
TINT_CELL_M = 40.0               # cell of the low-frequency background colour field
DISTRICT_M = 50.0                # districts whose blocks share a hue
DISTRICT_SHARE = 0.7             # fraction of blocks that take their district's hue
GROUND_FAR_M = 25.0              # ground distance at the horizon row, ~220 px of the 640-px tile
FACADE_M = 28.0                  # facades show the aerial colour this far away, ~250 px
VIGOR_MARGIN_PX640 = 352         # raster margin around the outer tile centres, > 320 and > FACADE_M
OFFSET_RANGE_PX640 = (24.0, 150.0)   # |dy|, |dx| of a panorama from its positive tile's centre


# ----------------------------------------------------------------------------------------- names
def _float6(x):
    """The value a 6-decimal file name gives back when parsed."""
    return float('%.6f' % x)


def vigor_pano_name(panoid, lat, lon):
    return '%s,%.6f,%.6f,.jpg' % (panoid, lat, lon)


def vigor_sat_name(lat, lon):
    return 'satellite_%r_%r.png' % (float(lat), float(lon))


# ----------------------------------------------------------------------------------------- rendering
def _hsv_colours(hsv):
    """[N, 3] uint8 HSV (OpenCV ranges) -> [N, 3] uint8 BGR."""
    return cv2.cvtColor(hsv.reshape(1, -1, 3).astype(np.uint8), cv2.COLOR_HSV2BGR).reshape(-1, 3)


def _draw_city(rng, height_px, width_px, px_per_m):
    """Seeded aerial raster, [height_px, width_px, 3] uint8 BGR, north up, px_per_m raster px per metre."""
    height_m, width_m = height_px / px_per_m, width_px / px_per_m
    fix = 8.0 * px_per_m                      # metres -> fixed-point pixels for OpenCV's shift=3

    def pts(xy_m):                            # [K, 2] (x, y) metres -> int32 fixed-point
        return np.round(np.asarray(xy_m) * fix).astype(np.int32)

    # Background: a smooth random colour field, so distant places differ even between the blocks.
    cells = rng.integers(70, 190, size=(int(height_m // TINT_CELL_M) + 2, int(width_m // TINT_CELL_M) + 2, 3))
    raster = cv2.resize(cells.astype(np.uint8), (width_px, height_px), interpolation=cv2.INTER_CUBIC)

    # Blocks: rotated rectangles and convex polygons in saturated colours. Most take a hue near their
    # district's (so places differ at the scale of a tile), the rest any hue (golden-ratio steps, distinct).
    n_blocks = int(0.9 * height_m * width_m / (np.mean(BLOCK_M) ** 2))
    district_hue = rng.uniform(0, 180, size=(int(height_m // DISTRICT_M) + 1, int(width_m // DISTRICT_M) + 1))
    centres = rng.uniform(0, 1, size=(n_blocks, 2)) * (width_m, height_m)        # (x, y) metres
    hues = (rng.uniform() + 0.618034 * np.arange(n_blocks)) % 1.0 * 180
    local = rng.uniform(size=n_blocks) < DISTRICT_SHARE
    near = district_hue[(centres[:, 1] // DISTRICT_M).astype(int), (centres[:, 0] // DISTRICT_M).astype(int)]
    hues[local] = (near[local] + rng.normal(0, 10, local.sum())) % 180
    hsv = np.stack([hues, rng.uniform(150, 255, n_blocks), rng.uniform(110, 245, n_blocks)], 1)
    colours = _hsv_colours(hsv)
    for k in range(n_blocks):
        cx, cy = centres[k]
        w, h = rng.uniform(*BLOCK_M, size=2)
        if rng.uniform() < 0.5:
            poly = cv2.boxPoints(((cx, cy), (w, h), rng.uniform(0, 90)))
        else:
            ang = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 9)))
            rad = rng.uniform(0.6, 1.0, ang.size)
            poly = np.stack([cx + 0.5 * w * rad * np.cos(ang), cy + 0.5 * h * rad * np.sin(ang)], 1)
        cv2.fillPoly(raster, [pts(poly)], colours[k].tolist(), cv2.LINE_AA, shift=3)

    # Roads on a jittered grid, with dashed white or yellow centre markings on some of them.
    def road_positions(extent):
        p, out = -rng.uniform(0, ROAD_SPACING_M[1]), []
        while p < extent + ROAD_SPACING_M[1]:
            out.append(p)
            p += rng.uniform(*ROAD_SPACING_M)
        return out

    for vertical in (False, True):
        extent, length = (width_m, height_m) if vertical else (height_m, width_m)
        for p in road_positions(extent):
            a, b = p + rng.uniform(-3, 3), p + rng.uniform(-3, 3)
            ends = np.array([[a, -5.0], [b, length + 5.0]] if vertical else [[-5.0, a], [length + 5.0, b]])  # (x, y)
            width = max(1, int(round(rng.uniform(*ROAD_WIDTH_M) * px_per_m)))
            grey = int(rng.uniform(75, 115))
            cv2.line(raster, *map(tuple, pts(ends).tolist()), (grey, grey, grey + 5), width, cv2.LINE_AA, shift=3)
            if rng.uniform() < 0.6:
                colour = (235, 235, 235) if rng.uniform() < 0.5 else (40, 200, 230)
                n_dash = int(np.hypot(*(ends[1] - ends[0])) // 6.0)
                for d in range(n_dash):       # 3 m dash, 3 m gap
                    seg = ends[0] + (ends[1] - ends[0]) * np.array([[d], [d + 0.5]]) / n_dash
                    cv2.line(raster, *map(tuple, pts(seg).tolist()), colour, max(1, int(round(0.25 * px_per_m))),
                             cv2.LINE_AA, shift=3)

    # Trees: green blobs, some in small clusters.
    n_trees = int(height_m * width_m / 150.0)
    for _ in range(n_trees):
        cx, cy = rng.uniform(0, width_m), rng.uniform(0, height_m)
        colour = (int(rng.uniform(20, 60)), int(rng.uniform(95, 160)), int(rng.uniform(20, 70)))
        for _ in range(rng.integers(1, 4)):
            c = pts([cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)])
            r = int(round(rng.uniform(*TREE_RADIUS_M) * fix))
            cv2.circle(raster, tuple(c.tolist()), max(r, 8), colour, -1, cv2.LINE_AA, shift=3)
    return raster


def _facade_source(raster, px_per_m):
    """Blurred copy of the raster at ~1 px per metre for the facade colours: (image, its px per metre)."""
    f = max(1, int(px_per_m))
    h, w = raster.shape[0] // f * f, raster.shape[1] // f * f
    small = cv2.resize(raster[:h, :w], (w // f, h // f), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (0, 0), 1.5 * px_per_m / f), px_per_m / f


def _jitter(img, rng):
    """Mild per-image brightness jitter and Gaussian noise (std 3), so no two images are pixel-identical."""
    out = img.astype(np.float32)
    out *= rng.uniform(0.96, 1.04)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 3.0
    out += noise
    out += 0.5                                    # round, not truncate, in the cast below
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def pano_azimuth(pano_w):
    """(W,) azimuth of each panorama column, radians clockwise from north: 0 between columns W/2-1 and
    W/2 (centre = north), +pi/2 at column 3W/4 (east), -pi/2 at W/4 (west), -pi at the left edge (south)."""
    return 2 * np.pi * (np.arange(pano_w) + 0.5) / pano_w - np.pi


def pano_ground_distance_m(pano_h):
    """(H - H//2,) ground distance, metres, seen by each row of the panorama's lower half (rows H//2 ..
    H-1): GROUND_FAR_M just below the horizon, falling to ~0 at the bottom row."""
    t = (np.arange(pano_h - pano_h // 2) + 0.5) / (pano_h - pano_h // 2)   # 0 at the horizon, 1 at the bottom
    return GROUND_FAR_M * (1.0 - t) ** 1.5


def _render_panorama(raster, facade, px_per_m, y_m, x_m, pano_hw, rng):
    """North-aligned panorama [H, W, 3] uint8 BGR seen from raster point (y_m south, x_m east), metres.
    facade: _facade_source(raster, px_per_m). Azimuth convention: see the module docstring."""
    h, w = pano_hw
    half = h // 2
    theta = pano_azimuth(w)                                            # (W,) clockwise from north
    north, east = np.cos(theta), np.sin(theta)
    r = pano_ground_distance_m(h)                                      # (H/2,) metres
    # Raster pixel k covers [k, k+1) in continuous coordinates; remap samples at index coordinates.
    map_x = ((x_m + r[:, None] * east[None]) * px_per_m - 0.5).astype(np.float32)   # (H/2, W)
    map_y = ((y_m - r[:, None] * north[None]) * px_per_m - 0.5).astype(np.float32)
    ground = cv2.remap(raster, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    s = ((np.arange(half) + 0.5) / half)[:, None, None]               # 0 at the top, 1 at the horizon
    sky = (1 - s) * np.array([200.0, 140.0, 85.0]) + s * np.array([240.0, 220.0, 205.0])   # BGR
    sky = np.broadcast_to(sky, (half, w, 3))
    facade_img, facade_px_per_m = facade
    fx = ((x_m + FACADE_M * east) * facade_px_per_m - 0.5).astype(np.float32)[None]
    fy = ((y_m - FACADE_M * north) * facade_px_per_m - 0.5).astype(np.float32)[None]
    colour = cv2.remap(facade_img, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    colour = colour.astype(np.float32)                                 # (1, W, 3)
    height = half * (0.15 + 0.6 * colour.mean(-1) / 255.0)            # (1, W) facade height, rows
    is_facade = (half - np.arange(half))[:, None] <= height            # (H/2, W)
    upper = np.where(is_facade[..., None], 0.65 * colour, sky)
    return _jitter(np.concatenate([upper, ground.astype(np.float32)], 0), rng)


def _panoid(rng):
    return ''.join(PANOID_ALPHABET[rng.integers(0, 64, 22)])


def _imwrite(path, img, params=()):
    if not cv2.imwrite(path, img, list(params)):
        raise IOError('cv2.imwrite failed for %s' % path)


def _check_pano_hw(pano_hw):
    h, w = pano_hw
    if h < 4 or h % 2 or w != 2 * h:
        raise ValueError('pano_hw must be (H, 2H) with H even and >= 4, got %r' % (tuple(pano_hw),))


# ----------------------------------------------------------------------------------------- VIGOR
def _write_vigor_city(root, city, seed, grid, tile_px, pano_hw, panos_per_tile):
    """One city: tiles, panoramas and its six label files. Returns its counts."""
    rng = np.random.default_rng([seed, zlib.crc32(city.encode())])
    unit_m = CORRECTED_MPP[city]                   # metres per px of the 640-px tile
    scale = tile_px / TILE_PX                      # raster px per px of the 640-px tile
    px_per_m = scale / unit_m
    half_px = tile_px // 2
    margin_px = int(math.ceil(VIGOR_MARGIN_PX640 * scale))
    side_px = 2 * margin_px + (grid - 1) * half_px
    raster = _draw_city(rng, side_px, side_px, px_per_m)
    facade = _facade_source(raster, px_per_m)

    # Tile (i, j): centre at raster coordinate margin_px + (i, j) * half_px, i.e. the crop is exact.
    lat0, lon0 = CITY_ORIGIN[city]
    centre_m = (margin_px + 0.5 * (grid - 1) * half_px) / px_per_m      # lattice centre = city origin
    tile_m = (margin_px + np.arange(grid) * half_px) / px_per_m          # (grid,) centre y or x, metres
    sat_dir = os.path.join(root, city, 'satellite')
    pano_dir = os.path.join(root, city, 'panorama')
    os.makedirs(sat_dir, exist_ok=True)
    os.makedirs(pano_dir, exist_ok=True)
    sat_name, sat_ll = {}, {}
    for i in range(grid):
        for j in range(grid):
            lat, lon = latlon_offset(lat0, lon0, centre_m - tile_m[i], tile_m[j] - centre_m)
            sat_ll[i, j] = (float(lat), float(lon))
            sat_name[i, j] = vigor_sat_name(lat, lon)
            r0, c0 = margin_px + (i - 1) * half_px, margin_px + (j - 1) * half_px
            _imwrite(os.path.join(sat_dir, sat_name[i, j]), _jitter(raster[r0:r0 + tile_px, c0:c0 + tile_px], rng))

    lines = {mpp: [] for mpp in (ORIGINAL_MPP, unit_m)}
    panoids = set()
    for i in range(grid):
        for j in range(grid):
            for _ in range(panos_per_tile):
                # Side of the centre the panorama lies on; towards the interior on the lattice border,
                # so the whole 2x2 block exists. sy = +1: south (dy > 0); sx = +1: west (dx > 0).
                sy = 1 if i == 0 else -1 if i == grid - 1 else int(rng.choice([-1, 1]))
                sx = -1 if j == 0 else 1 if j == grid - 1 else int(rng.choice([-1, 1]))
                dy, dx = rng.uniform(*OFFSET_RANGE_PX640, size=2) * (sy, sx)
                lat, lon = latlon_offset(lat0, lon0, centre_m - (tile_m[i] + dy * unit_m),
                                         (tile_m[j] - dx * unit_m) - centre_m)
                lat, lon = _float6(lat), _float6(lon)   # what the file name says; labels use these
                panoid = _panoid(rng)
                while panoid in panoids:
                    panoid = _panoid(rng)
                panoids.add(panoid)
                name = vigor_pano_name(panoid, lat, lon)
                block = [(i, j), (i + sy, j), (i, j - sx), (i + sy, j - sx)]   # positive first
                for mpp, out in lines.items():
                    tokens = [name]
                    for tile in block:
                        d = gps_delta_px(*sat_ll[tile], lat, lon, mpp)
                        tokens += [sat_name[tile], '%.6f' % d[0], '%.6f' % d[1]]
                    out.append(' '.join(tokens))
                # Render where the corrected label puts it relative to the positive tile.
                dy_c, dx_c = gps_delta_px(*sat_ll[i, j], lat, lon, unit_m)
                img = _render_panorama(raster, facade, px_per_m, tile_m[i] + dy_c * unit_m,
                                       tile_m[j] - dx_c * unit_m, pano_hw, rng)
                _imwrite(os.path.join(pano_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])

    n = len(lines[unit_m])
    perm = rng.permutation(n)
    train, test = np.sort(perm[:n // 2]), np.sort(perm[n // 2:])
    for folder, suffix, mpp in (('splits', '', ORIGINAL_MPP), ('splits__corrected', '__corrected', unit_m)):
        split_dir = os.path.join(root, folder, city)
        os.makedirs(split_dir, exist_ok=True)
        for stem, idx in (('same_area_balanced_train', train), ('same_area_balanced_test', test),
                          ('pano_label_balanced', np.arange(n))):
            with open(os.path.join(split_dir, stem + suffix + '.txt'), 'w') as f:
                f.writelines(lines[mpp][k] + '\n' for k in idx)
    with open(os.path.join(root, 'splits', city, 'satellite_list.txt'), 'w') as f:
        f.writelines(sat_name[i, j] + '\n' for i in range(grid) for j in range(grid))
    return {'satellites': grid * grid, 'panoramas': n, 'train': len(train), 'test': len(test)}


def write_vigor(root, seed=0, cities=VIGOR_CITIES, grid=8,
                tile_px=128, pano_hw=(128, 256), panos_per_tile=2):
    """Write a synthetic VIGOR into `root` (SPEC 1 layout, original and corrected labels).

    tile_px: side of the aerial tiles (even), covering 640 px of the 640-px tile frame.
    pano_hw: (H, W) of the panoramas, W = 2H. Each of the grid x grid tiles of a city is the positive
    of exactly `panos_per_tile` panoramas; half of a city's panoramas are train, half test.
    A city's content depends only on (seed, city). Returns counts: per city and totals."""
    unknown = [c for c in cities if c not in CORRECTED_MPP]
    if unknown or not cities:
        raise ValueError('cities must be a non-empty subset of %s, got %r' % (sorted(CORRECTED_MPP), cities))
    if grid < 2:
        raise ValueError('grid must be >= 2 (a 2x2 block of tiles per panorama), got %r' % grid)
    if tile_px < 8 or tile_px % 2:
        raise ValueError('tile_px must be even and >= 8, got %r' % tile_px)
    if panos_per_tile < 1:
        raise ValueError('panos_per_tile must be >= 1, got %r' % panos_per_tile)
    _check_pano_hw(pano_hw)
    summary = {'cities': {}}
    for city in cities:
        summary['cities'][city] = counts = _write_vigor_city(root, city, seed, grid, tile_px, tuple(pano_hw),
                                                             panos_per_tile)
        print('synthetic VIGOR %-12s %3d tiles, %4d panoramas (%d train, %d test)'
              % (city, counts['satellites'], counts['panoramas'], counts['train'], counts['test']),
              flush=True)
    for key in ('satellites', 'panoramas', 'train', 'test'):
        summary[key] = sum(c[key] for c in summary['cities'].values())
    return summary


# ----------------------------------------------------------------------------------------- CVACT
def write_cvact(root, seed=0, n_panos=40, pano_hw=(128, 256), sat_px=1200, val_fraction=0.5):
    """Write a synthetic raw CVACT into `root` (SPEC 7 layout).

    Panoramas sit on a jittered lattice of one synthetic city, 0.6 aerial widths apart; each aerial is
    sat_px x sat_px, north-up, the panorama exactly at its centre (continuous coordinate sat_px/2),
    covering 1200 * CVACT_MPP_1200 metres. ACT_data.mat: panoIds (char matrix -> array of 22-char str),
    utm [N, 2] (easting, northing metres; east = +columns, north = -rows), trainSet.trainInd,
    valSet.valInd, valSetAll.valInd (1-based int32 column vectors; valSet = valSetAll)."""
    if n_panos < 2:
        raise ValueError('n_panos must be >= 2, got %r' % n_panos)
    if sat_px < 8 or sat_px % 2:
        raise ValueError('sat_px must be even and >= 8, got %r' % sat_px)
    n_val = int(round(n_panos * val_fraction))
    if not 0 < n_val < n_panos:
        raise ValueError('val_fraction=%r leaves train or val empty for n_panos=%d' % (val_fraction, n_panos))
    _check_pano_hw(pano_hw)
    rng = np.random.default_rng([seed, zlib.crc32(b'CVACT')])
    px_per_m = (sat_px / 1200.0) / CVACT_MPP_1200
    half_px = sat_px // 2
    spacing_px, jitter_px = int(round(0.6 * sat_px)), int(round(0.05 * sat_px))
    cols = int(math.ceil(math.sqrt(n_panos)))
    rows = int(math.ceil(n_panos / cols))
    margin_px = half_px + jitter_px
    raster = _draw_city(rng, 2 * margin_px + (rows - 1) * spacing_px, 2 * margin_px + (cols - 1) * spacing_px,
                        px_per_m)
    facade = _facade_source(raster, px_per_m)

    grd_dir, sat_dir = os.path.join(root, 'streetview'), os.path.join(root, 'satview_polish')
    os.makedirs(grd_dir, exist_ok=True)
    os.makedirs(sat_dir, exist_ok=True)
    slots = np.sort(rng.permutation(rows * cols)[:n_panos])
    ids, utm = [], []
    for slot in slots:
        # Panorama at the integer raster coordinate (py, px): the crop around it is exact.
        jitter = rng.integers(-jitter_px, jitter_px + 1, 2)
        py, px = margin_px + np.array(divmod(int(slot), cols)) * spacing_px + jitter
        panoid = _panoid(rng)
        while panoid in ids:
            panoid = _panoid(rng)
        ids.append(panoid)
        utm.append((CVACT_UTM_ORIGIN[0] + px / px_per_m, CVACT_UTM_ORIGIN[1] - py / px_per_m))
        aerial = _jitter(raster[py - half_px:py + half_px, px - half_px:px + half_px], rng)
        _imwrite(os.path.join(sat_dir, panoid + '_satView_polish.jpg'), aerial, [cv2.IMWRITE_JPEG_QUALITY, 92])
        img = _render_panorama(raster, facade, px_per_m, py / px_per_m, px / px_per_m, tuple(pano_hw), rng)
        _imwrite(os.path.join(grd_dir, panoid + '_grdView.jpg'), img, [cv2.IMWRITE_JPEG_QUALITY, 92])

    perm = rng.permutation(n_panos)
    val_ind = (np.sort(perm[:n_val]) + 1).astype(np.int32)[:, None]     # 1-based, column vectors
    train_ind = (np.sort(perm[n_val:]) + 1).astype(np.int32)[:, None]
    scipy.io.savemat(os.path.join(root, 'ACT_data.mat'), {
        'panoIds': np.array(ids, dtype='<U22'),
        'utm': np.array(utm, dtype=np.float64),
        'trainSet': {'trainInd': train_ind},
        'valSet': {'valInd': val_ind},
        'valSetAll': {'valInd': val_ind},
    })
    print('synthetic CVACT %d panoramas (%d train, %d val), %dx%d aerials'
          % (n_panos, len(train_ind), len(val_ind), sat_px, sat_px), flush=True)
    return {'panoramas': n_panos, 'train': len(train_ind), 'val': len(val_ind)}


# ----------------------------------------------------------------------------------------- ensure
def _ensure(writer, root, kwargs):
    """Build `root` with writer(tmp, **kwargs) in a sibling temp folder, mark it, rename it into place.
    Returns root at once if its marker holds the same (default-completed) arguments."""
    bound = inspect.signature(writer).bind(root, **kwargs)
    bound.apply_defaults()
    params = json.loads(json.dumps({k: v for k, v in bound.arguments.items() if k != 'root'}))
    marker = os.path.join(root, MARKER)

    def finished():
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            found = json.load(f)
        if found != params:
            raise ValueError('%s holds a synthetic dataset made with %s, not %s: delete it or use another root'
                             % (root, found, params))
        return True

    if finished():
        return root
    if os.path.exists(root):
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        else:
            raise FileExistsError('%s exists but is not a complete synthetic dataset (no %s): delete it'
                                  % (root, MARKER))
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(root)) + '.tmp-', dir=parent)
    try:
        os.chmod(tmp, 0o755)
        writer(tmp, **params)
        with open(os.path.join(tmp, MARKER), 'w') as f:
            json.dump(params, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not finished():              # another process finishing first is fine; anything else is not
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return root


def ensure_vigor(root, **kwargs):
    """Generate a synthetic VIGOR at `root` (kwargs of write_vigor) unless it is already complete."""
    return _ensure(write_vigor, root, kwargs)


def ensure_cvact(root, **kwargs):
    """Generate a synthetic raw CVACT at `root` (kwargs of write_cvact) unless it is already complete."""
    return _ensure(write_cvact, root, kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='dataset', required=True)
    vigor = sub.add_parser('vigor', help='synthetic VIGOR (SPEC 1 layout)')
    vigor.add_argument('--root', default='data/synthetic_vigor')
    vigor.add_argument('--seed', type=int, default=0)
    vigor.add_argument('--cities', nargs='+', default=['NewYork', 'Seattle', 'SanFrancisco', 'Chicago'])
    vigor.add_argument('--grid', type=int, default=8)
    vigor.add_argument('--tile_px', type=int, default=128)
    vigor.add_argument('--pano_h', type=int, default=128)
    vigor.add_argument('--pano_w', type=int, default=256)
    vigor.add_argument('--panos_per_tile', type=int, default=2)
    cvact = sub.add_parser('cvact', help='synthetic raw CVACT (SPEC 7 layout)')
    cvact.add_argument('--root', default='data/synthetic_cvact')
    cvact.add_argument('--seed', type=int, default=0)
    cvact.add_argument('--n_panos', type=int, default=40)
    cvact.add_argument('--pano_h', type=int, default=128)
    cvact.add_argument('--pano_w', type=int, default=256)
    cvact.add_argument('--sat_px', type=int, default=1200)
    cvact.add_argument('--val_fraction', type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.dataset == 'vigor':
        ensure_vigor(args.root, seed=args.seed, cities=tuple(args.cities), grid=args.grid, tile_px=args.tile_px,
                     pano_hw=(args.pano_h, args.pano_w), panos_per_tile=args.panos_per_tile)
    else:
        ensure_cvact(args.root, seed=args.seed, n_panos=args.n_panos, pano_hw=(args.pano_h, args.pano_w),
                     sat_px=args.sat_px, val_fraction=args.val_fraction)
    print('ready: %s' % args.root)


if __name__ == '__main__':
    main()
