"""Geometry and constants of VIGOR/SAMP, each defined once; every other module imports them from here.

numpy only, no TensorFlow: delta_to_rc and rc_to_delta are element-wise arithmetic, so the same
function serves numpy arrays and float32 TensorFlow tensors (inside a tf.function too).

Frames and units (docs/design.md §1, §6):
- The 640-px tile frame: an aerial tile spans TILE_PX = 640 px whatever size it is read at; deltas,
  (row, col) points and covariances are in pixels of that frame.
- delta = (dy, dx): dy > 0 means the point lies SOUTH of the tile centre, dx > 0 WEST of it. In the
  tile the point is at row = 320 + dy, col = 320 - dx.
- Positions: (lat, lon) degrees with metric 'haversine' (VIGOR's GPS), (north, east) metres with
  metric 'euclidean' (CVACT's UTM).
- Metres per pixel of the 640-px tile: ORIGINAL_MPP everywhere with VIGOR's original labels,
  CORRECTED_MPP[city] with SliceMatch's corrected labels.
"""
import numpy as np

# BGR mean subtracted from every network input (docs/design.md §2, the classic TF-VGG16 release's).
VGG_MEAN_BGR = (103.939, 116.779, 123.6)
TILE_PX = 640                    # side of the aerial tile in the frame of every delta and (row, col)
EARTH_RADIUS_M = 6371004.0       # VIGOR's Earth radius, metres

VIGOR_CITIES = ('NewYork', 'Seattle', 'SanFrancisco', 'Chicago')
CROSS_AREA = {'train': ('NewYork', 'Seattle'), 'test': ('SanFrancisco', 'Chicago')}
ORIGINAL_MPP = 0.114             # m/px of the 640-px tile that VIGOR's original labels assume in every city
# m/px of the 640-px tile per city, SliceMatch's figures for its corrected labels.
CORRECTED_MPP = {'NewYork': 0.113248, 'Seattle': 0.100817, 'SanFrancisco': 0.118141, 'Chicago': 0.111262}

_RC_SIGN = np.array([1.0, -1.0], np.float32)     # (row, col) = 320 + (dy, dx) * (1, -1)


def delta_to_rc(delta):
    """VIGOR delta (..., 2) = (dy, dx) -> (..., 2) = (row, col), both pixels of the 640-px tile.

    numpy arrays (float32 stays float32, float64 stays float64) or float32 TensorFlow tensors."""
    return TILE_PX / 2 + delta * _RC_SIGN


def rc_to_delta(rc):
    """(row, col) (..., 2) -> VIGOR delta (dy, dx) (..., 2), both pixels of the 640-px tile; the
    inverse of delta_to_rc, for the same inputs."""
    return (rc - TILE_PX / 2) * _RC_SIGN


def latlon_offset(lat, lon, north_m, east_m):
    """The point north_m metres north and east_m metres east of (lat, lon) degrees -> (lat, lon) degrees.

    An equirectangular step on a sphere of radius EARTH_RADIUS_M, east scaled by cos(lat) of the start
    point: within well below 1 mm of the great circle over a tile (< 75 m). Scalars or numpy arrays."""
    lat2 = lat + np.degrees(north_m / EARTH_RADIUS_M)
    lon2 = lon + np.degrees(east_m / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    return lat2, lon2


def gps_delta_px(lat_sat, lon_sat, lat_pano, lon_pano, mpp):
    """VIGOR delta (dy, dx), pixels of the 640-px tile at mpp m/px, of a panorama from a tile centre,
    both (lat, lon) degrees: the inverse of latlon_offset from the tile centre.

    dy = (lat_sat - lat_pano) in px: positive when the panorama is SOUTH of the tile centre;
    dx = (lon_sat - lon_pano) in px, east scaled by cos(lat_sat): positive when it is WEST of it.
    Scalars or numpy arrays."""
    north_m = np.radians(lat_sat - lat_pano) * EARTH_RADIUS_M
    east_m = np.radians(lon_sat - lon_pano) * EARTH_RADIUS_M * np.cos(np.radians(lat_sat))
    return north_m / mpp, east_m / mpp


def delta_to_position(centre, delta, mpp, metric):
    """Position of a point given as a VIGOR delta from an aerial tile's centre.

    centre: (Q, 2) or (2,) tile centre: (lat, lon) degrees for metric='haversine' (moved by
        latlon_offset), (north, east) metres for metric='euclidean'.
    delta: (Q, 2) (dy, dx), pixels of the 640-px tile; dy > 0: south, dx > 0: west.
    mpp: scalar or (Q,) metres per pixel of the 640-px tile.
    Returns (Q, 2) float64 in the centre's units.
    """
    centre = np.asarray(centre, np.float64)
    delta = _pairs(delta, 'delta')
    if centre.shape not in ((2,), delta.shape):
        raise ValueError(f'centre must have shape (2,) or {delta.shape}, got {centre.shape}')
    mpp = np.asarray(mpp, np.float64)
    north = -delta[:, 0] * mpp                                          # (Q,) metres
    east = -delta[:, 1] * mpp
    if metric == 'euclidean':
        return centre + np.stack([north, east], axis=1)
    if metric == 'haversine':
        return np.stack(latlon_offset(centre[..., 0], centre[..., 1], north, east), axis=1)
    raise ValueError(f"metric must be 'haversine' or 'euclidean', got {metric!r}")


def distance_m(a, b, metric):
    """(Q,) float64 metres between positions a and b, both (Q, 2): great-circle (haversine) distance
    on a sphere of radius EARTH_RADIUS_M between (lat, lon) degrees ('haversine'), or Euclidean
    distance between (north, east) metres ('euclidean')."""
    a, b = _pairs(a, 'a'), _pairs(b, 'b')
    if a.shape != b.shape:
        raise ValueError(f'a {a.shape} and b {b.shape} differ in shape')
    if metric == 'euclidean':
        return np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1])
    if metric == 'haversine':
        lat1, lon1, lat2, lon2 = np.radians([a[:, 0], a[:, 1], b[:, 0], b[:, 1]])
        h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
        return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    raise ValueError(f"metric must be 'haversine' or 'euclidean', got {metric!r}")


def _pairs(x, name):
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f'{name} must have shape (Q, 2), got {x.shape}')
    return x
