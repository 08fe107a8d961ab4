"""Hard-negative mining (docs/design.md §2): the pool, the top-k table, the descriptors it ranks, and the mined half
of the batches."""
import math
import os

import numpy as np
import pytest

from geoloc.nn import embedding
from geoloc.data import images
import input_data
from geoloc.train import mining
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


def test_released_ranking_keeps_zero_descriptors():
    """A pool tile no batch wrote keeps its zero descriptor: it scores exactly 0, so it ranks below every tile of
    positive similarity and above every tile of negative similarity; a panorama no batch wrote scores 0 against
    the whole pool (its row: the pool's first tiles, top_k's order of ties)."""
    buf = mining.MiningBuffer.run_long(n_panos=3, n_tiles=6, dim=3)
    assert buf.sat.dtype == np.float16 and len(buf.pool) == 6
    # tiles 0, 2, 4, 5 at 10, 80, 150, 170 degrees; tiles 1 and 3 never in a batch
    buf.add(np.array([0, 1]), angles([0, 165]), np.array([0, 2]), angles([10, 80]))
    buf.add(np.array([0]), angles([0]), np.array([4]), angles([150]))
    buf.add(np.array([0]), angles([0]), np.array([5]), angles([170]))
    pool = np.array([0, 1, 2, 3, 4, 5])
    # panorama 0 at 0 deg: tiles 0, 2 (cos 10, cos 80) > 1, 3 (exactly 0, lower id first) > 4, 5 (cos 150, cos 170)
    # panorama 1 at 165 deg: tiles 5, 4, 2 (cos 5, cos 15, cos 85) > 1, 3 (0) > 0 (cos 155)
    table = buf.rank(pool, 6)
    np.testing.assert_array_equal(table[0], [0, 2, 1, 3, 4, 5])
    np.testing.assert_array_equal(table[1], [5, 4, 2, 1, 3, 0])
    np.testing.assert_array_equal(table[2], [0, 1, 2, 3, 4, 5])         # all ties at 0
    assert buf.unseen(pool) == (2, 1) and buf.unseen(np.array([0, 2])) == (0, 1)
    # the per-epoch buffer of --mining_fill 1 would have ranked tiles 1 and 3 with computed descriptors instead;
    # here they stay exactly zero and keep their place between the positive and the negative similarities
    assert not buf.sat[1].any() and not buf.sat[3].any() and not buf.grd[2].any()


def test_run_long_table_keeps_the_last_batch_of_any_epoch():
    """The released table is not reset between epochs: a tile keeps the descriptor of the last batch that held
    it (stale, from an earlier epoch) until a later batch overwrites it."""
    buf = mining.MiningBuffer.run_long(n_panos=2, n_tiles=4, dim=3)
    buf.add(np.array([0]), angles([0]), np.array([1]), angles([30]))      # epoch 1
    buf.add(np.array([1]), angles([90]), np.array([2]), angles([60]))     # epoch 2: tile 1 not in a batch
    np.testing.assert_allclose(buf.sat[1], angles([30])[0], atol=1e-3)
    buf.add(np.array([1]), angles([90]), np.array([1]), angles([120]))    # a later batch overwrites it
    np.testing.assert_allclose(buf.sat[1], angles([120])[0], atol=1e-3)
    back = mining.MiningBuffer.from_state(4, {k: np.copy(v) for k, v in buf.state().items()})
    assert back.sat.dtype == np.float16 and back.pending == -1
    buf.pending = 3
    assert mining.MiningBuffer.from_state(4, buf.state()).pending == 3


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


def test_fill_missing_of_given_panoramas_only(tiny_model):
    """The batches before a checkpoint saved without descriptors: their panoramas and positive tiles only."""
    embedder, split, cfg = tiny_model
    buf = mining.MiningBuffer.run_long(len(split), len(split.tile_paths), embedder.model.dim)
    buf.fill_missing(split, embedder, cfg, panos=np.array([4, 9, 4]))
    assert np.flatnonzero(buf.grd_seen).tolist() == [4, 9]
    assert np.flatnonzero(buf.sat_seen).tolist() == sorted(set(split.tiles[[4, 9], 0].tolist()))
    assert np.abs(buf.grd[[4, 9]]).sum() > 0 and not np.delete(buf.grd, [4, 9], axis=0).any()
    assert not np.delete(buf.sat, np.flatnonzero(buf.sat_seen), axis=0).any()


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


def test_a_run_ranks_what_its_batches_wrote(tiny_vigor, tmp_path, capsys):
    """By default (--mining_fill 0) the round after epoch 1 ranks the table its batches wrote: the one saved
    beside ckpt-9 holds exactly epoch 1's panoramas and their positive tiles, every other row zero, and the
    hard table is its ranking of the round's pool, zeros included. --mining_fill 1 keeps a per-epoch buffer of
    the pool and ranks other descriptors."""
    import tensorflow as tf
    from conftest import TINY
    import train_first_E_1
    from geoloc import cli
    data = tiny_vigor(3)
    split = input_data.load_vigor(data, 'train')
    n_tiles = len(split.tile_paths)
    hard = {}
    for fill in ('0', '1'):
        run_dir = str(tmp_path / f'fill{fill}')
        argv = TINY + ['--data_root', data, '--run_dir', run_dir, '--epochs', '2', '--max_steps', '10',
                       '--mining_start_epoch', '2', '--ckpt_every', '100', '--mining_fill', fill]
        capsys.readouterr()
        assert cli.main([train_first_E_1.PHASE_A], argv) == 0
        out = capsys.readouterr().out
        ckpt = f'{run_dir}/phase_a/ckpt/ckpt-9'
        hard[fill] = tf.train.load_checkpoint(ckpt).get_tensor('hard/.ATTRIBUTES/VARIABLE_VALUE')
        if fill == '1':
            assert 'zero descriptors' not in out and not os.path.exists(ckpt + '.mining.npz')
            with np.load(f'{run_dir}/phase_a/ckpt/ckpt-10.mining.npz') as f:
                assert len(f['pool']) == 20 and f['sat'].dtype == np.float32
            continue
        assert 'rank with zero descriptors (as released)' in out
        with np.load(ckpt + '.mining.npz') as f:
            buf = mining.MiningBuffer.from_state(n_tiles, {k: f[k] for k in f.files})
        panos = input_data.BatchSampler(split, 4, 0, 9).epoch_plan(0)[0]
        assert np.flatnonzero(buf.grd_seen).tolist() == sorted(set(panos.ravel().tolist()))
        assert np.flatnonzero(buf.sat_seen).tolist() == sorted(set(split.tiles[panos.ravel(), 0].tolist()))
        assert not buf.grd[~buf.grd_seen].any() and not buf.sat[~buf.sat_seen].any()
        assert buf.grd[buf.grd_seen].any(axis=1).all() and buf.pending == -1
        pool = mining.mining_pool(0, 0, n_tiles, 20)
        unseen_tiles, unseen_panos = buf.unseen(pool)
        assert unseen_tiles > 0 and f'{unseen_tiles} pool tiles and {unseen_panos} panoramas in no batch yet' in out
        np.testing.assert_array_equal(hard['0'], buf.rank(pool, 5))
    assert not np.array_equal(hard['0'], hard['1'])
