"""Hard-negative mining (docs/design.md §2): the pool, the top-k table, the descriptors it ranks, and the mined half
of the batches."""
import math

import numpy as np
import pytest

import embedding
import images
import input_data
import mining
import model


def angles(degrees):
    """Unit vectors in the first two of three dimensions at these angles."""
    r = np.radians(np.asarray(degrees, np.float64))
    return np.stack([np.cos(r), np.sin(r), np.zeros_like(r)], 1).astype(np.float32)


def test_table_ranks_pool_tiles_by_similarity_by_hand():
    # pool tiles (ids 3, 7, 8, 20, 31) at 0, 30, 60, 90, 120 degrees
    pool = np.array([3, 7, 8, 20, 31])
    pool_desc = angles([0, 30, 60, 90, 120])
    # a panorama at 50 deg: cos of 50, 20, 10, 40, 70 -> 60 deg (8), 30 (7), 90 (20), 0 (3), 120 (31)
    # one at 100 deg:       cos of 100, 70, 40, 10, 20 -> 90 (20), 120 (31), 60 (8), 30 (7), 0 (3)
    grd = angles([50, 100]).astype(np.float16)
    table = mining.hard_negatives(grd, pool_desc, pool, topk=3, rows=1)
    assert table.shape == (2, 3) and table.dtype == np.int32
    np.testing.assert_array_equal(table, [[8, 7, 20], [20, 31, 8]])
    # more wanted than the pool holds: the ranking repeats
    table = mining.hard_negatives(grd, pool_desc, pool, topk=7)
    np.testing.assert_array_equal(table, [[8, 7, 20, 3, 31, 8, 7], [20, 31, 8, 7, 3, 20, 31]])


def test_table_matches_brute_force_in_blocks():
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    grd, pool_desc = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(200, 16)))
    pool = np.sort(rng.choice(1000, 200, replace=False))
    table = mining.hard_negatives(grd, pool_desc, pool, topk=10, rows=16)    # 4 blocks, the last short
    sim = grd @ pool_desc.T
    expected = pool[np.argsort(-sim, axis=1, kind='stable')[:, :10]]
    np.testing.assert_array_equal(table, expected)
    # the first entries are the most similar pool tiles: nothing outside the row beats its last entry
    slot = {t: i for i, t in enumerate(pool)}
    for q in range(50):
        kept = sim[q, [slot[t] for t in table[q]]]
        assert np.all(np.diff(kept) <= 0) and kept[-1] >= np.delete(sim[q], [slot[t] for t in table[q]]).max()


def test_pool_follows_seed_and_epoch():
    assert len(mining.mining_pool(0, 0, 90000, 40000)) == 40000
    pool = mining.mining_pool(0, 0, 90000, 40000)
    assert np.all(np.diff(pool) > 0) and pool[0] >= 0 and pool[-1] < 90000
    np.testing.assert_array_equal(pool, mining.mining_pool(0, 0, 90000, 40000))
    assert not np.array_equal(pool, mining.mining_pool(0, 1, 90000, 40000))
    np.testing.assert_array_equal(mining.mining_pool(0, 3, 36, 40000), np.arange(36))


def test_buffer_keeps_the_pool_tiles_only():
    buf = mining.MiningBuffer(n_panos=4, n_tiles=6, pool=np.array([2, 5]), dim=3)
    assert buf.grd.shape == (4, 3) and buf.sat.shape == (2, 3)        # memory: Q + P rows, not Q + N
    buf.add(np.array([0, 3]), angles([0, 90]), np.array([5, 4]), angles([30, 60]))
    np.testing.assert_array_equal(buf.grd_seen, [True, False, False, True])
    np.testing.assert_array_equal(buf.sat_seen, [False, True])        # tile 4 is not in the pool
    np.testing.assert_allclose(buf.sat[1], angles([30])[0])
    np.testing.assert_allclose(buf.grd[3], angles([90])[0], atol=1e-3)
    nan = np.full((1, 3), np.nan, np.float32)
    buf.add(np.array([1]), nan, np.array([2]), nan)                  # an overflowed step: left for fill_missing
    assert not buf.grd_seen[1] and not buf.sat_seen[0] and np.isfinite(buf.grd).all()


@pytest.fixture(scope='module')
def tiny_model(tiny_vigor):
    import config
    split = input_data.load_vigor(tiny_vigor(3), 'train')
    cfg = config.resolve('E_1a', {'grd_size': (32, 64), 'sat_size': 64, 'width': 0.0625, 'eval_batch': 8})
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    return embedding.Embedder(m), split, cfg


def test_round_ranks_with_the_gathered_descriptors(tiny_model):
    embedder, split, cfg = tiny_model
    n_panos, n_tiles, dim = len(split), len(split.tile_paths), embedder.model.dim
    pool = mining.mining_pool(0, 0, n_tiles, 40000)
    buf = mining.MiningBuffer(n_panos, n_tiles, pool, dim)
    # made-up descriptors for everything, as if gathered: panorama p looks exactly like tile (p + 5) % N
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(n_tiles, dim)).astype(np.float32)
    tiles /= np.linalg.norm(tiles, axis=1, keepdims=True)
    buf.add(np.arange(n_panos), tiles[(np.arange(n_panos) + 5) % n_tiles], np.arange(n_tiles), tiles)
    buf.fill_missing(split, embedder, cfg)            # nothing missing: nothing recomputed
    hard = mining.hard_negatives(buf.grd, buf.sat, buf.pool, 5)
    assert hard.shape == (n_panos, 5)
    np.testing.assert_array_equal(hard[:, 0], (np.arange(n_panos) + 5) % n_tiles)


def test_fill_missing_computes_only_what_the_epoch_did_not_gather(tiny_model):
    embedder, split, cfg = tiny_model
    n_panos, n_tiles, dim = len(split), len(split.tile_paths), embedder.model.dim
    buf = mining.MiningBuffer(n_panos, n_tiles, np.arange(n_tiles), dim)
    gathered = np.full((2, dim), 1 / math.sqrt(dim), np.float32)
    buf.add(np.array([0, 1]), gathered, np.array([7, 8]), gathered)
    buf.fill_missing(split, embedder, cfg)
    assert buf.grd_seen.all() and buf.sat_seen.all()
    np.testing.assert_allclose(buf.grd[:2], gathered, atol=1e-3)          # kept, not recomputed
    np.testing.assert_array_equal(buf.sat[[7, 8]], gathered)
    unit = lambda x: x / np.linalg.norm(x)
    image = images.read_image(split.pano_paths[5], (32, 64), 'panorama')[None]
    np.testing.assert_allclose(buf.grd[5], unit(embedder.grd(image)[0]), atol=2e-3)
    image = images.read_image(split.tile_paths[3], (64, 64), 'aerial')[None]
    np.testing.assert_allclose(buf.sat[3], unit(embedder.sat(image)[0]), atol=1e-4)


def test_buffer_state_round_trip():
    buf = mining.MiningBuffer(n_panos=4, n_tiles=6, pool=np.array([2, 5]), dim=3)
    buf.add(np.array([0, 3]), angles([0, 90]), np.array([5, 4]), angles([30, 60]))
    back = mining.MiningBuffer.from_state(6, {k: np.copy(v) for k, v in buf.state().items()})
    for k in ('pool', 'grd', 'sat', 'grd_seen', 'sat_seen', 'slot'):
        np.testing.assert_array_equal(getattr(back, k), getattr(buf, k))


def ring_split(n=200):
    """n panoramas on n tiles: panorama p has positive p and semi-positives p+1, p+2, p+3 (mod n)."""
    tiles = (np.arange(n)[:, None] + np.arange(4)[None]) % n
    return input_data.Split('ring', [f'p{i}' for i in range(n)], [f't{i}' for i in range(n)], tiles,
                            np.zeros((n, 4, 2), np.float32), np.ones(n), np.zeros((n, 2)), np.zeros((n, 2)),
                            'euclidean')


def test_mined_half_takes_panoramas_whose_positive_is_a_hard_tile_of_its_anchor():
    split, batch = ring_split(), 8
    sampler = input_data.BatchSampler(split, batch, seed=3)
    # anchor a's hard tiles: 10 tiles spread around the ring, none of its own
    hard = (np.arange(200)[:, None] + 7 + 20 * np.arange(1, 11)[None]) % 200
    half = (batch + 1) // 2                          # random items 0..half-1; item half + i is mined for item i
    follows = lambda plan: np.mean([split.tiles[row[half + i], 0] in hard[row[i]]
                                    for row in plan for i in range(batch - half)])
    for epoch in range(3):
        plan, semi = sampler.epoch_plan(epoch, hard)
        assert follows(plan) == 1.0                  # every mined slot, none fell back to random
        for row, k in zip(plan, semi):
            tiles = split.tiles[row].ravel()
            assert len(set(tiles.tolist())) == 4 * batch, 'a tile twice in a batch'
            assert np.all((k >= 1) & (k <= 3))
        np.testing.assert_array_equal(plan, input_data.BatchSampler(split, batch, seed=3).epoch_plan(epoch, hard)[0])
    assert follows(sampler.epoch_plan(0)[0]) < 0.3   # without the table the same slots are random
