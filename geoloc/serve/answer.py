"""Where a panorama was taken: rank the tiles, localise in the best one with the stage's head, and say it in
latitude and longitude (and metres of uncertainty where the stage has a covariance head).

As --test does (docs/design.md §6): the top-1 tile by descriptor similarity; the point is the tile centre
plus the head's delta (the offset head's regression, the heatmap's soft-argmax mu, or nothing: the tile
centre), turned into a position by geometry.delta_to_position at the tile's metres per pixel of the 640-px
frame. Everything here works on a served.Served, from a checkpoint or a SavedModel alike.
"""
import json
import os

import numpy as np

from geoloc.data import geometry
from geoloc.errors import ConfigError
from geoloc.serve import tiles as tiles_lib


def north_aligned(pano, yaw_deg):
    """A panorama whose centre column looks yaw_deg clockwise from north -> the north-aligned one, and the
    yaw applied (a whole number of columns). The inverse of --test's yaw protocol (protocols.py): rotated[:, c] =
    original[:, (c + shift) mod W] with shift = round(W yaw / 360), so original = roll(rotated, shift)."""
    from geoloc.eval import protocols
    if yaw_deg is None:
        return pano, 0.0
    width = pano.shape[1]
    views = protocols.Protocol(yaw=float(yaw_deg)).views(['panorama'], width)
    shift = int(views[0, 0])
    return np.roll(pano, shift, axis=1), shift * 360.0 / width


def tile_mpp(info, path, mpp):
    """Metres per pixel of the 640-px frame of a tile: the served model's convention (VIGOR's 0.114) unless
    mpp, the tile's own ground resolution in metres per pixel of the file, is given (a W-px file covers W x mpp m)."""
    if mpp is None:
        return float(info['mpp_640'])
    from PIL import Image
    with Image.open(path) as img:
        width = img.width
    return float(mpp) * width / geometry.TILE_PX


def ellipse(chol, mpp_640):
    """A Cholesky factor (l0, l1, l2) of Sigma in (row, col) pixels of the 640 frame -> the 1-sigma ellipse in
    metres: semi-axes, the major axis's bearing (degrees clockwise from north, in [0, 180)), the covariance in
    (north, east) metres^2, sigma_m = sqrt(semi-major x semi-minor) (the radius of the circle of the same
    area) and the paper's u (the sum of the 1-sigma ellipse's axes, pixels of the 640 frame)."""
    l0, l1, l2 = (float(v) for v in chol)
    lower = np.array([[l0, 0.0], [l1, l2]])
    cov_rc = lower @ lower.T                                          # (row, col) px^2; row points south
    flip = np.diag([-1.0, 1.0])
    cov_ne = flip @ cov_rc @ flip * mpp_640 ** 2                      # (north, east) m^2
    eigval, eigvec = np.linalg.eigh(cov_ne)
    major, minor = np.sqrt(max(eigval[1], 0.0)), np.sqrt(max(eigval[0], 0.0))
    north, east = eigvec[:, 1]
    px = np.sqrt(np.clip(np.linalg.eigvalsh(cov_rc), 0.0, None))
    return {'sigma_m': float(np.sqrt(major * minor)), 'semi_major_m': float(major), 'semi_minor_m': float(minor),
            'major_axis_bearing_deg': float(np.degrees(np.arctan2(east, north)) % 180.0),
            'covariance_ne_m2': cov_ne.tolist(), 'u_px': float(2 * px.sum())}, cov_rc


def localise(served, panorama, tile_args, yaw=None, mpp=None, top_k=5, batch=32, progress=None):
    """-> (the answer: a JSON-able dict, what the picture needs: a dict). See the module docstring."""
    if top_k < 1 or batch < 1:
        raise ConfigError(f'--{"top_k" if top_k < 1 else "batch"} must be at least 1')
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ConfigError(f'--mpp {mpp}: must be a positive number of metres per pixel')
    if yaw is not None and not np.isfinite(yaw):
        raise ConfigError(f'--yaw {yaw}: must be a number of degrees')
    info = served.info
    grd_hw, side = tuple(info['grd_size']), int(info['sat_size'])
    paths, centres = tiles_lib.list_tiles(tile_args)
    pano, yaw_applied = north_aligned(tiles_lib.read_images([panorama], grd_hw, 'panorama')[0], yaw)
    if progress:
        progress(f'{info["stage"]}: ranking {len(paths)} tiles for {panorama}')
    grd = served.embed_panorama(pano[None])[0]
    top, scores = tiles_lib.rank(served.embed_tile, grd, paths, side, batch, top_k, progress)
    best = int(top[0])
    tile = tiles_lib.read_images([paths[best]], (side, side), 'aerial')[0]
    out = {k: v[0] for k, v in served.localise(pano[None], tile[None]).items()}
    mpp_640 = tile_mpp(info, paths[best], mpp)
    delta = np.asarray(out['delta'], np.float64)
    lat, lon = geometry.delta_to_position(centres[best], delta[None], mpp_640, 'haversine')[0]
    answer = {'stage': info['stage'], 'method': info['localise'], 'lat': float(lat), 'lon': float(lon),
              'tile': paths[best], 'tile_lat': float(centres[best, 0]), 'tile_lon': float(centres[best, 1]),
              'delta_px': delta.tolist(), 'mu_px': np.asarray(out['mu'], np.float64).tolist(),
              'mpp_640': mpp_640, 'panorama': panorama, 'yaw_deg': yaw_applied,
              'top_tiles': [{'tile': paths[i], 'score': float(s), 'lat': float(centres[i, 0]),
                             'lon': float(centres[i, 1])} for i, s in zip(top, scores)]}
    picture = {'pano_rgb': pano, 'tile_path': paths[best], 'mu': out['mu'], 'heatmap': out.get('heatmap'),
               'cov_rc': None}
    if 'chol' in out:
        uncertainty, picture['cov_rc'] = ellipse(out['chol'], mpp_640)
        answer.update(uncertainty)
    return answer, picture


def lines(answer):
    """The answer in words, a line each."""
    out = [f'{answer["stage"]} ({answer["method"]}): lat {answer["lat"]:.7f}, lon {answer["lon"]:.7f}']
    if 'sigma_m' in answer:
        out.append(f'uncertainty: sigma {answer["sigma_m"]:.2f} m (1-sigma ellipse {answer["semi_major_m"]:.2f} m x '
                   f'{answer["semi_minor_m"]:.2f} m, major axis at {answer["major_axis_bearing_deg"]:.0f} deg '
                   'from north)')
    row, col = answer['mu_px']
    out.append(f'in tile {os.path.basename(answer["tile"])} at row {row:.1f}, col {col:.1f} of its 640-px frame '
               f'({answer["mpp_640"]:.4g} m/px)')
    out.append(f'top {len(answer["top_tiles"])} tiles:')
    out.extend(f'  {i + 1}. {os.path.basename(t["tile"])}  score {t["score"]:.4f}'
               for i, t in enumerate(answer['top_tiles']))
    return out


def write_json(answer, path):
    """The answer as JSON at path, written whole (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(answer, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def draw(answer, picture, path):
    """The north-aligned panorama above the best tile (at its resolution on file), with the predicted point,
    the heatmap (heatmap stages) and the 1-sigma / 2-sigma ellipses (covariance stages) -> path (PNG)."""
    from geoloc.data import images
    from geoloc.eval import figures
    sat, _ = images.decode_image(picture['tile_path'])
    sat = np.repeat(sat[..., None], 3, axis=2) if sat.ndim == 2 else sat[..., :3]
    title = f'{answer["stage"]}: {answer["lat"]:.6f}, {answer["lon"]:.6f}'
    if 'sigma_m' in answer:
        title += f'  (1σ {answer["semi_major_m"]:.1f} x {answer["semi_minor_m"]:.1f} m; ellipses 1σ, 2σ)'
    title += f'\nin {os.path.basename(answer["tile"])}'
    return figures.plot_localisation(path, picture['pano_rgb'][..., ::-1], sat, None, picture['mu'],
                                     heatmap=picture['heatmap'], cov=picture['cov_rc'], title=title)
