"""images.py: the reference reader: decoding, checks, reduced-scale JPEG decoding, the size rule."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from geoloc.data import geometry
from geoloc.data import images
import input_data


def test_read_image_checks(tmp_path):
    ok = np.full((40, 80, 3), 200, np.uint8)
    cv2.imwrite(str(tmp_path / 'p.jpg'), ok)
    img = images.read_image(str(tmp_path / 'p.jpg'), (32, 64), 'panorama')
    assert img.shape == (32, 64, 3) and img.dtype == np.float32
    # BGR mean subtracted: a uniform 200 image becomes 200 - mean per channel (JPEG: +-2)
    np.testing.assert_allclose(img.mean((0, 1)), 200 - np.array(geometry.VGG_MEAN_BGR), atol=2.5)
    cv2.imwrite(str(tmp_path / 'g.png'), np.zeros((40, 80), np.uint8))
    with pytest.raises(input_data.DataError, match='g.png: expected a 3-channel colour panorama, got a grayscale'):
        images.read_image(str(tmp_path / 'g.png'), (32, 64), 'panorama')
    cv2.imwrite(str(tmp_path / 'sq.png'), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(input_data.DataError, match='width = 2 x height, got 40x40'):
        images.read_image(str(tmp_path / 'sq.png'), (32, 64), 'panorama')
    with pytest.raises(input_data.DataError, match='square aerial image, got 80x40'):
        images.read_image(str(tmp_path / 'p.jpg'), (64, 64), 'aerial')
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(input_data.DataError, match='bad.png: unreadable image'):
        images.read_image(str(tmp_path / 'bad.png'), (64, 64), 'aerial')


def _smooth_colour(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(x / 23), 128 + 100 * np.cos(y / 17), 128 + 60 * np.sin((x + y) / 31)],
                    -1).astype(np.uint8)


def test_jpeg_is_decoded_at_a_reduced_scale_when_read_smaller(tmp_path):
    path = str(tmp_path / 'p.jpg')
    cv2.imwrite(path, _smooth_colour(256, 512), [cv2.IMWRITE_JPEG_QUALITY, 95])
    with open(path, 'rb') as f:
        assert images._jpeg_colour_size(f.read()) == (256, 512)
    pixels, on_file = images.decode_image(path, (64, 128))
    assert pixels.shape == (128, 256, 3) and on_file == (256, 512)      # 1/2 in libjpeg: 1/4 would leave 1x to resize
    assert images.decode_image(path, (32, 64))[0].shape == (64, 128, 3)    # 1/4: 2x left
    assert images.decode_image(path, (100, 200))[0].shape == (256, 512, 3)  # 1/2 would leave 1.28x
    assert images.decode_image(path)[0].shape == (256, 512, 3)
    full = cv2.resize(cv2.imread(path), (128, 64), interpolation=cv2.INTER_AREA).astype(float)
    diff = np.abs(images.load_image(path, (64, 128), 'panorama').astype(float) - full)
    assert diff.mean() < 1 and diff.max() <= 8
    np.testing.assert_array_equal(images.load_image(path, (64, 128), 'panorama', exact=True), full)  # docs/design.md §2
    # the checks still see the file as it is: a grayscale JPEG, a square one read as a panorama
    cv2.imwrite(str(tmp_path / 'g.jpg'), _smooth_colour(256, 512)[..., 0])
    with pytest.raises(input_data.DataError, match='g.jpg: expected a 3-channel colour panorama, got a grayscale'):
        images.load_image(str(tmp_path / 'g.jpg'), (64, 128), 'panorama')
    cv2.imwrite(str(tmp_path / 'sq.jpg'), _smooth_colour(256, 256))
    with pytest.raises(input_data.DataError, match='width = 2 x height, got 256x256'):
        images.load_image(str(tmp_path / 'sq.jpg'), (32, 64), 'panorama')


def test_images_are_never_upscaled(tmp_path):
    """Upscaling would invent the detail the network trains on: anything smaller than the size it is read at
    (an 8x8 tile, a 16x8 panorama) is refused; the size itself is fine."""
    cv2.imwrite(str(tmp_path / 't.png'), _smooth_colour(8, 8))
    with pytest.raises(input_data.DataError) as e:
        images.load_image(str(tmp_path / 't.png'), (64, 64), 'aerial')
    assert str(e.value) == f'{tmp_path / "t.png"}: too small: 8x8, read at 64x64 (images are never upscaled)'
    cv2.imwrite(str(tmp_path / 'p.jpg'), _smooth_colour(8, 16))
    with pytest.raises(input_data.DataError, match=r'p.jpg: too small: 16x8, read at 128x64 \(images are never'):
        images.load_image(str(tmp_path / 'p.jpg'), (64, 128), 'panorama')
    cv2.imwrite(str(tmp_path / 'q.jpg'), _smooth_colour(32, 64))
    with pytest.raises(input_data.DataError, match='too small: 64x32, read at 66x33'):
        images.load_image(str(tmp_path / 'q.jpg'), (33, 66), 'panorama')
    assert images.load_image(str(tmp_path / 'q.jpg'), (32, 64), 'panorama').shape == (32, 64, 3)
    assert images.load_image(str(tmp_path / 'q.jpg'), (31, 62), 'panorama').shape == (31, 62, 3)


def test_jpeg_colour_size_reads_only_colour_jpeg_headers():
    def encoded(fmt, image, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()
    colour = encoded('JPEG', Image.new('RGB', (48, 24)))
    assert images._jpeg_colour_size(colour) == (24, 48)                  # (height, width)
    scan = colour.index(b'\xff\xda')                                         # start of scan
    assert images._jpeg_colour_size(colour[:scan + 20]) == (24, 48)      # the header is enough
    assert images._jpeg_colour_size(encoded('JPEG', Image.new('L', (48, 24)))) is None       # 1 component
    assert images._jpeg_colour_size(encoded('JPEG', Image.new('CMYK', (48, 24)))) is None    # 4 components
    assert images._jpeg_colour_size(encoded('PNG', Image.new('RGB', (48, 24)))) is None
    assert images._jpeg_colour_size(colour[:20]) is None                 # no frame header
    assert images._jpeg_colour_size(b'\xff\xd8garbage') is None
