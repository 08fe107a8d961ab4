"""Reading one image: JPEG/PNG decoding with OpenCV (BGR) and checks, INTER_AREA resizing, the VGG mean,
and a cache of decoded images. TensorFlow-free; pipeline.py runs it inside tf.data.

Bad images raise input_data.DataError with a one-line message naming the file.
"""
import io
import threading

import cv2
import numpy as np
from PIL import Image

from geometry import VGG_MEAN_BGR
from input_data import DataError


def _fail(msg):
    raise DataError(msg)


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
