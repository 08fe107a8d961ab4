"""tf.data pipelines over input_data's splits: descriptor extraction (panoramas, tiles), training batches.

Every image is read by TensorFlow's own ops inside one tf.data map with one call in flight per core
(`cores()`): the file's header is checked in the graph, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in
libjpeg's DCT when it is read smaller (images.reduction), a PNG in full; then an area resize and rounding
to uint8, and per batch RGB -> BGR and float32 minus the VGG mean (network_input). No Python runs per image, so decoding
spreads over every core whatever the interpreter lock does (benchmarks/bench_pipeline.py). Against
docs/design.md §2's OpenCV full decode + INTER_AREA the result differs by 0.35 grey levels on average at paper
size (benchmarks/README.md; tests/test_pipeline.py bounds it).

A bad image stops the dataset with an op error (an assertion) whose text holds BAD_INPUT, the item and its
files; unwrap_error turns it into a one-line message naming the file. The graph only decides that an image is
bad (a failed header check, or a decode op that failed: tf.data drops that item and the count of the
items that follow is out of step); the message is written by images.load_image, the Python reference
reader, when unwrap_error asks. Nothing outlives a dataset: the error's text is all unwrap_error reads.
"""
import base64
import os
import re

import cv2
import numpy as np
import tensorflow as tf

from geoloc.data import images
from geoloc.data.geometry import VGG_MEAN_BGR
from input_data import DataError

BAD_INPUT = 'BAD INPUT: '  # marks our messages when they cross a tf.data boundary

# What the graph's header check found (images.load_image words the message).
OK, EMPTY, NOT_IMAGE, TRUNCATED, NOT_8_BIT, NOT_COLOUR, WRONG_SIZE, TOO_SMALL = range(8)
STATUS = ('ok', 'empty file', 'not JPEG/PNG', 'truncated', 'not 8 bits per channel', 'not a colour image',
          'wrong size', 'too small')
_JPEG, _PNG, _NONE = 0, 4, 5           # decode branches: JPEG at 1/1, 1/2, 1/4, 1/8 = 0..3, PNG, nothing
_SMALL_JPEG = cv2.imencode('.jpg', np.zeros((8, 8, 3), np.uint8))[1].tobytes()


def cores():
    """The CPU cores this process may run on (its affinity mask): the map's calls in flight."""
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- one image in the graph

def _field(data, size, start, n, dtype=tf.uint8):
    """n bytes of `data` (of length size) from `start` (zero-padded past its end), as dtype (big-endian)."""
    padded = tf.strings.join([tf.strings.substr(data, tf.minimum(start, size), n), tf.constant(b'\0' * n)])
    return tf.io.decode_raw(tf.strings.substr(padded, 0, n), dtype, little_endian=False)


def inspect(data, hw, kind):
    """The header check of an encoded image read at hw = (H, W) as a 'panorama' (W = 2H) or an 'aerial'
    (square): -> (status (int32, OK or what is wrong), decode branch (int32)). Mirrors images.load_image:
    a JPEG must end with its end-of-image marker and a PNG with IEND; 8-bit colour; the kind's shape;
    at least hw (never upscaled). (Few, vectorised ops, no control flow: ~0.05 ms an image.)"""
    n = tf.strings.length(data)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b'\xff\xd8')
    is_png = tf.equal(tf.strings.substr(data, 0, 8), b'\x89PNG\r\n\x1a\n')
    tail = tf.cast(tf.io.decode_raw(tf.strings.substr(data, tf.maximum(n - 64, 0), 64), tf.uint8), tf.int32)
    pairs = tail[:-1] * 256 + tail[1:]
    eoi = tf.reduce_any(tf.equal(pairs, 0xFFD9))
    iend = tf.reduce_any(tf.equal(pairs[:-2] * 65536 + pairs[2:], 0x49454E44))            # 'IEND'
    png_wh = tf.cast(_field(data, n, 16, 8, tf.int32), tf.int64)                            # IHDR width, height
    png_depth_type = _field(data, n, 24, 2)                                               # bit depth, colour type
    # libjpeg reads the header of a JPEG, of a stand-in otherwise (a select, not a cond: ~0.07 ms less);
    # a JPEG header it cannot read fails the op
    jpeg_hwc = tf.io.extract_jpeg_shape(tf.where(is_jpeg & eoi, data, _SMALL_JPEG), tf.int64)
    h = tf.where(is_jpeg, jpeg_hwc[0], png_wh[1])
    w = tf.where(is_jpeg, jpeg_hwc[1], png_wh[0])
    colour_type = png_depth_type[1]
    colour = tf.where(is_jpeg, jpeg_hwc[2] >= 3, (colour_type == 2) | (colour_type == 3) | (colour_type == 6))
    eight_bit = is_jpeg | (png_depth_type[0] == 8) | (colour_type == 3)   # palette indices <= 8 bits: 8-bit colour
    shape_ok = tf.equal(w, 2 * h) if kind == 'panorama' else tf.equal(w, h)
    problems = tf.stack([tf.equal(n, 0), ~(is_jpeg | is_png), (is_jpeg & ~eoi) | (is_png & ~iend), ~eight_bit,
                         ~colour, ~shape_ok, (h < hw[0]) | (w < hw[1]), tf.constant(True)])   # in STATUS order
    status = (tf.cast(tf.argmax(problems), tf.int32) + 1) % len(STATUS)   # the first problem; none: OK
    # images.reduction: the largest 1/f leaving >= 1.5x to the area resize
    f = tf.constant([2, 4, 8], tf.int64)
    fits = tf.reduce_sum(tf.cast((2 * ((h + f - 1) // f) >= 3 * hw[0]) & (2 * ((w + f - 1) // f) >= 3 * hw[1]),
                                 tf.int32))
    branch = tf.where(status != OK, _NONE, tf.where(is_jpeg, _JPEG + fits, _PNG))
    return status, branch


def decode(data, branch, hw):
    """An encoded image -> uint8 [H, W, 3] RGB at hw = (H, W) (zeros for the branch of a bad image)."""
    def jpeg(ratio):
        # INTEGER_ACCURATE: libjpeg's islow IDCT, OpenCV's; fancy upsampling is on in both
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method='INTEGER_ACCURATE')
    rgb = tf.switch_case(branch, [jpeg(1), jpeg(2), jpeg(4), jpeg(8), lambda: tf.io.decode_png(data, channels=3),
                                  lambda: tf.zeros([hw[0], hw[1], 3], tf.uint8)])
    same = tf.reduce_all(tf.equal(tf.shape(rgb)[:2], hw))
    rgb = tf.cond(same, lambda: rgb, lambda: tf.cast(tf.round(tf.image.resize(rgb, hw, method='area')), tf.uint8))
    return tf.ensure_shape(rgb, [hw[0], hw[1], 3])


def read(path, hw, kind):
    """A file -> (uint8 [H, W, 3] RGB, status): read, check, decode, resize (network_input makes it BGR)."""
    data = tf.io.read_file(path)
    status, branch = inspect(data, hw, kind)
    return decode(data, branch, hw), status


_RGB_TO_BGR = np.eye(3, dtype=np.float32)[::-1]


def network_input(rgb):
    """uint8 [..., H, W, 3] RGB -> the network's float32 BGR minus the VGG mean (docs/design.md §2).

    The channel swap is a [3, 3] matmul and the mean is subtracted from rows of W x 3 values: on one
    core, for 10 images of 320x640, 8 ms against 18 for `cast - mean` alone (TensorFlow's broadcast over
    an innermost axis of 3, and its reverse of uint8 channels, are slow)."""
    shape, width = tf.shape(rgb), rgb.shape[-2]
    bgr = tf.matmul(tf.reshape(tf.cast(rgb, tf.float32), [-1, 3]), _RGB_TO_BGR)
    rows = tf.reshape(bgr, [-1, 3 * width]) - tf.tile(tf.constant(VGG_MEAN_BGR, tf.float32), [width])
    return tf.reshape(rows, shape)


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

def _batches(columns, readers, batch, output, cache=None, drop_remainder=False, decoded=False):
    """Batches over n items: output(x) of dicts x of the numpy `columns` ([n, ...] each) and, for every reader
    name -> (path column, hw, kind), that item's image, float32 [B, H, W, 3] minus the VGG mean (decoded: the
    uint8 RGB pixels as read); '_pos' is the item's index. (output runs before the prefetch: after it, a map
    would run on the consumer's thread.)"""
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

    # The path columns as tensors, shared by the dataset's slices and the check below (one copy): the check
    # looks up the paths of a bad item, which a dropped item no longer carries. They reach it as a
    # dataset's element, not as a capture of its traced function: a traced function lives in reference
    # cycles until the garbage collector runs, a dataset goes with its last reference (bench_soak.py).
    for col, _, _ in readers.values():
        table[col] = tf.constant(table[col])
    last = max(n - 1, 0)
    lookup = {col: (table[col] if n else tf.constant([''])) for col, _, _ in readers.values()}

    def describe(count, paths):
        """Item `count`'s paths with each reader's kind and size (kind:H:W:base64 path; base64 keeps a path's
        spaces and brackets out of the error's text)."""
        return tf.strings.join([tf.strings.join([f'{kind}:{hw[0]}:{hw[1]}:',
                                                 tf.io.encode_base64(tf.gather(paths[col], tf.minimum(count, last)))])
                                for col, hw, kind in readers.values()], separator=' ')

    def check(counted, paths):
        """Item `count` is the next in order and passed the header check, or the dataset stops; the error's
        text carries BAD_INPUT and everything unwrap_error needs: the item's paths, read sizes and kinds
        (looked up only when it stops; no Python runs here)."""
        count, x = counted
        codes = tf.stack([x['_status_' + name] for name in readers])
        ok = tf.equal(count, x['_pos']) & tf.reduce_all(tf.equal(codes, OK))
        detail = tf.cond(ok, lambda: tf.constant(''), lambda: describe(count, paths))
        failed = tf.debugging.Assert(ok, [BAD_INPUT + 'item', count, x['_pos'], codes, detail],
                                     summarize=len(readers))
        with tf.control_dependencies([failed]):
            return {k: tf.identity(v) for k, v in x.items() if not k.startswith('_status_')}

    def finish(x):
        return output(x if decoded else dict(x, **{name: network_input(x[name]) for name in readers}))

    ds = tf.data.Dataset.from_tensor_slices(table)
    ds = ds.map(load, num_parallel_calls=cores(), deterministic=True).ignore_errors()
    # An item whose decode op failed is dropped: the items counted after it are out of step with their
    # positions; an end marker (position n) catches the last item, and take(n) drops it.
    end = tf.data.Dataset.from_tensors({k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()})
    end = end.map(lambda x: dict(x, _pos=tf.constant(n, tf.int64)))
    ds = tf.data.Dataset.zip(ds.concatenate(end).enumerate(), tf.data.Dataset.from_tensors(lookup).repeat())
    ds = ds.map(check, num_parallel_calls=cores(), deterministic=True).take(n)
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    return ds.map(finish, num_parallel_calls=cores(), deterministic=True).prefetch(2)


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


def image_dataset(paths, hw, kind, batch, cache=None, views=None, decoded=False):
    """Deterministic batches of (images, index) over `paths`, for descriptor extraction and the tiles a heatmap
    branch localises in (embedding.Embedder.localise_tiles); cache: an ImageCache; views: [len(paths), 3] int64
    for apply_views (panoramas under a test protocol), or None. decoded: the images as uint8 RGB [B, H, W, 3]
    before network_input (a SavedModel's input; no views)."""
    columns = {'path': np.array(paths)}
    if decoded and views is not None:
        raise ValueError('views apply to the network input, not to decoded images')
    if views is None:
        output = lambda x: (x['img'], x['_pos'])
    else:
        columns['views'] = np.asarray(views, np.int64).reshape(len(paths), 3)
        output = lambda x: (apply_views(x['img'], x['views']), x['_pos'])
    return _batches(columns, {'img': ('path', tuple(hw), kind)}, batch, output, cache, decoded=decoded)


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
    """The one-line message of a bad image that stopped one of our datasets (an op error), or None.

    The error's text names the item (its position `count`; `pos`, the position of the item that met the
    check: a later one when the item's decode op failed and tf.data dropped it) and its files; the reference
    reader (images.load_image) words the message, so nothing of the dataset needs to outlive it."""
    m = re.search(re.escape(BAD_INPUT) + r'item\] \[(\d+)\] \[(\d+)\] \[([-\d ]+)\] \[([\w:= -]+)\]', str(exc))
    if m is None:
        return None
    count, pos, codes = int(m.group(1)), int(m.group(2)), [int(c) for c in m.group(3).split()]
    if pos != count:          # the item's decode op failed: no header check to report
        codes = [-1] * len(codes)
    files = []
    for token in m.group(4).split():
        kind, h, w, b64 = token.split(':')
        path = base64.urlsafe_b64decode(b64 + '=' * (-len(b64) % 4)).decode('utf-8', 'surrogateescape')
        files.append((path, (int(h), int(w)), kind))
    for (path, hw, kind), code in zip(files, codes):
        try:
            images.load_image(path, hw, kind)
        except DataError as e:
            return str(e)
        if code > OK:
            return f'{path}: {STATUS[code]} (TensorFlow\'s header check)'
    return f'{" or ".join(p for p, _, _ in files)}: unreadable image (TensorFlow cannot decode it)'
