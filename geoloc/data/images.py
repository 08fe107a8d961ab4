"""Reading one image in Python: JPEG/PNG decoding with OpenCV (BGR) and checks, INTER_AREA resizing and
the VGG mean. TensorFlow-free. This is the reference reader: pipeline.py decodes the same files with
TensorFlow's ops inside tf.data (no interpreter lock) and, when its graph finds a bad image, asks
load_image for the message; prepare_data.py writes a resized copy of a dataset with load_image(exact=True).

Bad images raise input_data.DataError with a one-line message naming the file. Images are never upscaled:
a file smaller than the size it is read at is refused (an 8x8 tile read at 64x64 would be 64 copies of
each pixel, not an aerial image).
"""
import io

import cv2
import numpy as np
from PIL import Image

from geoloc.data.geometry import VGG_MEAN_BGR
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


def reduction(on_file, hw):
    """The largest libjpeg DCT scaling 1/f (f in 1, 2, 4, 8) that keeps both sides of a JPEG of size
    on_file = (h, w) at least 1.5 times hw = (H, W) (libjpeg rounds a scaled side up).

    The area resize that follows must shrink by 1.5x or more to average away what the DCT scaling does
    to edges: against a full decode + INTER_AREA, an edge-rich 1024x512 JPEG read at 200x100 differs by
    0.66 grey levels on average after a 1/2 decode (2.6x left to resize) but by 2.3 after a 1/4 one
    (1.3x left); a 2048x1024 panorama read at 640x320 (1/2, 1.6x left) by 0.33, at 128x64 (1/8, 2x) by 0.28.
    """
    return max((f for f in (2, 4, 8) if 2 * -(-on_file[0] // f) >= 3 * hw[0] and 2 * -(-on_file[1] // f) >= 3 * hw[1]),
               default=1)


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def check_complete(path, data):
    """DataError unless the bytes of a JPEG end with its end-of-image marker and those of a PNG with its IEND
    chunk: OpenCV decodes a truncated file without an error, its missing rows grey."""
    if data[:2] == b'\xff\xd8' and b'\xff\xd9' not in data[-64:]:
        _fail(f'{path}: truncated JPEG (no end-of-image marker)')
    if data[:8] == b'\x89PNG\r\n\x1a\n' and b'IEND' not in data[-64:]:
        _fail(f'{path}: truncated PNG (no IEND chunk)')


def decode_image(path, min_hw=None):
    """The 8-bit BGR(A) or grayscale pixels of a JPEG/PNG file and its (height, width) on file; DataError
    naming what is wrong.

    OpenCV decodes a truncated JPEG without an error (the missing rows come out grey), so a JPEG
    must end with its end-of-image marker and a PNG with its IEND chunk. With min_hw, a 3-component
    JPEG at least three times that size is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT
    (`reduction`): a 2048x1024 panorama read at 320x640 costs 2.2x less
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
    check_complete(path, data)
    if data[:2] == b'\xff\xd8':
        shape = _jpeg_colour_size(data) if min_hw is not None else None
        if shape is not None and reduction(shape, min_hw) > 1:
            flags = _REDUCED[reduction(shape, min_hw)] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        _fail(f'{path}: unreadable image (missing, corrupt or not JPEG/PNG)')
    return img, (shape or img.shape[:2])


def check_size(path, on_file, hw, kind):
    """The checks on an image's size on file (h, w) read at hw = (H, W) as a 'panorama' (W = 2H) or an
    'aerial' (square); DataError naming what is wrong."""
    h, w = on_file
    if kind == 'panorama' and w != 2 * h:
        _fail(f'{path}: wrong size: expected a 360-degree panorama with width = 2 x height, got {w}x{h}')
    if kind == 'aerial' and w != h:
        _fail(f'{path}: wrong size: expected a square aerial image, got {w}x{h}')
    if h < hw[0] or w < hw[1]:
        _fail(f'{path}: too small: {w}x{h}, read at {hw[1]}x{hw[0]} (images are never upscaled)')


def load_image(path, hw, kind, exact=False):
    """Read with OpenCV (BGR), check, resize with INTER_AREA to hw = (H, W). Returns uint8 [H, W, 3].

    kind: 'panorama' (expects W = 2H) or 'aerial' (expects a square). exact: decode a JPEG at full
    scale (docs/design.md §2's OpenCV full decode + INTER_AREA, bit for bit) instead of at a reduced DCT scale.
    """
    if isinstance(path, bytes):
        path = path.decode()
    img, (h, w) = decode_image(path, None if exact else hw)
    if img.dtype != np.uint8:
        _fail(f'{path}: expected 8 bits per channel, got {img.dtype}')
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        _fail(f'{path}: expected a 3-channel colour {kind}, got a grayscale image')
    if img.shape[2] == 4:
        img = img[:, :, :3]
    check_size(path, (h, w), hw, kind)
    if img.shape[:2] != tuple(hw):
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def read_image(path, hw, kind):
    """load_image minus the VGG mean: the network's float32 [H, W, 3] input."""
    return load_image(path, hw, kind).astype(np.float32) - np.array(VGG_MEAN_BGR, np.float32)
