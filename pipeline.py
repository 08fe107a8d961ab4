"""tf.data pipelines over input_data's splits: descriptor extraction, (panorama, tile) pairs, training batches.

Images are decoded by input_data (OpenCV, one Python call per batch through tf.numpy_function) and
arrive as float32 with the VGG mean subtracted. A DataError raised while reading crosses tf.data as
an op error whose text holds BAD_INPUT + the one-line message; unwrap_error gets the message back.
"""
import numpy as np
import tensorflow as tf

from geometry import VGG_MEAN_BGR
from images import load_image
from input_data import DataError

BAD_INPUT = 'BAD INPUT: '  # marks our messages when they cross a tf.data boundary


def _tf_read(paths, hw, kind, cache=None):
    """A batch of paths -> float32 [B, H, W, 3], the VGG mean subtracted: one Python call per batch, as a
    per-image map costs ~0.4 ms of tf.data and Python per image (a warm cache then reads 30 images in ~1 ms)."""
    load = cache.load if cache is not None else load_image

    def read(ps):
        try:
            return np.stack([load(p.decode(), tuple(hw), kind) for p in ps])
        except DataError as e:  # crosses tf.data as an op error; the CLI unwraps BAD_INPUT
            raise ValueError(BAD_INPUT + str(e)) from None
    img = tf.numpy_function(read, [paths], tf.uint8, stateful=False)
    img = tf.cast(tf.ensure_shape(img, [paths.shape[0], hw[0], hw[1], 3]), tf.float32)
    return img - tf.constant(VGG_MEAN_BGR, tf.float32)


def apply_views(img, views):
    """A test protocol's views (protocols.Protocol.views) on a batch of panoramas.

    img: [B, H, W, 3] float32, the VGG mean subtracted. views: [B, 3] int64 (shift, start, visible):
    out[b, :, c] = img[b, :, (c + shift) mod W] (a yaw: a circular shift of the columns), times 0 unless
    that source column is one of the `visible` columns from `start` (a field of view; masked columns
    become 0, the mean colour).
    """
    width = tf.shape(img, out_type=tf.int64)[2]
    shift, start, visible = views[:, 0:1], views[:, 1:2], views[:, 2:3]     # (B, 1) each
    source = tf.math.floormod(tf.range(width, dtype=tf.int64)[None] + shift, width)     # (B, W)
    keep = tf.cast(tf.math.floormod(source - start, width) < visible, img.dtype)        # (B, W)
    return tf.gather(img, source, axis=2, batch_dims=1) * keep[:, None, :, None]


def image_dataset(paths, hw, kind, batch, cache=None, views=None):
    """Deterministic batches of (images, index) over `paths`, for descriptor extraction; cache: an ImageCache;
    views: [len(paths), 3] int64 for apply_views (panoramas under a test protocol), or None."""
    index = np.arange(len(paths), dtype=np.int64)
    if views is None:
        ds = tf.data.Dataset.from_tensor_slices((np.array(paths), index)).batch(batch)
        read = lambda p, i: (_tf_read(p, hw, kind, cache), i)
    else:
        ds = tf.data.Dataset.from_tensor_slices((np.array(paths), index, np.asarray(views, np.int64))).batch(batch)
        read = lambda p, i, v: (apply_views(_tf_read(p, hw, kind, cache), v), i)
    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def pair_dataset(split, queries, tile_idx, grd_hw, sat_side, batch, cache=None, views=None):
    """Batches of (grd, sat, i) for the panorama `queries[i]` with the tile `tile_idx[i]`; views: [n, 3] int64
    for apply_views on the panoramas (a test protocol), or None."""
    pano = np.array(split.pano_paths)[queries]
    tile = np.array(split.tile_paths)[tile_idx]
    views = np.zeros((len(pano), 0), np.int64) if views is None else np.asarray(views, np.int64)
    ds = tf.data.Dataset.from_tensor_slices((pano, tile, np.arange(len(pano), dtype=np.int64), views)).batch(batch)

    def read(p, t, q, v):
        grd = _tf_read(p, grd_hw, 'panorama', cache)
        return (grd if views.shape[1] == 0 else apply_views(grd, v),
                _tf_read(t, (sat_side, sat_side), 'aerial', cache), q)
    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def train_dataset(split, panos, semi, grd_hw, sat_side, batch, cache=None, with_semi=True):
    """tf.data over a plan's items (flattened [steps * B]): dict batches of
    grd [B,H,W,3], sat [B,S,S,3], semi [B,S,S,3] float32 (VGG mean subtracted), delta / delta_semi [B,2]
    float32 (pixels of the 640-px tile), pano (panorama index), semi_k (which semi-positive, 1..3) and
    sat_idx (the positive's tile index) [B] int64.
    cache: an ImageCache shared by the epochs' datasets (None: decode every time).
    with_semi=False: no semi image (a loss that does not look at it; a third fewer images read)."""
    panos, semi = panos.reshape(-1), semi.reshape(-1)
    pos_tile = split.tiles[panos, 0]
    semi_tile = split.tiles[panos, semi]
    items = {
        'grd_path': np.array(split.pano_paths)[panos],
        'sat_path': np.array(split.tile_paths)[pos_tile],
        'semi_path': np.array(split.tile_paths)[semi_tile],
        'delta': split.deltas[panos, 0],
        'delta_semi': split.deltas[panos, semi],
        'pano': panos, 'semi_k': semi, 'sat_idx': pos_tile,
    }
    sat_hw = (sat_side, sat_side)

    def load(x):
        out = {k: v for k, v in x.items() if not k.endswith('_path')}
        out['grd'] = _tf_read(x['grd_path'], grd_hw, 'panorama', cache)
        out['sat'] = _tf_read(x['sat_path'], sat_hw, 'aerial', cache)
        if with_semi:
            out['semi'] = _tf_read(x['semi_path'], sat_hw, 'aerial', cache)
        return out

    ds = tf.data.Dataset.from_tensor_slices(items).batch(batch, drop_remainder=True)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def unwrap_error(exc):
    """The one-line message of a DataError raised inside tf.data, or None."""
    text = str(exc)
    i = text.find(BAD_INPUT)
    if i < 0:
        return None
    return text[i + len(BAD_INPUT):].splitlines()[0].strip()
