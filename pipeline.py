"""tf.data pipelines over input_data's splits: descriptor extraction, (panorama, tile) pairs, training batches.

Every image is read by TensorFlow's own ops inside one tf.data map with one call in flight per core
(`cores()`): the file's header is checked in the graph, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in
libjpeg's DCT when it is read smaller (images.reduction), a PNG in full; then an area resize, rounding
to uint8, RGB -> BGR, and (per batch) float32 minus the VGG mean. No Python runs per image, so decoding
spreads over every core whatever the interpreter lock does (benchmarks/bench_pipeline.py). Against
SPEC §2's OpenCV full decode + INTER_AREA the result differs by 0.35 grey levels on average at paper
size (docs_pipeline.md; tests/test_pipeline.py bounds it).

A bad image stops the dataset with an op error whose text holds BAD_INPUT + a one-line message naming
the file (unwrap_error gets it back). The graph only decides that an image is bad (a failed header
check, or a decode op that failed: tf.data drops that item and a check that follows sees the gap); the
message is then written by images.load_image, the Python reference reader, in a Python call that runs
only then.
"""
import os

import numpy as np
import tensorflow as tf

import images
from geometry import VGG_MEAN_BGR
from input_data import DataError

BAD_INPUT = 'BAD INPUT: '  # marks our messages when they cross a tf.data boundary

# What the graph's header check found (images.load_image words the message).
OK, EMPTY, NOT_IMAGE, TRUNCATED, NOT_8_BIT, NOT_COLOUR, WRONG_SIZE, TOO_SMALL = range(8)
STATUS = ('ok', 'empty file', 'not JPEG/PNG', 'truncated', 'not 8 bits per channel', 'not a colour image',
          'wrong size', 'too small')
_PNG_SIGNATURE = np.frombuffer(b'\x89PNG\r\n\x1a\n', np.uint8)
_JPEG, _PNG, _NONE = 0, 4, 5           # decode branches: JPEG at 1/1, 1/2, 1/4, 1/8 = 0..3, PNG, nothing


def cores():
    """The CPU cores this process may run on (its affinity mask): the map's calls in flight."""
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- one image in the graph

def _bytes(s, n):
    """uint8 [n]: the first n bytes of the string s, zero-padded."""
    return tf.io.decode_raw(tf.strings.join([tf.strings.substr(s, 0, n), tf.constant(b'\0' * n)]), tf.uint8)[:n]


def inspect(data, hw, kind):
    """The header check of an encoded image read at hw = (H, W) as a 'panorama' (W = 2H) or an 'aerial'
    (square): -> (status (int32, OK or what is wrong), decode branch (int32)). Mirrors images.load_image:
    a JPEG must end with its end-of-image marker and a PNG with IEND; 8-bit colour; the kind's shape;
    at least hw (never upscaled)."""
    n = tf.strings.length(data)
    head = _bytes(data, 32)
    tail = _bytes(tf.strings.substr(data, tf.maximum(n - 64, 0), 64), 64)
    is_jpeg = (head[0] == 0xFF) & (head[1] == 0xD8)
    is_png = tf.reduce_all(head[:8] == _PNG_SIGNATURE)
    eoi = tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))
    iend = tf.reduce_any((tail[:-3] == ord('I')) & (tail[1:-2] == ord('E')) & (tail[2:-1] == ord('N')) &
                         (tail[3:] == ord('D')))
    b = tf.cast(head, tf.int64)
    be32 = lambda i: ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]   # PNG IHDR fields
    depth, colour_type = b[24], b[25]
    jpeg_hwc = tf.cond(is_jpeg & eoi, lambda: tf.io.extract_jpeg_shape(data, tf.int64),
                       lambda: tf.zeros([3], tf.int64))  # (a header libjpeg cannot read fails the op)
    h = tf.where(is_jpeg, jpeg_hwc[0], be32(20))
    w = tf.where(is_jpeg, jpeg_hwc[1], be32(16))
    colour = tf.where(is_jpeg, jpeg_hwc[2] >= 3, (colour_type == 2) | (colour_type == 3) | (colour_type == 6))
    eight_bit = is_jpeg | (depth == 8) | (colour_type == 3)     # palette indices of <= 8 bits -> 8-bit colour
    shape_ok = tf.equal(w, 2 * h) if kind == 'panorama' else tf.equal(w, h)
    problems = [(tf.equal(n, 0), EMPTY), (~(is_jpeg | is_png), NOT_IMAGE),
                ((is_jpeg & ~eoi) | (is_png & ~iend), TRUNCATED), (~eight_bit, NOT_8_BIT), (~colour, NOT_COLOUR),
                (~shape_ok, WRONG_SIZE), ((h < hw[0]) | (w < hw[1]), TOO_SMALL)]
    status = tf.constant(OK)
    for bad, code in reversed(problems):   # the first problem found wins
        status = tf.where(bad, code, status)
    # images.reduction: the largest 1/f leaving >= 1.5x to the area resize
    fits = lambda f: tf.cast((2 * ((h + f - 1) // f) >= 3 * hw[0]) & (2 * ((w + f - 1) // f) >= 3 * hw[1]), tf.int32)
    branch = tf.where(status != OK, _NONE, tf.where(is_jpeg, _JPEG + fits(2) + fits(4) + fits(8), _PNG))
    return status, branch


def decode(data, branch, hw):
    """An encoded image -> uint8 [H, W, 3] BGR at hw = (H, W) (zeros for the branch of a bad image)."""
    def jpeg(ratio):
        # INTEGER_ACCURATE: libjpeg's islow IDCT, OpenCV's; fancy upsampling is on in both
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method='INTEGER_ACCURATE')
    rgb = tf.switch_case(branch, [jpeg(1), jpeg(2), jpeg(4), jpeg(8), lambda: tf.io.decode_png(data, channels=3),
                                  lambda: tf.zeros([hw[0], hw[1], 3], tf.uint8)])
    same = tf.reduce_all(tf.equal(tf.shape(rgb)[:2], hw))
    rgb = tf.cond(same, lambda: rgb, lambda: tf.cast(tf.round(tf.image.resize(rgb, hw, method='area')), tf.uint8))
    return tf.ensure_shape(tf.reverse(rgb, axis=[-1]), [hw[0], hw[1], 3])


def read(path, hw, kind):
    """A file -> (uint8 [H, W, 3] BGR, status): read, check, decode, resize."""
    data = tf.io.read_file(path)
    status, branch = inspect(data, hw, kind)
    return decode(data, branch, hw), status


_READERS = {}


def reader(hw, kind):
    """`read` at hw as a tf.function traced once per process (a dataset built each epoch calls it)."""
    key = (tuple(int(s) for s in hw), kind)
    if key not in _READERS:
        _READERS[key] = tf.function(lambda path: read(path, key[0], kind), autograph=False,
                                    input_signature=[tf.TensorSpec([], tf.string)])
    return _READERS[key]


# ----------------------------------------------------------------------------- the image cache

class ImageCache:
    """Decoded, resized images (uint8) kept in memory across epochs, up to max_bytes, read and written
    inside the tf.data graph (TensorFlow variables in host memory, one per image size).

    A path gets a slot when a dataset that reads it is built, while the budget lasts; the first paths
    are kept and never evicted (the hit rate of a data set larger than the budget is the budget's share).
    Its image is written the first time it is decoded and read from the slot from then on.
    """

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.slots = {}       # (path, hw) -> slot
        self.stores = {}      # hw -> (images [capacity, H, W, 3] uint8, filled [capacity] bool) variables
        self.count = {}       # hw -> slots given
        self._readers = {}    # (hw, kind) -> (the store's pixels it reads, its tf.function)
        with tf.init_scope(), tf.device('/CPU:0'):
            self._decoded = tf.Variable(0, dtype=tf.int64, trainable=False)

    @property
    def decoded(self):
        """Images decoded through this cache (the misses)."""
        return int(self._decoded.numpy())

    def assign(self, paths, hw):
        """Slots of `paths` at hw (-1: not cached), new paths getting one while the budget lasts."""
        hw, one = tuple(int(s) for s in hw), int(np.prod(hw)) * 3
        out = np.full(len(paths), -1, np.int64)
        for i, p in enumerate(paths):
            slot = self.slots.get((p, hw))
            if slot is None and self.bytes + one <= self.max_bytes:
                slot = self.slots[(p, hw)] = self.count.get(hw, 0)
                self.count[hw] = slot + 1
                self.bytes += one
            out[i] = -1 if slot is None else slot
        self._grow(hw, one)
        return out

    def _grow(self, hw, one):
        need = self.count.get(hw, 0)
        old = self.stores.get(hw)
        have = 0 if old is None else int(old[1].shape[0])
        if need <= have:
            return
        # doubling (bounded by what the budget still allows) keeps the copies few
        capacity = max(need, min(2 * have, need + (self.max_bytes - self.bytes) // one))
        with tf.init_scope(), tf.device('/CPU:0'):
            pixels = tf.zeros([capacity - have, hw[0], hw[1], 3], tf.uint8)
            filled = tf.zeros([capacity - have], tf.bool)
            if old is not None:   # datasets built before keep the old variables
                pixels, filled = tf.concat([old[0], pixels], 0), tf.concat([old[1], filled], 0)
            self.stores[hw] = (tf.Variable(pixels, trainable=False), tf.Variable(filled, trainable=False))

    def reader(self, hw, kind):
        """(path, slot) -> (image, status) through the store of size hw (after assign), a tf.function traced
        once per store."""
        hw = tuple(int(s) for s in hw)
        pixels, filled = self.stores[hw]
        known = self._readers.get((hw, kind))
        if known is not None and known[0] is pixels:
            return known[1]
        decoded, read_file = self._decoded, reader(hw, kind)

        def cached_read(path, slot):
            def hit():
                return tf.gather(pixels, slot), tf.constant(OK)

            def miss():
                img, status = read_file(path)
                count = tf.raw_ops.AssignAddVariableOp(resource=decoded.handle, value=tf.constant(1, tf.int64))
                with tf.control_dependencies([count]):
                    img = tf.identity(img)

                def keep():   # pixels first, then the flag: a reader that sees the flag sees the pixels
                    put = tf.raw_ops.ResourceScatterUpdate(resource=pixels.handle, indices=slot[None],
                                                           updates=img[None])
                    with tf.control_dependencies([put]):
                        flag = tf.raw_ops.ResourceScatterUpdate(resource=filled.handle, indices=slot[None],
                                                                updates=tf.constant([True]))
                    with tf.control_dependencies([flag]):
                        return tf.identity(img)
                return tf.cond((slot >= 0) & tf.equal(status, OK), keep, lambda: img), status
            known = tf.cond(slot >= 0, lambda: tf.gather(filled, tf.maximum(slot, 0)), lambda: tf.constant(False))
            return tf.cond(known, hit, miss)
        fn = tf.function(cached_read, autograph=False,
                         input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)])
        self._readers[(hw, kind)] = (pixels, fn)
        return fn


# ----------------------------------------------------------------------------- datasets

def _batches(columns, readers, batch, output, cache=None, drop_remainder=False):
    """Batches over n items: output(x) of dicts x of the numpy `columns` ([n, ...] each) and, for every reader
    name -> (path column, hw, kind), that item's image, float32 [B, H, W, 3] minus the VGG mean; '_pos' is
    the item's index. (output runs before the prefetch: after it, a map would run on the consumer's thread.)"""
    n = len(next(iter(columns.values())))
    table = {k: np.asarray(v) for k, v in columns.items()}
    table['_pos'] = np.arange(n, dtype=np.int64)
    for name, (col, hw, kind) in readers.items():   # every slot first: assign may grow (replace) a store
        table['_slot_' + name] = (np.full(n, -1, np.int64) if cache is None else
                                  cache.assign([str(p) for p in table[col]], hw))
    fns = {name: (cache.reader(hw, kind) if cache is not None else
                  lambda path, slot, fn=reader(hw, kind): fn(path))
           for name, (col, hw, kind) in readers.items()}

    def load(x):
        out = {k: v for k, v in x.items() if not k.startswith('_slot_')}
        for name, (col, _, _) in readers.items():
            out[name], out['_status_' + name] = fns[name](x[col], x['_slot_' + name])
        return out

    def explain(pos, codes):
        """Runs only for a bad item: the reference reader's one-line message for its first bad image."""
        pos = int(pos)
        paths = []
        for (name, (col, hw, kind)), code in zip(readers.items(), codes):
            path = str(columns[col][pos])
            paths.append(path)
            try:
                images.load_image(path, hw, kind)
            except DataError as e:
                raise ValueError(BAD_INPUT + str(e)) from None
            if code > OK:
                raise ValueError(BAD_INPUT + f'{path}: {STATUS[code]} (TensorFlow\'s header check)')
        raise ValueError(BAD_INPUT + f'{" or ".join(paths)}: unreadable image (TensorFlow cannot decode it)')

    def check(expected, x):
        pos = x['_pos']
        codes = tf.stack([x['_status_' + name] for name in readers])
        report = lambda at, c: tf.numpy_function(explain, [at, c], tf.bool, stateful=True)
        ok = tf.cond(tf.not_equal(pos, expected), lambda: report(expected, -tf.ones_like(codes)),  # a dropped item
                     lambda: tf.cond(tf.reduce_any(codes != OK), lambda: report(pos, codes), lambda: tf.constant(True)))
        with tf.control_dependencies([ok]):
            out = {k: tf.identity(v) for k, v in x.items() if not k.startswith('_status_')}
        return pos + 1, out

    def finish(x):
        out = dict(x)
        for name in readers:
            out[name] = tf.cast(x[name], tf.float32) - tf.constant(VGG_MEAN_BGR, tf.float32)
        return output(out)

    ds = tf.data.Dataset.from_tensor_slices(table)
    ds = ds.map(load, num_parallel_calls=cores(), deterministic=True).ignore_errors()
    # an item whose decode op failed is dropped: `check` sees the gap, and the end marker catches the last one
    end = tf.data.Dataset.from_tensors({k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()})
    end = end.map(lambda x: dict(x, _pos=tf.constant(n, tf.int64)))
    ds = ds.concatenate(end).scan(tf.constant(0, tf.int64), check).filter(lambda x: x['_pos'] < n)
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    return ds.map(finish, num_parallel_calls=cores(), deterministic=True).prefetch(2)


def image_dataset(paths, hw, kind, batch, cache=None):
    """Deterministic batches of (images, index) over `paths`, for descriptor extraction; cache: an ImageCache."""
    return _batches({'path': np.array(paths)}, {'img': ('path', tuple(hw), kind)}, batch,
                    lambda x: (x['img'], x['_pos']), cache)


def pair_dataset(split, queries, tile_idx, grd_hw, sat_side, batch, cache=None):
    """Batches of (grd, sat, i) for the panorama `queries[i]` with the tile `tile_idx[i]`."""
    columns = {'pano': np.array(split.pano_paths)[queries], 'tile': np.array(split.tile_paths)[tile_idx]}
    readers = {'grd': ('pano', tuple(grd_hw), 'panorama'), 'sat': ('tile', (sat_side, sat_side), 'aerial')}
    return _batches(columns, readers, batch, lambda x: (x['grd'], x['sat'], x['_pos']), cache)


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
    columns = {
        'grd_path': np.array(split.pano_paths)[panos],
        'sat_path': np.array(split.tile_paths)[pos_tile],
        'semi_path': np.array(split.tile_paths)[semi_tile],
        'delta': split.deltas[panos, 0],
        'delta_semi': split.deltas[panos, semi],
        'pano': panos, 'semi_k': semi, 'sat_idx': pos_tile,
    }
    sat_hw = (sat_side, sat_side)
    readers = {'grd': ('grd_path', tuple(grd_hw), 'panorama'), 'sat': ('sat_path', sat_hw, 'aerial')}
    if with_semi:
        readers['semi'] = ('semi_path', sat_hw, 'aerial')
    output = lambda x: {k: v for k, v in x.items() if not k.endswith('_path') and k != '_pos'}
    return _batches(columns, readers, batch, output, cache, drop_remainder=True)


def unwrap_error(exc):
    """The one-line message of a DataError raised inside tf.data, or None."""
    text = str(exc)
    i = text.find(BAD_INPUT)
    if i < 0:
        return None
    return text[i + len(BAD_INPUT):].splitlines()[0].strip()
