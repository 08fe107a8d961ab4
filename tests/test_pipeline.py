"""pipeline.py: the tf.data datasets over input_data's splits (TensorFlow decoding against OpenCV, batches,
the image cache, bad images crossing tf.data as one line)."""
import cv2
import numpy as np
import pytest
import tensorflow as tf

from geoloc.data import geometry
from geoloc.data import images
import input_data
from geoloc.data import pipeline


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(4)


def textured(h, w, seed=0):
    """A colour image with edges and fine texture (smooth gradients alone would hide resampling errors)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 90 * np.sin(x / 13 + y / 29), 128 + 90 * np.cos(y / 11), 128 + 60 * np.sin((x - y) / 7)], -1)
    img[(x // 37 + y // 23) % 5 == 0] = (20, 200, 240)                     # sharp-edged blocks
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def tf_read(paths, hw, kind, batch=8):
    """uint8 images as pipeline.image_dataset reads them (the VGG mean added back)."""
    out = [x.numpy() for x, _ in pipeline.image_dataset(paths, hw, kind, batch)]
    return np.rint(np.concatenate(out) + np.array(geometry.VGG_MEAN_BGR, np.float32)).astype(np.uint8)


def opencv(path, hw):
    """docs/design.md §2: OpenCV full decode + INTER_AREA."""
    return cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def test_tensorflow_decoding_matches_opencv_within_tolerance(tmp_path):
    """BGR order, area resize, the mean. Against images.load_image (OpenCV, the same libjpeg DCT scaling):
    at most 1 grey level (area-resize rounding). Against docs/design.md §2's OpenCV full decode + INTER_AREA, on an
    edge-rich JPEG read at 1/2 or 1/4 scale: mean < 1.2, 99.9th percentile <= 24 grey levels (measured
    0.61-0.98 and 9-18; the paper-size city: benchmarks/README.md); read at its own size, or a PNG: <= 1."""
    jpeg, png = str(tmp_path / 'p.jpg'), str(tmp_path / 't.png')
    cv2.imwrite(jpeg, textured(512, 1024), [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(png, textured(96, 96, seed=1))
    for path, hw, kind in ((jpeg, (64, 128), 'panorama'), (jpeg, (100, 200), 'panorama'),
                           (jpeg, (128, 256), 'panorama'), (jpeg, (512, 1024), 'panorama'),
                           (png, (64, 64), 'aerial'), (png, (96, 96), 'aerial'), (png, (48, 48), 'aerial')):
        ours = tf_read([path], hw, kind)[0].astype(int)
        assert ours.shape == (hw[0], hw[1], 3)
        assert np.abs(ours - images.load_image(path, hw, kind)).max() <= 1
        diff = np.abs(ours - opencv(path, hw))
        assert diff.mean() < 1.2 and np.percentile(diff, 99.9) <= 24, (hw, diff.mean(), np.percentile(diff, 99.9))
        if path == png or hw == (512, 1024):
            assert diff.max() <= 1
    # channel order: a pure blue PNG is (255, 0, 0) in BGR, minus the mean
    cv2.imwrite(str(tmp_path / 'blue.png'), np.tile(np.array([255, 0, 0], np.uint8), (64, 64, 1)))
    x, _ = next(iter(pipeline.image_dataset([str(tmp_path / 'blue.png')], (64, 64), 'aerial', 1)))
    np.testing.assert_allclose(x.numpy()[0, 0, 0], np.array([255, 0, 0]) - np.array(geometry.VGG_MEAN_BGR), atol=1e-4)


def test_jpeg_reduction_is_chosen_in_the_graph(tmp_path):
    """The DCT scale of images.reduction (the largest leaving >= 1.5x to the area resize), chosen from the header."""
    path = str(tmp_path / 'p.jpg')
    cv2.imwrite(path, textured(256, 512), [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = tf.io.read_file(path)
    for hw, factor in (((64, 128), 2), ((100, 200), 1), ((32, 64), 4), ((16, 32), 8), ((256, 512), 1)):
        assert images.reduction((256, 512), hw) == factor
        status, branch = pipeline.inspect(data, hw, 'panorama')
        assert int(status) == pipeline.OK and int(branch) == {1: 0, 2: 1, 4: 2, 8: 3}[factor]
    status, _ = pipeline.inspect(data, (257, 514), 'panorama')
    assert int(status) == pipeline.TOO_SMALL


def test_train_dataset_batches(vigor):
    split = input_data.load_vigor(vigor, 'train')
    sampler = input_data.BatchSampler(split, batch=4, seed=0)
    panos, semi = sampler.epoch_plan(0)
    ds = pipeline.train_dataset(split, panos[:2], semi[:2], (32, 64), 64, 4)
    batches = list(ds)
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {'grd', 'sat', 'semi', 'delta', 'delta_semi', 'pano', 'semi_k', 'sat_idx'}
    assert b['grd'].shape == (4, 32, 64, 3) and b['sat'].shape == (4, 64, 64, 3) and b['semi'].shape == (4, 64, 64, 3)
    assert b['grd'].dtype == tf.float32
    np.testing.assert_array_equal(b['pano'].numpy(), panos[0])
    np.testing.assert_array_equal(b['semi_k'].numpy(), semi[0])
    np.testing.assert_array_equal(b['sat_idx'].numpy(), split.tiles[panos[0], 0])
    np.testing.assert_allclose(b['delta'].numpy(), split.deltas[panos[0], 0])
    np.testing.assert_allclose(b['delta_semi'].numpy(), split.deltas[panos[0], semi[0]])
    direct = images.read_image(split.tile_paths[split.tiles[panos[0][1], 0]], (64, 64), 'aerial')
    np.testing.assert_allclose(b['sat'].numpy()[1], direct)
    grd = images.read_image(split.pano_paths[panos[0][2]], (32, 64), 'panorama')
    np.testing.assert_allclose(b['grd'].numpy()[2], grd)


def test_cached_pipeline_gives_the_same_batches_and_decodes_once(vigor):
    split = input_data.load_vigor(vigor, 'train')
    panos, semi = input_data.BatchSampler(split, batch=4, seed=0).epoch_plan(0)
    panos, semi = panos[:8], semi[:8]
    plain = list(pipeline.train_dataset(split, panos, semi, (32, 64), 64, 4))
    cache = pipeline.ImageCache(2 ** 30)
    decoded = []
    for _ in range(2):
        cached = list(pipeline.train_dataset(split, panos, semi, (32, 64), 64, 4, cache=cache))
        assert len(cached) == len(plain)
        for a, b in zip(plain, cached):
            for k in ('grd', 'sat', 'semi'):
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
        decoded.append(cache.decoded)
    distinct = len(set(panos.ravel())) + len({int(t) for t in split.tiles[panos.ravel(), 0]} |
                                             {int(t) for t in split.tiles[panos.ravel(), semi.ravel()]})
    # (two items in flight may both decode an image they share: decoded >= distinct); the second epoch decodes nothing
    assert len(cache.slots) == distinct <= decoded[0] == decoded[1]


def test_image_cache_keeps_the_first_paths_up_to_its_budget(vigor):
    split = input_data.load_vigor(vigor, 'train')
    one = 64 * 64 * 3
    cache = pipeline.ImageCache(3 * one + 10)
    np.testing.assert_array_equal(cache.assign(split.tile_paths[:5], (64, 64)), [0, 1, 2, -1, -1])
    assert cache.bytes == 3 * one
    np.testing.assert_array_equal(cache.assign(split.tile_paths[2::-1], (64, 64)), [2, 1, 0])  # kept slots
    first = list(pipeline.image_dataset(split.tile_paths[:5], (64, 64), 'aerial', 5, cache=cache))
    again = list(pipeline.image_dataset(split.tile_paths[:5], (64, 64), 'aerial', 5, cache=cache))
    np.testing.assert_array_equal(first[0][0].numpy(), again[0][0].numpy())
    assert cache.decoded == 5 + 2            # the two without a slot are decoded every time
    np.testing.assert_array_equal(cache.stores[(64, 64)][1].numpy(), [True, True, True])
    big = pipeline.ImageCache(2 ** 30)       # the store grows as paths come
    big.assign(split.tile_paths[:2], (64, 64))
    big.assign(split.tile_paths[:7], (64, 64))
    assert big.stores[(64, 64)][0].shape[0] >= 7 and big.count[(64, 64)] == 7


def test_train_dataset_without_semi_reads_no_semi_tile(vigor):
    """A stage whose loss ignores the semi-positive (E_1 phase a) decodes only panoramas and positives."""
    split = input_data.load_vigor(vigor, 'train')
    panos, semi = input_data.BatchSampler(split, batch=4, seed=0).epoch_plan(0)
    cache = pipeline.ImageCache(2 ** 30)
    batches = list(pipeline.train_dataset(split, panos[:3], semi[:3], (32, 64), 64, 4, cache=cache,
                                          with_semi=False))
    assert len(batches) == 3 and all('semi' not in b and b['sat'].shape == (4, 64, 64, 3) for b in batches)
    read = {(p, (32, 64)) for p in np.array(split.pano_paths)[panos[:3].ravel()]} | \
        {(split.tile_paths[t], (64, 64)) for t in split.tiles[panos[:3].ravel(), 0]}
    assert set(cache.slots) == read


def test_apply_views_is_a_column_roll_and_a_mask():
    img = tf.random.stateless_normal([3, 4, 64, 3], seed=(0, 1))
    views = np.array([[16, 0, 64], [0, 24, 16], [63, 60, 8]])
    out = pipeline.apply_views(img, tf.constant(views)).numpy()
    img = img.numpy()
    np.testing.assert_array_equal(out[0], np.roll(img[0], -16, axis=1))     # out[:, c] = img[:, c + 16]
    keep = np.zeros(64, bool)
    keep[24:40] = True
    np.testing.assert_array_equal(out[1], img[1] * keep[None, :, None])
    keep = np.zeros(64, bool)
    keep[[60, 61, 62, 63, 0, 1, 2, 3]] = True                                # a window across the seam
    np.testing.assert_array_equal(out[2], np.roll(img[2] * keep[None, :, None], 1, axis=1))


# ----------------------------------------------------------------------------- bad images

def first_error(paths, hw, kind, batch=2, cache=None):
    """The one-line message that stops image_dataset over `paths` (None if none does)."""
    try:
        list(pipeline.image_dataset(paths, hw, kind, batch, cache=cache))
    except tf.errors.OpError as e:
        msg = pipeline.unwrap_error(e)
        assert msg is not None, str(e)[:500]
        return msg
    return None


def reference_error(path, hw, kind):
    with pytest.raises(input_data.DataError) as e:
        images.load_image(path, hw, kind)
    return str(e.value)


@pytest.fixture(scope='module')
def bad_images(tmp_path_factory):
    """name -> (path, hw, kind, expected message) of one bad image of every class, and good ones around them."""
    d = tmp_path_factory.mktemp('bad')
    tile, pano = textured(64, 64), textured(64, 128)
    good = {'tile': str(d / 'good.png'), 'pano': str(d / 'good.jpg')}
    cv2.imwrite(good['tile'], tile)
    cv2.imwrite(good['pano'], pano)
    png, jpeg = open(good['tile'], 'rb').read(), open(good['pano'], 'rb').read()
    files = {
        'empty': (b'', 'aerial'),
        'html': (b'<html>not a picture</html>', 'aerial'),
        'truncated_jpeg': (jpeg[:len(jpeg) // 2], 'panorama'),
        'truncated_png': (png[:len(png) // 2], 'aerial'),
        'corrupt_png': (png[:100] + bytes(200) + png[300:], 'aerial'),        # zeros in the pixels; IEND intact
        'corrupt_jpeg_header': (jpeg[:2] + b'\xff\xc0\x00\x03' + bytes(40) + jpeg[-2:], 'panorama'),
    }
    out = {}
    for name, (data, kind) in files.items():
        path = str(d / (name + ('.jpg' if kind == 'panorama' else '.png')))
        open(path, 'wb').write(data)
        out[name] = (path, kind)
    written = {
        'gray_png': (cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY), '.png', 'aerial'),
        'gray_jpeg': (cv2.cvtColor(pano, cv2.COLOR_BGR2GRAY), '.jpg', 'panorama'),
        'deep_png': (tile.astype(np.uint16) * 257, '.png', 'aerial'),
        'square_pano': (tile, '.jpg', 'panorama'),
        'oblong_tile': (pano, '.png', 'aerial'),
        'tile_8x8': (tile[:8, :8], '.png', 'aerial'),                   # smaller than the read size: never upscaled
        'pano_16x8': (pano[:8, :16], '.jpg', 'panorama'),
    }
    for name, (img, ext, kind) in written.items():
        path = str(d / (name + ext))
        cv2.imwrite(path, img)
        out[name] = (path, kind)
    out['missing'] = (str(d / 'missing.png'), 'aerial')
    return good, out


def test_the_graph_flags_every_bad_image(bad_images):
    """Every class of bad image fails the graph's header check, or its decode op (which drops the item);
    the reference reader words the one-line message naming the file."""
    good, bad = bad_images
    readers = {kind: tf.function(lambda p, hw=hw, kind=kind: pipeline.read(p, hw, kind))
               for kind, hw in (('panorama', (64, 128)), ('aerial', (64, 64)))}
    op_failures = {'corrupt_png', 'corrupt_jpeg_header', 'missing'}
    for name, (path, kind) in bad.items():
        hw = (64, 128) if kind == 'panorama' else (64, 64)
        message = reference_error(path, hw, kind)
        assert message.startswith(path + ': ') and '\n' not in message
        try:
            _, status = readers[kind](tf.constant(path))
            assert int(status) != pipeline.OK and name not in op_failures, name
        except tf.errors.OpError:
            assert name in op_failures, name
    for kind, path in (('aerial', good['tile']), ('panorama', good['pano'])):
        assert int(readers[kind](tf.constant(path))[1]) == pipeline.OK
    assert reference_error(bad['tile_8x8'][0], (64, 64), 'aerial') == \
        f'{bad["tile_8x8"][0]}: too small: 8x8, read at 64x64 (images are never upscaled)'
    assert reference_error(bad['pano_16x8'][0], (64, 128), 'panorama').endswith(
        'too small: 16x8, read at 128x64 (images are never upscaled)')


def test_a_bad_image_stops_the_dataset_with_the_reference_message(bad_images):
    """A failed header check (a grayscale tile) and a failed decode op (a corrupt PNG, its item dropped by
    tf.data): alone, first, inside a batch and last (after the last item only the end marker sees the gap)."""
    good, bad = bad_images
    for name in ('gray_png', 'corrupt_png'):
        path, kind = bad[name]
        expected = reference_error(path, (64, 64), kind)
        for paths in ([path], [path, good['tile'], good['tile']], [good['tile']] * 2 + [path, good['tile']],
                      [good['tile'], path]):
            assert first_error(paths, (64, 64), kind) == expected, (name, paths)
    assert first_error([good['tile']] * 3, (64, 64), 'aerial') is None


def test_bad_images_through_the_cache_and_the_training_batches(bad_images, vigor_copy):
    good, bad = bad_images
    path, kind = bad['corrupt_png']
    cache = pipeline.ImageCache(2 ** 30)
    assert first_error([good['tile'], path], (64, 64), 'aerial', cache=cache) == reference_error(path, (64, 64), kind)
    assert first_error([good['tile']], (64, 64), 'aerial', cache=cache) is None        # the good one was kept
    split = input_data.load_vigor(vigor_copy, 'train')
    panos, semi = input_data.BatchSampler(split, batch=4, seed=0).epoch_plan(0)
    semi_tile = split.tile_paths[split.tiles[panos[1, 2], semi[1, 2]]]     # the semi-positive of batch 2's 3rd item
    cv2.imwrite(semi_tile, cv2.cvtColor(cv2.imread(semi_tile), cv2.COLOR_BGR2GRAY))
    with pytest.raises(tf.errors.OpError) as e:
        list(pipeline.train_dataset(split, panos, semi, (32, 64), 64, 4))
    assert pipeline.unwrap_error(e.value) == f'{semi_tile}: expected a 3-channel colour aerial, got a grayscale image'
    assert len(list(pipeline.train_dataset(split, panos[:1], semi[:1], (32, 64), 64, 4))) == 1   # batch 1 is fine


def test_tf_data_error_is_one_line(vigor_copy):
    split = input_data.load_vigor(vigor_copy, 'train')
    with open(split.tile_paths[0], 'wb') as f:
        f.write(b'garbage')
    ds = pipeline.image_dataset(split.tile_paths[:2], (64, 64), 'aerial', 2)
    with pytest.raises(Exception) as e:
        list(ds)
    msg = pipeline.unwrap_error(e.value)
    assert msg == f'{split.tile_paths[0]}: unreadable image (missing, corrupt or not JPEG/PNG)'


def test_a_too_small_tile_stops_a_stage_script_in_one_line(vigor_copy, tmp_path, capsys):
    """An 8x8 tile, smaller than the read size, is refused, not upscaled: one line from the stage script, status 2."""
    import train_first_E_1
    from geoloc import cli
    split = input_data.load_vigor(vigor_copy, 'train')
    p = input_data.BatchSampler(split, 4, 0).epoch_plan(0)[0][0, 0]
    tile = split.tile_paths[split.tiles[p, 0]]
    cv2.imwrite(tile, cv2.imread(tile)[:8, :8])
    argv = ['--data_root', vigor_copy, '--run_dir', str(tmp_path / 'run'), '--grd_size', '32', '64', '--sat_size', '64',
            '--width', '0.0625', '--batch', '4', '--max_steps', '1', '--val_every', '0', '--mining', '0']
    capsys.readouterr()
    assert cli.main([train_first_E_1.PHASE_A], argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'error: {tile}: too small: 8x8, read at 64x64 (images are never upscaled)']


def test_the_error_text_alone_names_the_file(bad_images, tmp_path):
    """The message is rebuilt from the error's text after its dataset is gone, for a path with spaces,
    brackets, commas and a non-ASCII letter, a failed header check and a dropped item alike."""
    import gc
    good, bad = bad_images
    for name in ('gray_png', 'corrupt_png'):
        path = str(tmp_path / f'{name} [a], [b] é,40.750038,-73.979685,.png')
        with open(bad[name][0], 'rb') as src, open(path, 'wb') as dst:
            dst.write(src.read())
        ds = pipeline.image_dataset([good['tile'], path, good['tile']], (64, 64), 'aerial', 2)
        with pytest.raises(tf.errors.OpError) as e:
            list(ds)
        text = str(e.value)
        del ds, e
        gc.collect()
        assert pipeline.unwrap_error(tf.errors.InvalidArgumentError(None, None, text)) == \
            reference_error(path, (64, 64), 'aerial')


def test_dropped_datasets_leave_no_paths_behind(tmp_path):
    """Building and dropping datasets holds no Python memory for them (a training run builds one a epoch,
    and more for every validation and mining round): after 20 datasets of 2,000 paths of 100 characters
    (800 kB of numpy strings each) the Python heap and numpy's buffers (tracemalloc) hold less than one
    dataset's paths more than before."""
    import gc
    import tracemalloc
    split_paths = [[f'{tmp_path}/{k:02d}/' + f'{i:06d}'.rjust(100 - len(str(tmp_path)) - 4, 'x') + '.png'
                    for i in range(2000)] for k in range(21)]
    pipeline.image_dataset(split_paths[20], (64, 64), 'aerial', 32)    # TensorFlow's one-off allocations
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for paths in split_paths[:20]:
            ds = pipeline.image_dataset(paths, (64, 64), 'aerial', 32)
            assert ds.element_spec is not None
        del ds
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2000 * 100 * 4, f'{held / 2 ** 20:.1f} MiB held after dropping 20 datasets'
