"""pipeline.py: the tf.data datasets over input_data's splits (batches, caching, errors crossing tf.data)."""
import numpy as np
import pytest
import tensorflow as tf

import images
import input_data
import pipeline


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(4)


def test_cached_pipeline_gives_the_same_batches_and_decodes_once(vigor):
    split = input_data.load_vigor(vigor, 'train')
    panos, semi = input_data.BatchSampler(split, batch=4, seed=0).epoch_plan(0)
    plain = list(pipeline.train_dataset(split, panos, semi, (32, 64), 64, 4))
    cache = images.ImageCache(2 ** 30)
    misses = []
    for _ in range(2):
        cached = list(pipeline.train_dataset(split, panos, semi, (32, 64), 64, 4, cache=cache))
        for a, b in zip(plain, cached):
            for k in ('grd', 'sat', 'semi'):
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
        misses.append(cache.misses)
    distinct = len(set(panos.ravel())) + len({int(t) for t in split.tiles[panos.ravel(), 0]} |
                                             {int(t) for t in split.tiles[panos.ravel(), semi.ravel()]})
    # (two threads may both miss an image wanted by two batches in flight: misses >= distinct)
    assert len(cache.images) == distinct <= misses[0] == misses[1]


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
    np.testing.assert_array_equal(b['pano'].numpy(), panos[0])
    np.testing.assert_array_equal(b['semi_k'].numpy(), semi[0])
    np.testing.assert_array_equal(b['sat_idx'].numpy(), split.tiles[panos[0], 0])
    np.testing.assert_allclose(b['delta'].numpy(), split.deltas[panos[0], 0])
    np.testing.assert_allclose(b['delta_semi'].numpy(), split.deltas[panos[0], semi[0]])
    direct = images.read_image(split.tile_paths[split.tiles[panos[0][1], 0]], (64, 64), 'aerial')
    np.testing.assert_allclose(b['sat'].numpy()[1], direct)


def test_train_dataset_without_semi_reads_no_semi_tile(vigor):
    """A stage whose loss ignores the semi-positive (E_1 phase a) decodes only panoramas and positives."""
    split = input_data.load_vigor(vigor, 'train')
    panos, semi = input_data.BatchSampler(split, batch=4, seed=0).epoch_plan(0)
    cache = images.ImageCache(2 ** 30)
    batches = list(pipeline.train_dataset(split, panos[:3], semi[:3], (32, 64), 64, 4, cache=cache,
                                          with_semi=False))
    assert len(batches) == 3 and all('semi' not in b and b['sat'].shape == (4, 64, 64, 3) for b in batches)
    read = {(p, (32, 64)) for p in np.array(split.pano_paths)[panos[:3].ravel()]} | \
        {(split.tile_paths[t], (64, 64)) for t in split.tiles[panos[:3].ravel(), 0]}
    assert set(cache.images) == read


def test_pair_dataset_keeps_the_order_of_its_pairs(vigor):
    split = input_data.load_vigor(vigor, 'test')
    queries, tiles = np.array([3, 0, 5]), np.array([7, 2, 2])
    batches = list(pipeline.pair_dataset(split, queries, tiles, (32, 64), 64, 2))
    assert [len(i) for _, _, i in batches] == [2, 1]
    grd, sat, idx = (np.concatenate([b[k].numpy() for b in batches]) for k in range(3))
    np.testing.assert_array_equal(idx, [0, 1, 2])
    for i, (q, t) in enumerate(zip(queries, tiles)):
        np.testing.assert_array_equal(grd[i], images.read_image(split.pano_paths[q], (32, 64), 'panorama'))
        np.testing.assert_array_equal(sat[i], images.read_image(split.tile_paths[t], (64, 64), 'aerial'))


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


def test_tf_data_error_is_one_line(vigor_copy):
    split = input_data.load_vigor(vigor_copy, 'train')
    with open(split.tile_paths[0], 'wb') as f:
        f.write(b'garbage')
    ds = pipeline.image_dataset(split.tile_paths[:2], (64, 64), 'aerial', 2)
    with pytest.raises(Exception) as e:
        list(ds)
    msg = pipeline.unwrap_error(e.value)
    assert msg == f'{split.tile_paths[0]}: unreadable image (missing, corrupt or not JPEG/PNG)'
