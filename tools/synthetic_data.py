"""Small deterministic synthetic datasets in the exact on-disk layouts of VIGOR and raw CVACT.

They exist so the real loaders can be tested end to end and a short CPU training run can show
retrieval far above chance, without the 100+ GB real datasets.

    python tools/synthetic_data.py vigor --root data/synthetic_vigor   # 4 cities x 100 tiles (64 with 2 panoramas each)
    python tools/synthetic_data.py cvact --root data/synthetic_cvact   # 40 panoramas, 1200x1200 aerials, resampled

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
lattice with step 320 px (50 % overlap), centred on CITY_ORIGIN[city]: `grid` x `grid` tiles that
carry panoramas (each the positive of `panos_per_tile`), and one ring of reference-only tiles around
them, so a city has (grid + 2)^2 tiles (100 at the default grid 8), all in satellite_list.txt. Row i of
the lattice runs north to south, column j west to east, both from -1 to grid (-1 and grid: the ring).
A panorama stands at a random side of its positive tile's centre (south or north, west or east, each
with probability 1/2, on every tile), and its semi-positives are the other three tiles of the 2x2 block
on that side, which the ring makes exist everywhere: neither the side nor the block follows from the
tile's place on the lattice. Ring tiles are semi-positives, never positives. The original labels
(splits/) divide metres by ORIGINAL_MPP = 0.114, VIGOR's real mistake; the corrected labels
(splits__corrected/) divide by CORRECTED_MPP[city], like SliceMatch's. Both folders hold the same
satellite_list.txt.

Ambiguity dials (VIGOR only): write_vigor(..., ambiguity='mixed' or {dial: strength in [0, 1]}),
`python tools/synthetic_data.py vigor --ambiguity mixed` (or `--ambiguity overlap=1,aliasing=0.5`). Each
panorama gets a level in [0, 1] per dial (DIALS), written beside its city's labels in
splits/<City>/AMBIGUITY_FILE and splits__corrected/<City>/AMBIGUITY_FILE: a header line
`# pano overlap foreground viewpoint aliasing`, then `<pano file name> <4 levels, 4 decimals>` per
panorama (read_ambiguity_levels). The three rendering dials are drawn per panorama from the seed:
0 with probability DIAL_ZERO_SHARE = 0.4, else uniform in (0, strength], so under 'mixed' a dial's
median level is 1/6; they change the panorama, never the aerial.
- overlap (how much of what the panorama sees the aerial shares): fog hides what lies beyond a
  visibility radius that shrinks linearly from 32 m (nothing hidden) at level 0 to 4 m at level 1,
  where only a disc of radius ~35 px of the 640-px tile around the camera shows (the bottom ~30 % of the
  ground rows; at level 0.5 the radius is 18 m, the top ~20 % of the ground rows are hidden). The
  facades (FACADE_M) are gone from level ~0.2 on; the sky stays.
- foreground: cars, vans, trucks, pedestrians and bins standing 2.5-18 m from the camera, absent from
  the aerial, are added until they cover FOREGROUND_MAX_COVER * level (30 % at level 1) of the
  panorama; those taller than the 2.5-m camera cross the horizon, in front of the facades.
- viewpoint (and appearance): at level 1 the camera is 1.5 times higher or lower (every ground row
  sees 1.5 times farther or nearer ground, the facades look shorter or taller), tilted by 8 deg (the
  horizon becomes a sinusoid of the azimuth, 8 deg high), the light 1.5 times brighter or darker
  with a colour cast (per-channel log-gains of norm 0.25), and foliage turned 60 deg of hue from
  green to yellow (autumn). Level v scales each of these (the height ratio as 1.5 ** v).
- aliasing (perceptual aliasing) is a property of places, not a rendering knob. The city is cut
  into 60-m cells, and 40 % (times the strength) of them are rebuilt from repeated blocks: each
  district (chosen cells joined by their sides) tiles one of 3 motifs per city, a square patch of
  the city, with a period of 160-320 px of the 640-px tile (one that puts neighbouring tiles at
  least a quarter period out of phase: they are not copies of each other). A point of a district looks
  like the points one period east or south of it, in its own tile and its neighbours', and
  districts of one motif look alike; the aerial tiles show the repetition too. A panorama's level is measured, not
  drawn: the share of its visible scene pixels (ground and facades, not fogged or covered by
  objects) whose source lies in a repeated district; under 'mixed' (default demo city) 30 % of the
  panoramas are at 0, 14 % at 1, the median is 0.16.
The dials' random choices come from streams of their own: positions, names, labels and (without
aliasing) the tiles are the plain city's, and a panorama at levels 0 is the plain one, pixel for
pixel. VigorCityScene re-renders any panorama from its label and recorded levels;
`--preview DIR` writes PNG strips of the dials for a human to look at.
"""
import argparse
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import zlib

if __package__ in (None, ''):   # run as a file: the repository root on the import path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
import scipy.io

from geoloc.data.builtin import CVACT_MPP_1200, MARKER, VIGOR_LAYOUT
from geoloc.data.geometry import CORRECTED_MPP, ORIGINAL_MPP, TILE_PX, VIGOR_CITIES, gps_delta_px, latlon_offset


CITY_ORIGIN = {'NewYork': (40.75, -73.98), 'Seattle': (47.61, -122.33),
               'SanFrancisco': (37.77, -122.42), 'Chicago': (41.88, -87.63)}
CVACT_UTM_ORIGIN = (693000.0, 6091000.0)   # (easting, northing) of raster pixel (0, 0), UTM 55H (Canberra)
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

# Ambiguity dials (write_vigor(ambiguity=...); the module docstring says what each one means).
DIALS = ('overlap', 'foreground', 'viewpoint', 'aliasing')
AMBIGUITY_FILE = 'ambiguity_levels.txt'      # sidecar beside the label files of a city
AMBIGUITY_HEADER = '# pano ' + ' '.join(DIALS)
DIAL_ZERO_SHARE = 0.4            # a rendering dial is 0 for this share of panoramas, else uniform in (0, max]
FOG_CLEAR_M = 32.0               # overlap: visibility radius at level 0 (> FACADE_M + FOG_RAMP_M / 2: no fog)
FOG_NEAR_M = 4.0                 # ... at level 1, ~35 px of the 640-px tile; linear in between
FOG_RAMP_M = 3.0                 # fog opacity rises linearly over this distance around the radius
FOG_BGR = (205.0, 205.0, 205.0)
FOREGROUND_MAX_COVER = 0.3       # foreground: share of the panorama's pixels covered at level 1
FOREGROUND_DISTANCE_M = (2.5, 18.0)   # objects stand this far from the camera (log-uniform)
CAMERA_HEIGHT_M = 2.5            # objects taller than the camera cross the horizon, in front of the facades
FOREGROUND_KINDS = (             # kind, width m (side-on .. end-on), height m, share of the objects
    ('car', (1.8, 4.8), (1.4, 1.7), 0.40),
    ('van', (2.0, 6.0), (2.0, 2.7), 0.15),
    ('truck', (2.5, 12.0), (3.0, 4.0), 0.10),
    ('pedestrian', (0.45, 0.65), (1.5, 1.9), 0.25),
    ('bin', (0.5, 1.2), (0.8, 1.3), 0.10),
)
HEIGHT_RATIO_MAX = 1.5           # viewpoint: camera height x or / this at level 1 (every ground distance too)
TILT_MAX_DEG = 8.0               # ... camera tilt at level 1: the horizon is a sinusoid of this amplitude
LIGHT_GAIN_MAX = 1.5             # ... brightness x or / this at level 1
CAST_MAX = 0.25                  # ... colour cast: per-channel log-gains of this norm at level 1
SEASON_HUE_DEG = 60.0            # ... foliage hue turned this far from green towards yellow at level 1
ALIAS_CELL_M = 60.0              # aliasing: the city is cut into square cells of this side (~1.7 tile steps) ...
ALIAS_CELL_SHARE = 0.4           # ... of which this share (times the dial's strength) is rebuilt ...
ALIAS_MOTIFS = 3                 # ... from one of this many motifs: a square patch of the city, tiled ...
ALIAS_PERIOD_PX640 = (160.0, 320.0)   # ... with a period in this range, px of the 640-px tile


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


def _scene_layers(raster, facade, px_per_m, y_m, x_m, pano_hw, height_factor=1.0):
    """The panorama seen from raster point (y_m south, x_m east), metres, before noise: (img, where).

    img: [H, W, 3] float64 BGR in [0, 255]. where: dict of what each pixel shows, for the ambiguity
    dials: 'ground_m' (H/2,) ground distance of each lower-half row, metres; 'ground_src' (map_y, map_x)
    [H/2, W] raster pixels the ground rows sample; 'facade_src' (y, x) (W,) raster pixels each column's
    facade shows; 'is_facade' [H/2, W] bool, upper half. height_factor scales the camera height: every
    ground distance by it, the facades' apparent height by its inverse (1 = the plain camera).
    facade: _facade_source(raster, px_per_m). Azimuth convention: see the module docstring."""
    h, w = pano_hw
    half = h // 2
    theta = pano_azimuth(w)                                            # (W,) clockwise from north
    north, east = np.cos(theta), np.sin(theta)
    r = pano_ground_distance_m(h) * height_factor                     # (H/2,) metres
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
    height = half * (0.15 + 0.6 * colour.mean(-1) / 255.0) / height_factor   # (1, W) facade height, rows
    is_facade = (half - np.arange(half))[:, None] <= height            # (H/2, W)
    upper = np.where(is_facade[..., None], 0.65 * colour, sky)
    where = {'ground_m': r, 'ground_src': (map_y, map_x), 'is_facade': is_facade,
             'facade_src': ((y_m - FACADE_M * north) * px_per_m - 0.5, (x_m + FACADE_M * east) * px_per_m - 0.5)}
    return np.concatenate([upper, ground.astype(np.float32)], 0), where


def _render_panorama(raster, facade, px_per_m, y_m, x_m, pano_hw, rng):
    """North-aligned panorama [H, W, 3] uint8 BGR seen from raster point (y_m south, x_m east), metres,
    with the mild noise of _jitter drawn from rng. facade: _facade_source(raster, px_per_m)."""
    return _jitter(_scene_layers(raster, facade, px_per_m, y_m, x_m, pano_hw)[0], rng)


def _panoid(rng):
    return ''.join(PANOID_ALPHABET[rng.integers(0, 64, 22)])


def _imwrite(path, img, params=()):
    if not cv2.imwrite(path, img, list(params)):
        raise IOError('cv2.imwrite failed for %s' % path)


def _check_pano_hw(pano_hw):
    h, w = pano_hw
    if h < 4 or h % 2 or w != 2 * h:
        raise ValueError('pano_hw must be (H, 2H) with H even and >= 4, got %r' % (tuple(pano_hw),))


# ----------------------------------------------------------------------------------------- ambiguity dials
def ambiguity_strengths(ambiguity):
    """write_vigor's `ambiguity` argument -> None (plain city) or {dial: strength in [0, 1]} for all DIALS.

    None: no dial (today's city, byte for byte). 'mixed': every dial at strength 1. A dict
    {dial: strength}: the dials it names (missing ones 0). For overlap, foreground and viewpoint the
    strength is the highest level drawn; for aliasing it scales the share of the city rebuilt from
    repeated blocks (ALIAS_CELL_SHARE at 1)."""
    if ambiguity is None:
        return None
    if isinstance(ambiguity, str):
        if ambiguity != 'mixed':
            raise ValueError("ambiguity must be None, 'mixed' or a dict {dial: strength}, got %r" % ambiguity)
        return {dial: 1.0 for dial in DIALS}
    if not isinstance(ambiguity, dict):
        raise ValueError("ambiguity must be None, 'mixed' or a dict {dial: strength}, got %r" % (ambiguity,))
    unknown = sorted(set(ambiguity) - set(DIALS))
    if unknown:
        raise ValueError('ambiguity names unknown dials %s; the dials are %s' % (unknown, DIALS))
    out = {dial: float(ambiguity.get(dial, 0.0)) for dial in DIALS}
    bad = {d: v for d, v in out.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError('ambiguity strengths must lie in [0, 1], got %s' % bad)
    return out


def draw_ambiguity_levels(rng, strengths):
    """(overlap, foreground, viewpoint) levels of one panorama, rounded to the sidecar's 4 decimals:
    each 0 with probability DIAL_ZERO_SHARE, else uniform in (0, strength]."""
    levels = []
    for dial in DIALS[:3]:
        zero, u = rng.uniform(size=2)
        levels.append(0.0 if zero < DIAL_ZERO_SHARE or strengths[dial] == 0 else
                      max(1e-4, round(strengths[dial] * (1.0 - u), 4)))
    return tuple(levels)


def _repeat_districts(raster, rng, px_per_m, scale, half_px, share):
    """Perceptual aliasing, in place: rebuild a share of the raster's ALIAS_CELL_M cells from repeated
    blocks. Each district (chosen cells joined by their sides) shows one of ALIAS_MOTIFS motifs (a
    square patch of the city, side = its period P raster px) tiled with a phase common to the whole
    city, so every point of a district looks like the points k*P east or south of it, and districts of
    one motif look alike.
    A period never divides the tile step: neighbouring tiles differ by at least a quarter period.
    Returns period [H, W] int32: P at raster pixels in a repeated district, 0 elsewhere."""
    h, w = raster.shape[:2]
    lo, hi = (v * scale for v in ALIAS_PERIOD_PX640)
    allowed = [p for p in range(max(2, int(math.ceil(lo))), int(hi) + 1) if min(half_px % p, p - half_px % p) >= p / 4]
    periods, patches = [], []
    for _ in range(ALIAS_MOTIFS):
        p = int(rng.choice(allowed))       # never empty: [4/7, 4/5] * half_px holds an integer for half_px >= 4
        y0, x0 = rng.integers(0, h - p), rng.integers(0, w - p)
        periods.append(p)
        patches.append(raster[y0:y0 + p, x0:x0 + p].copy())
    cell = ALIAS_CELL_M * px_per_m
    off_y, off_x = rng.uniform(0, cell, 2)
    n_y, n_x = int((h + off_y) // cell) + 1, int((w + off_x) // cell) + 1
    chosen = rng.uniform(size=(n_y, n_x)) < share
    # A district (4-connected chosen cells) is built from one motif throughout.
    n_districts, district = cv2.connectedComponents(chosen.astype(np.uint8), connectivity=4)
    motif = rng.integers(0, ALIAS_MOTIFS, size=n_districts)[district]
    period = np.zeros((h, w), np.int32)
    for cy, cx in zip(*np.nonzero(chosen)):
        ya, yb = (int(round(np.clip(k * cell - off_y, 0, h))) for k in (cy, cy + 1))
        xa, xb = (int(round(np.clip(k * cell - off_x, 0, w))) for k in (cx, cx + 1))
        p, patch = periods[motif[cy, cx]], patches[motif[cy, cx]]
        raster[ya:yb, xa:xb] = patch[(np.arange(ya, yb) % p)[:, None], (np.arange(xa, xb) % p)[None]]
        period[ya:yb, xa:xb] = p
    return period


def _fog_transmittance(dist_m, overlap):
    """How much of the scene shows through the fog at distance dist_m (metres) for an overlap level:
    1 inside the visibility radius FOG_CLEAR_M - level * (FOG_CLEAR_M - FOG_NEAR_M), 0 beyond it,
    linear over FOG_RAMP_M around it."""
    radius = FOG_CLEAR_M - overlap * (FOG_CLEAR_M - FOG_NEAR_M)
    return np.clip((radius - dist_m) / FOG_RAMP_M + 0.5, 0.0, 1.0)


def _foreground_objects(rng, level, pano_hw, height_factor):
    """Vehicles, pedestrians and bins standing around the camera, absent from the aerial: objects are
    drawn until they cover FOREGROUND_MAX_COVER * level of the panorama (to within ~10 %).
    Returns (objects far to near, each (distance m, [(row0, row1, col0, col1, BGR)] parts), covered
    [H, W] bool)."""
    h, w = pano_hw
    half = h // 2
    target = FOREGROUND_MAX_COVER * level * h * w            # pixels
    tol = (0.005 + 0.1 * FOREGROUND_MAX_COVER * level) * h * w
    shares = np.array([k[3] for k in FOREGROUND_KINDS])
    covered = np.zeros((h, w), bool)
    objects, n_covered = [], 0
    for _ in range(400):
        if n_covered >= target - tol:
            break
        kind, width_m, height_m, _ = FOREGROUND_KINDS[rng.choice(len(FOREGROUND_KINDS), p=shares / shares.sum())]
        width, height = rng.uniform(*width_m), rng.uniform(*height_m)
        d = math.exp(rng.uniform(*np.log(FOREGROUND_DISTANCE_M)))
        col = rng.uniform(0, w)                           # centre column (continuous), any azimuth
        paint = _hsv_colours(np.array([[rng.uniform(0, 180), rng.uniform(60, 230), rng.uniform(40, 240)]]))[0]
        # Base on the ground row that sees distance d (the panorama's own ground mapping), top at the
        # elevation of the object's top seen from the camera height: tall vehicles cross the horizon.
        t = 1.0 - min(1.0, d / (GROUND_FAR_M * height_factor)) ** (2.0 / 3.0)
        base = half + t * (h - half)
        top = half - math.atan((height - CAMERA_HEIGHT_M * height_factor) / d) * h / math.pi
        half_cols = math.atan(width / (2 * d)) * w / (2 * math.pi)
        box = (top, base, col - half_cols, col + half_cols)
        dark = (30, 30, 35)
        if kind == 'pedestrian':
            parts = [((0.0, 0.14, 0.3, 0.7), (120, 150, 200)), ((0.14, 0.55, 0.0, 1.0), paint),
                     ((0.55, 1.0, 0.1, 0.9), (60, 50, 45))]
        elif kind == 'bin':
            parts = [((0.0, 1.0, 0.0, 1.0), (60, 90, 50)), ((0.0, 0.12, 0.0, 1.0), dark)]
        else:                                             # vehicle: body, windows, wheels
            parts = [((0.0, 0.88, 0.0, 1.0), paint), ((0.1, 0.45, 0.1, 0.9), (80, 70, 60)),
                     ((0.8, 1.0, 0.08, 0.3), dark), ((0.8, 1.0, 0.7, 0.92), dark)]
        rects = []
        for (fr0, fr1, fc0, fc1), bgr in parts:
            r0 = int(round(box[0] + fr0 * (box[1] - box[0])))
            r1 = max(r0 + 1, int(round(box[0] + fr1 * (box[1] - box[0]))))
            c0 = int(round(box[2] + fc0 * (box[3] - box[2])))
            c1 = max(c0 + 1, int(round(box[2] + fc1 * (box[3] - box[2]))))
            r0, r1 = max(r0, 0), min(r1, h)
            for shift in (-w, 0, w):                      # the azimuth wraps around
                a, b = max(c0 + shift, 0), min(c1 + shift, w)
                if r0 < r1 and a < b:
                    rects.append((r0, r1, a, b, tuple(float(v) for v in bgr)))
        mask = covered.copy()
        for r0, r1, c0, c1, _ in rects:
            mask[r0:r1, c0:c1] = True
        n_mask = np.count_nonzero(mask)
        if n_mask > target + tol:                         # too big for what is left: try another
            continue
        covered, n_covered = mask, n_mask
        objects.append((d, rects))
    objects.sort(key=lambda o: -o[0])
    return objects, covered


def _light_and_season(img, level, gain_sign, cast):
    """Lighting and season of the panorama against the aerial, float32 BGR [0, 255] -> same: foliage
    (green hues) turned level * SEASON_HUE_DEG towards yellow, brightness times LIGHT_GAIN_MAX **
    (gain_sign * level), a colour cast of per-channel log-gains level * CAST_MAX * cast (|cast| = 1)."""
    x = np.clip(img, 0, 255).astype(np.float32) / 255.0
    hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)                   # H in degrees [0, 360)
    green = np.clip(1.0 - np.abs(hsv[..., 0] - 120.0) / 45.0, 0, 1) * (hsv[..., 1] > 0.2)
    hsv[..., 0] = (hsv[..., 0] - level * SEASON_HUE_DEG * green) % 360.0
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gains = np.exp(level * (gain_sign * math.log(LIGHT_GAIN_MAX) + CAST_MAX * cast)).astype(np.float32)
    return x * (255.0 * gains)


class VigorCityScene:
    """One synthetic VIGOR city as write_vigor draws it, before any file is written: the aerial raster
    (with its repeated districts under an aliasing setting), the tile lattice, and a renderer that
    applies the ambiguity dials. Re-rendering a written panorama from its label and its recorded
    levels gives the file's pixels up to the JPEG and the noise of _jitter.

    rng: the city's main random stream, advanced past the raster: write_vigor draws the tiles'
    noise, the panoramas' positions and names and their noise from it, in that order, so the dials
    (drawn from streams of their own) leave all of that unchanged."""

    def __init__(self, seed, city, grid, tile_px, ambiguity=None):
        self.seed, self.city = seed, city
        self.strengths = ambiguity_strengths(ambiguity)
        self.rng = np.random.default_rng([seed, zlib.crc32(city.encode())])
        self.unit_m = CORRECTED_MPP[city]                        # metres per px of the 640-px tile
        scale = tile_px / TILE_PX                            # raster px per px of the 640-px tile
        self.px_per_m = scale / self.unit_m
        self.tile_px, self.half_px = tile_px, tile_px // 2
        self.margin_px = int(math.ceil(VIGOR_MARGIN_PX640 * scale))
        side_px = 2 * self.margin_px + (grid + 1) * self.half_px       # grid + 2 tile centres per side
        self.raster = _draw_city(self.rng, side_px, side_px, self.px_per_m)
        self.period_px = None           # [H, W] int32: the repetition period at raster pixels of repeated districts
        if self.strengths is not None and self.strengths['aliasing'] > 0:
            self.period_px = _repeat_districts(
                self.raster, self.stream(b'aliasing'), self.px_per_m, scale, self.half_px,
                ALIAS_CELL_SHARE * self.strengths['aliasing'])
        self.facade = _facade_source(self.raster, self.px_per_m)

        # Tile (i, j), i and j in -1 .. grid (-1 and grid: the ring): centre at raster coordinate
        # margin_px + (i + 1, j + 1) * half_px, i.e. the crop is exact.
        lat0, lon0 = CITY_ORIGIN[city]
        self.centre_m = (self.margin_px + 0.5 * (grid + 1) * self.half_px) / self.px_per_m   # = city origin
        self.tile_m = self.lattice_m(np.arange(grid))          # (grid,) metres, the tiles with panoramas
        self.cells = [(i, j) for i in range(-1, grid + 1) for j in range(-1, grid + 1)]   # row-major, ring included
        self.sat_name, self.sat_ll, self.sat_cell = {}, {}, {}
        for i, j in self.cells:
            lat, lon = latlon_offset(lat0, lon0, self.centre_m - self.lattice_m(i), self.lattice_m(j) - self.centre_m)
            self.sat_ll[i, j] = (float(lat), float(lon))
            self.sat_name[i, j] = vigor_sat_name(lat, lon)
            self.sat_cell[self.sat_name[i, j]] = (i, j)

    def lattice_m(self, i):
        """Raster coordinate, metres (south or east), of lattice row or column i (-1 .. grid)."""
        return (self.margin_px + (np.asarray(i) + 1) * self.half_px) / self.px_per_m

    def stream(self, tag):
        """A random stream of this city's own for one purpose, independent of the main stream."""
        return np.random.default_rng([self.seed, zlib.crc32(self.city.encode()), zlib.crc32(tag)])

    def tile(self, i, j):
        """Un-noised aerial tile (i, j), i and j in -1 .. grid, [tile_px, tile_px, 3] uint8 (a view of the raster)."""
        r0, c0 = self.margin_px + i * self.half_px, self.margin_px + j * self.half_px
        return self.raster[r0:r0 + self.tile_px, c0:c0 + self.tile_px]

    def point_m(self, sat_name, dy, dx):
        """Raster point (y_m south, x_m east), metres, of a panorama at corrected delta (dy, dx) (px of
        the 640-px tile) from tile sat_name."""
        i, j = self.sat_cell[sat_name]
        return float(self.lattice_m(i)) + dy * self.unit_m, float(self.lattice_m(j)) - dx * self.unit_m

    def render(self, pano_name, y_m, x_m, pano_hw, levels=(0.0, 0.0, 0.0), rng=None):
        """Panorama `pano_name` seen from raster point (y_m, x_m), metres, under the dial levels.

        levels: (overlap, foreground, viewpoint) in [0, 1]; a 4th entry (aliasing, as in the sidecar)
        is ignored: aliasing is a property of the place, measured here, not set. The dials' random
        choices (higher or lower camera, tilt direction, brighter or darker light, colour cast,
        objects) come from a stream of pano_name's own, so one name gives one scene at every level. rng: the noise of _jitter; None renders
        without noise. Returns (image [H, W, 3] uint8 BGR, aliasing level: the share of the visible
        scene pixels, ground and facades not hidden by fog or objects, whose source lies in a repeated
        district). All levels 0: the same pixels as the plain renderer."""
        overlap, foreground, viewpoint = (float(v) for v in tuple(levels)[:3])
        if not all(0.0 <= v <= 1.0 for v in (overlap, foreground, viewpoint)):
            raise ValueError('dial levels must lie in [0, 1], got %r' % (tuple(levels),))
        h, w = pano_hw
        half = h // 2
        draws = self.stream(pano_name.encode())
        height_sign, gain_sign = draws.choice([-1.0, 1.0], size=2)
        tilt_azimuth = draws.uniform(-np.pi, np.pi)
        cast = draws.standard_normal(3)
        cast /= np.linalg.norm(cast)
        height_factor = HEIGHT_RATIO_MAX ** (height_sign * viewpoint)

        img, where = _scene_layers(self.raster, self.facade, self.px_per_m, y_m, x_m, pano_hw, height_factor)
        img = img.astype(np.float32)
        # What each pixel shows: the scene (ground rows and facades; the sky is not part of the overlap),
        # at which distance, and whether its source lies in a repeated district.
        is_facade = where['is_facade']
        visible = np.concatenate([is_facade, np.ones((h - half, w), bool)], 0)          # (H, W)
        aliased = np.zeros((h, w), bool)
        if self.period_px is not None:
            mask = (self.period_px > 0).astype(np.uint8)
            map_y, map_x = where['ground_src']
            aliased[half:] = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT) > 0
            fy, fx = (v.astype(np.float32)[None] for v in where['facade_src'])
            aliased[:half] = is_facade & (cv2.remap(mask, fx, fy, cv2.INTER_NEAREST,
                                                    borderMode=cv2.BORDER_REFLECT) > 0)
        if overlap > 0:                                   # fog beyond the visibility radius
            dist = np.concatenate([np.where(is_facade, FACADE_M, 0.0),
                                   np.broadcast_to(where['ground_m'][:, None], (h - half, w))], 0)
            fog = _fog_transmittance(dist, overlap).astype(np.float32)
            img = fog[..., None] * img + (1 - fog[..., None]) * np.float32(FOG_BGR)
            visible &= fog >= 0.5
        if foreground > 0:                                # objects in front, painted far to near
            objects, covered = _foreground_objects(draws, foreground, pano_hw, height_factor)
            for d, rects in objects:
                t = float(_fog_transmittance(d, overlap)) if overlap > 0 else 1.0
                for r0, r1, c0, c1, bgr in rects:
                    img[r0:r1, c0:c1] = [t * v + (1 - t) * f for v, f in zip(bgr, FOG_BGR)]
            visible &= ~covered
        if viewpoint > 0:                                 # tilted camera, other light and season
            tilt_rows = viewpoint * TILT_MAX_DEG * h / 180.0 * np.sin(pano_azimuth(w) - tilt_azimuth)
            map_y = (np.arange(h, dtype=np.float32)[:, None] + tilt_rows.astype(np.float32)[None])
            map_x = np.broadcast_to(np.arange(w, dtype=np.float32)[None], (h, w)).copy()
            img = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            visible, aliased = (cv2.remap(m.astype(np.uint8), map_x, map_y, cv2.INTER_NEAREST,
                                          borderMode=cv2.BORDER_REPLICATE) > 0 for m in (visible, aliased))
            img = _light_and_season(img, viewpoint, gain_sign, cast)
        n_visible = np.count_nonzero(visible)
        level = np.count_nonzero(visible & aliased) / n_visible if n_visible else 0.0
        if rng is None:
            out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        else:
            out = _jitter(img, rng)
        return out, float(level)


# ----------------------------------------------------------------------------------------- VIGOR
def _write_vigor_city(root, city, seed, grid, tile_px, pano_hw, panos_per_tile, ambiguity, train_share=None):
    """One city: tiles, panoramas, its six label files and, with an ambiguity setting, its level
    sidecars. Returns its counts."""
    scene = VigorCityScene(seed, city, grid, tile_px, ambiguity)
    rng = scene.rng
    unit_m, tile_m, sat_name, sat_ll = scene.unit_m, scene.tile_m, scene.sat_name, scene.sat_ll
    lat0, lon0 = CITY_ORIGIN[city]
    sat_dir = os.path.join(root, city, 'satellite')
    pano_dir = os.path.join(root, city, 'panorama')
    os.makedirs(sat_dir, exist_ok=True)
    os.makedirs(pano_dir, exist_ok=True)
    for i, j in scene.cells:                    # the grid x grid tiles with panoramas and the ring around them
        _imwrite(os.path.join(sat_dir, sat_name[i, j]), _jitter(scene.tile(i, j), rng))

    level_rng = scene.stream(b'ambiguity levels')
    lines = {mpp: [] for mpp in (ORIGINAL_MPP, unit_m)}
    level_lines = []
    panoids = set()
    for i in range(grid):
        for j in range(grid):
            for _ in range(panos_per_tile):
                # Side of the centre the panorama lies on, at random on every tile: the ring of reference
                # tiles completes every 2x2 block. sy = +1: south (dy > 0); sx = +1: west (dx > 0).
                sy, sx = int(rng.choice([-1, 1])), int(rng.choice([-1, 1]))
                dy, dx = rng.uniform(*OFFSET_RANGE_PX640, size=2) * (sy, sx)
                lat, lon = latlon_offset(lat0, lon0, scene.centre_m - (tile_m[i] + dy * unit_m),
                                         (tile_m[j] - dx * unit_m) - scene.centre_m)
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
                point = scene.point_m(sat_name[i, j], *gps_delta_px(*sat_ll[i, j], lat, lon, unit_m))
                levels = (0.0, 0.0, 0.0) if scene.strengths is None else draw_ambiguity_levels(level_rng,
                                                                                               scene.strengths)
                img, aliasing = scene.render(name, *point, pano_hw, levels, rng)
                level_lines.append('%s %.4f %.4f %.4f %.4f\n' % ((name,) + levels + (aliasing,)))
                _imwrite(os.path.join(pano_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])

    n = len(lines[unit_m])
    perm = rng.permutation(n)
    k = n // 2 if train_share is None else int(n * train_share)
    train, test = np.sort(perm[:k]), np.sort(perm[k:])
    for folder, suffix, mpp in (('splits', '', ORIGINAL_MPP), ('splits__corrected', '__corrected', unit_m)):
        split_dir = os.path.join(root, folder, city)
        os.makedirs(split_dir, exist_ok=True)
        for stem, idx in (('same_area_balanced_train', train), ('same_area_balanced_test', test),
                          ('pano_label_balanced', np.arange(n))):
            with open(os.path.join(split_dir, stem + suffix + '.txt'), 'w') as f:
                f.writelines(lines[mpp][k] + '\n' for k in idx)
        if scene.strengths is not None:
            with open(os.path.join(split_dir, AMBIGUITY_FILE), 'w') as f:
                f.write(AMBIGUITY_HEADER + '\n')
                f.writelines(level_lines)
    for folder in ('splits', 'splits__corrected'):     # SliceMatch's corrected folder ships the list too
        with open(os.path.join(root, folder, city, 'satellite_list.txt'), 'w') as f:
            f.writelines(sat_name[cell] + '\n' for cell in scene.cells)
    return {'satellites': len(scene.cells), 'panoramas': n, 'train': len(train), 'test': len(test)}


def write_vigor(root, seed=0, cities=VIGOR_CITIES, grid=8,
                tile_px=128, pano_hw=(128, 256), panos_per_tile=2, ambiguity=None, train_share=None):
    """Write a synthetic VIGOR into `root` (docs/design.md §1 layout, original and corrected labels).

    tile_px: side of the aerial tiles (even), covering 640 px of the 640-px tile frame.
    pano_hw: (H, W) of the panoramas, W = 2H. Each of the grid x grid tiles of a city is the positive
    of exactly `panos_per_tile` panoramas; a ring of reference-only tiles around them completes every
    panorama's 2x2 block, so a city has (grid + 2)^2 tiles. train_share: the share of a city's panoramas
    in its training split (floor(n * share)), the rest test; None: half (floor(n / 2)).
    ambiguity: None (the plain city), 'mixed' (every dial) or {dial: strength in [0, 1]} (see
    ambiguity_strengths and the module docstring); with a setting, each city's split folders also get
    AMBIGUITY_FILE, its panoramas' dial levels (read_ambiguity_levels). Positions, names, labels and,
    without aliasing, the tiles are the same as the plain city's.
    A city's content depends only on (seed, city, ambiguity). Returns counts: per city and totals."""
    unknown = [c for c in cities if c not in CORRECTED_MPP]
    if unknown or not cities:
        raise ValueError('cities must be a non-empty subset of %s, got %r' % (sorted(CORRECTED_MPP), cities))
    if grid < 2:
        raise ValueError('grid must be >= 2 (grid x grid tiles with panoramas), got %r' % grid)
    if tile_px < 8 or tile_px % 2:
        raise ValueError('tile_px must be even and >= 8, got %r' % tile_px)
    if panos_per_tile < 1:
        raise ValueError('panos_per_tile must be >= 1, got %r' % panos_per_tile)
    _check_pano_hw(pano_hw)
    ambiguity_strengths(ambiguity)
    n_city = grid * grid * panos_per_tile
    if train_share is not None and not 1 <= int(n_city * train_share) < n_city:
        raise ValueError('train_share must leave each city at least one training and one test panorama of its %d, '
                         'got %r' % (n_city, train_share))
    summary = {'cities': {}}
    for city in cities:
        summary['cities'][city] = counts = _write_vigor_city(root, city, seed, grid, tile_px, tuple(pano_hw),
                                                             panos_per_tile, ambiguity, train_share)
        print('synthetic VIGOR %-12s %3d tiles, %4d panoramas (%d train, %d test)'
              % (city, counts['satellites'], counts['panoramas'], counts['train'], counts['test']),
              flush=True)
    for key in ('satellites', 'panoramas', 'train', 'test'):
        summary[key] = sum(c[key] for c in summary['cities'].values())
    return summary


def read_ambiguity_levels(root, city_or_cities, folder='splits'):
    """{panorama file name: [4] float64 levels in DIALS order} from the AMBIGUITY_FILE of each city
    under root/folder/<City>/ (the copy in the other split folder when folder's is missing: a tree may
    hold only splits/ or only splits__corrected/; both copies are the same)."""
    cities = [city_or_cities] if isinstance(city_or_cities, str) else list(city_or_cities)
    out = {}
    for city in cities:
        paths = [os.path.join(root, f, city, AMBIGUITY_FILE)
                 for f in (folder, 'splits__corrected' if folder == 'splits' else 'splits')]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError('no %s for %s under %s (made without an ambiguity setting?)'
                                    % (AMBIGUITY_FILE, city, root))
        with open(path) as f:
            for k, line in enumerate(f, 1):
                if k == 1:
                    if line.strip() != AMBIGUITY_HEADER:
                        raise ValueError('%s line 1: expected the header %r, got %r'
                                         % (path, AMBIGUITY_HEADER, line.rstrip('\n')))
                    continue
                tok = line.split()
                if not tok:
                    continue
                try:
                    if len(tok) != 1 + len(DIALS):
                        raise ValueError('%d tokens' % len(tok))
                    levels = np.array([float(v) for v in tok[1:]])
                    if not np.all((levels >= 0) & (levels <= 1)):
                        raise ValueError('a level outside [0, 1]')
                except ValueError as e:
                    raise ValueError('%s line %d: expected "<pano> %s" with levels in [0, 1] (%s): %r'
                                     % (path, k, ' '.join('<%s>' % d for d in DIALS), e, line.rstrip('\n')))
                if tok[0] in out:
                    raise ValueError('%s line %d: panorama %s listed twice' % (path, k, tok[0]))
                out[tok[0]] = levels
    return out


# ----------------------------------------------------------------------------------------- CVACT
def write_cvact(root, seed=0, n_panos=40, pano_hw=(128, 256), sat_px=1200, val_fraction=0.5):
    """Write a synthetic raw CVACT into `root` (docs/design.md §7 layout).

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
def _ensure(writer, root, kwargs, layout=None):
    """Build `root` with writer(tmp, **kwargs) in a sibling temp folder, mark it, rename it into place.
    Returns root at once if its marker holds the same (default-completed) arguments and layout version
    (a dataset written by a generator whose output has changed since is refused, not reused)."""
    signature = inspect.signature(writer)
    bound = signature.bind(root, **kwargs)
    bound.apply_defaults()
    # An argument left at a None default is not recorded, so markers written before it existed still match.
    params = json.loads(json.dumps({k: v for k, v in bound.arguments.items()
                                    if k != 'root' and not (v is None and signature.parameters[k].default is None)}))
    recorded = dict(params, layout=layout) if layout is not None else params
    marker = os.path.join(root, MARKER)

    def finished():
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            found = json.load(f)
        if found != recorded:
            raise ValueError('%s holds a synthetic dataset made with %s, not %s: delete it or use another root'
                             % (root, found, recorded))
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
            json.dump(recorded, f, indent=1, sort_keys=True)
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
    return _ensure(write_vigor, root, kwargs, VIGOR_LAYOUT)


def ensure_cvact(root, **kwargs):
    """Generate a synthetic raw CVACT at `root` (kwargs of write_cvact) unless it is already complete."""
    return _ensure(write_cvact, root, kwargs)


def ensure_builtin(dataset):
    """Write the built-in synthetic `dataset` ('vigor' or 'cvact', the latter with the resampled crops) under data/
    unless it is already complete; -> its root. The explicit step before a run without --data_root."""
    from geoloc.data import builtin
    root = builtin.FOLDERS[dataset]
    if dataset == 'vigor':
        return ensure_vigor(root)
    return ensure_resampled_cvact(root)


def ensure_resampled_cvact(root, **kwargs):
    """A synthetic raw CVACT at root (kwargs of write_cvact) with its crops in <root>/resampled (seed 0)."""
    from geoloc.data import builtin
    ensure_cvact(root, **kwargs)
    resampled = os.path.join(root, builtin.RESAMPLED)
    if not os.path.exists(os.path.join(resampled, 'splits', 'test.txt')):
        import samples_on_cvact
        samples_on_cvact.resample(root, resampled, seed=0)
    return root


# ----------------------------------------------------------------------------------------- preview
def _labelled(img, text):
    """img with a 14-px caption band above it."""
    band = np.full((14, img.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, img], 0)


def _strip(images):
    """Images side by side with 4-px white gaps."""
    gap = np.full((images[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([part for img in images for part in (img, gap)][:-1], 1)


def write_preview(out_dir, seed=0, city='Chicago', grid=8, tile_px=128, pano_hw=(128, 256), ambiguity='mixed',
                  n_points=3):
    """PNGs for a human to check the dials, in out_dir (no dataset is written):
    point<k>.png: one point of the city, one row per rendering dial at levels 0, 0.5 and 1 (others 0);
    aliasing.png (when the city has repeated districts): points whose measured aliasing level is
    nearest 0, 0.5 and 1, each beside the point one period east of it (where the level is 1 and the
    district is large, the two look the same);
    aerial.png: the city raster with the repeated districts outlined in red and the points in blue.
    Returns the written paths."""
    scene = VigorCityScene(seed, city, grid, tile_px, ambiguity)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(b'preview')])
    lo, hi = scene.tile_m[0], scene.tile_m[-1]
    written, marks = [], []
    for k in range(n_points):
        y, x = rng.uniform(lo, hi, 2)
        marks.append((y, x))
        rows = []
        for d, dial in enumerate(DIALS[:3]):
            views = []
            for level in (0.0, 0.5, 1.0):
                levels = [0.0, 0.0, 0.0]
                levels[d] = level
                views.append(_labelled(scene.render('preview%d' % k, y, x, pano_hw, levels)[0],
                                       '%s %.1f' % (dial, level)))
            rows.append(_strip(views))
        written.append(os.path.join(out_dir, 'point%d.png' % k))
        _imwrite(written[-1], np.concatenate(rows, 0))
    if scene.period_px is not None and scene.period_px.any():
        candidates = rng.uniform(lo, hi, (60, 2))
        found = [scene.render('preview', y, x, pano_hw)[1] for y, x in candidates]
        rows = []
        for target in (0.0, 0.5, 1.0):
            y, x = candidates[int(np.argmin(np.abs(np.array(found) - target)))]
            marks.append((y, x))
            level = scene.render('preview', y, x, pano_hw)[1]
            at = scene.period_px[int(y * scene.px_per_m), int(x * scene.px_per_m)]
            period_m = (at or int(np.median(scene.period_px[scene.period_px > 0]))) / scene.px_per_m
            rows.append(_strip([_labelled(scene.render('preview', y, x, pano_hw)[0], 'aliasing %.2f' % level),
                                _labelled(scene.render('preview', y, x + period_m, pano_hw)[0],
                                          'one period (%.1f m) east' % period_m)]))
        written.append(os.path.join(out_dir, 'aliasing.png'))
        _imwrite(written[-1], np.concatenate(rows, 0))
    aerial = scene.raster.copy()
    if scene.period_px is not None:
        contours, _ = cv2.findContours((scene.period_px > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(aerial, contours, -1, (0, 0, 255), max(1, aerial.shape[0] // 400))
    for y, x in marks:
        cv2.circle(aerial, (int(x * scene.px_per_m), int(y * scene.px_per_m)), max(3, aerial.shape[0] // 150),
                   (255, 0, 0), -1)
    written.append(os.path.join(out_dir, 'aerial.png'))
    _imwrite(written[-1], aerial)
    return written


def _parse_ambiguity(text):
    """--ambiguity value -> write_vigor's ambiguity: 'none' -> None, 'mixed', 'overlap=1,aliasing=0.5' -> dict."""
    if text in ('none', 'mixed'):
        return None if text == 'none' else text
    try:
        setting = {k.strip(): float(v) for k, v in (item.split('=') for item in text.split(','))}
        ambiguity_strengths(setting)
    except ValueError as e:
        raise argparse.ArgumentTypeError("expected 'none', 'mixed' or 'dial=strength,...' with dials %s and "
                                         'strengths in [0, 1], got %r (%s)' % (DIALS, text, e))
    return setting


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='dataset', required=True)
    vigor = sub.add_parser('vigor', help='synthetic VIGOR (the layout of data/DATASET.md)')
    vigor.add_argument('--root', default='data/synthetic_vigor')
    vigor.add_argument('--seed', type=int, default=0)
    vigor.add_argument('--cities', nargs='+', default=['NewYork', 'Seattle', 'SanFrancisco', 'Chicago'])
    vigor.add_argument('--grid', type=int, default=8,
                       help='grid x grid tiles carry panoramas; a ring of reference-only tiles surrounds them')
    vigor.add_argument('--tile_px', type=int, default=128)
    vigor.add_argument('--pano_h', type=int, default=128)
    vigor.add_argument('--pano_w', type=int, default=256)
    vigor.add_argument('--panos_per_tile', type=int, default=2)
    vigor.add_argument('--train_share', type=float, default=None,
                       help="share of each city's panoramas in the training split (default: half)")
    vigor.add_argument('--ambiguity', type=_parse_ambiguity, default=None,
                       help="ambiguity dials: 'none' (default), 'mixed' (all four at strength 1) or "
                            "'dial=strength,...' with dials %s" % (DIALS,))
    vigor.add_argument('--preview', metavar='DIR',
                       help='write PNG previews of the dials for the first city to DIR (at --ambiguity, '
                            "'mixed' if none) instead of building the data set")
    cvact = sub.add_parser('cvact', help='synthetic raw CVACT and its resampled crops in <root>/resampled')
    cvact.add_argument('--root', default='data/synthetic_cvact')
    cvact.add_argument('--seed', type=int, default=0)
    cvact.add_argument('--n_panos', type=int, default=40)
    cvact.add_argument('--pano_h', type=int, default=128)
    cvact.add_argument('--pano_w', type=int, default=256)
    cvact.add_argument('--sat_px', type=int, default=1200)
    cvact.add_argument('--val_fraction', type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.dataset == 'vigor' and args.preview:
        for path in write_preview(args.preview, seed=args.seed, city=args.cities[0], grid=args.grid,
                                  tile_px=args.tile_px, pano_hw=(args.pano_h, args.pano_w),
                                  ambiguity=args.ambiguity or 'mixed'):
            print('wrote %s' % path)
        return
    try:      # a bad argument or a root holding something else: one line, no traceback
        if args.dataset == 'vigor':
            ensure_vigor(args.root, seed=args.seed, cities=tuple(args.cities), grid=args.grid, tile_px=args.tile_px,
                         pano_hw=(args.pano_h, args.pano_w), panos_per_tile=args.panos_per_tile,
                         ambiguity=args.ambiguity, train_share=args.train_share)
        else:
            ensure_resampled_cvact(args.root, seed=args.seed, n_panos=args.n_panos,
                                   pano_hw=(args.pano_h, args.pano_w), sat_px=args.sat_px,
                                   val_fraction=args.val_fraction)
    except (ValueError, FileExistsError) as e:
        raise SystemExit('error: %s' % e)
    print('ready: %s' % args.root)


if __name__ == '__main__':
    main()
