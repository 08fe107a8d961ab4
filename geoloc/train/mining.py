"""Hard-negative mining (E_1, E_2): after an epoch, rank a pool of tiles against every training panorama
and keep each panorama's most similar tiles (docs/design.md §2).

What is ranked, per --mining_fill:
  0 (the released code's): one table for the whole run of a stage, written by the training batches only
    (the release's `sat_global_train[batch_list_sat] = ...`): a panorama or tile keeps the descriptor of the
    last batch that held it, from this epoch or an earlier one, and one that no batch has held yet keeps the
    zero it started with. A zero descriptor scores exactly 0 against every panorama: it ranks below every
    tile of positive similarity and above every tile of negative similarity, and a panorama of zero
    descriptor scores 0 against the whole pool (its row is the pool's first tiles, the tie order of top_k).
    E_1 phase b continues phase a's table, as the release loads phase a's `sat_global_train`.
  1 (the port's option): a buffer per mining epoch, of the pool's tiles only; before the round, every
    panorama and pool tile the epoch's batches did not hold is computed with the current weights.

The next epoch's sampler (input_data.BatchSampler) makes half of each batch from panoramas whose
positive is among an anchor's hard tiles.
"""
import numpy as np
import tensorflow as tf


def mining_pool(seed, epoch, n_tiles, size):
    """Sorted ids of the tiles ranked by the mining round at the end of `epoch`: `size` of them, all if fewer."""
    rng = np.random.default_rng([seed, epoch, 17])
    return np.sort(rng.choice(n_tiles, min(size, n_tiles), replace=False))


class MiningBuffer:
    """The descriptors a mining round ranks: every training panorama and the tiles `pool` (ids).

    A per-epoch buffer (--mining_fill 1) keeps the round's pool; the run-long table (--mining_fill 0) keeps
    every tile (pool = all ids). `pending`: the (0-based) epoch whose round has not run yet although its
    batches are all in (the run stopped at that epoch's end), else -1.
    Memory Q x D x 2 + P x D x (4 or 2) bytes (float16 panoramas; float32 pool tiles per epoch, float16 tiles in
    the run-long table): at same-area VIGOR (Q ~ 52,600, D = 4096) 0.59 GB per epoch (P = 10,000), 1.17 GB
    for the run-long table (P = 90,618).
    """

    def __init__(self, n_panos, n_tiles, pool, dim, sat_dtype=np.float32):
        self.pool = np.asarray(pool)
        self.slot = np.full(n_tiles, -1, np.int64)       # tile id -> row of `sat`, -1 = not kept
        self.slot[self.pool] = np.arange(len(self.pool))
        self.grd = np.zeros((n_panos, dim), np.float16)
        self.sat = np.zeros((len(self.pool), dim), sat_dtype)
        self.grd_seen = np.zeros(n_panos, bool)
        self.sat_seen = np.zeros(len(self.pool), bool)
        self.pending = -1

    @classmethod
    def run_long(cls, n_panos, n_tiles, dim):
        """The released table: every tile, float16, all zero until a batch writes it."""
        return cls(n_panos, n_tiles, np.arange(n_tiles), dim, np.float16)

    def add(self, pano, grd, tile, sat):
        """pano [B] panorama ids with grd [B, D]; tile [B] tile ids with sat [B, D] (normalised); a later
        batch overwrites an earlier one's rows. Non-finite rows (a mixed-precision step skipped for
        overflow) are not written."""
        keep = np.isfinite(grd).all(1)
        self.grd[pano[keep]] = grd[keep]
        self.grd_seen[pano[keep]] = True
        slot = self.slot[tile]
        keep = (slot >= 0) & np.isfinite(sat).all(1)
        self.sat[slot[keep]] = sat[keep]
        self.sat_seen[slot[keep]] = True

    def rank(self, pool, topk):
        """hard_negatives of every panorama against the tiles `pool` (all kept here), zeros included."""
        return hard_negatives(self.grd, self.sat[self.slot[pool]], pool, topk)

    def unseen(self, pool):
        """(pool tiles, panoramas) that no batch has written: they rank with zero descriptors."""
        return int(np.sum(~self.sat_seen[self.slot[pool]])), int(np.sum(~self.grd_seen))

    def state(self):
        """Everything a resume needs to continue exactly: {name: array}."""
        return {'pool': self.pool, 'grd': self.grd, 'sat': self.sat, 'grd_seen': self.grd_seen,
                'sat_seen': self.sat_seen, 'pending': np.int64(self.pending)}

    @classmethod
    def from_state(cls, n_tiles, saved):
        buf = cls(len(saved['grd']), n_tiles, np.asarray(saved['pool']), saved['grd'].shape[1], saved['sat'].dtype)
        for k in ('grd', 'sat', 'grd_seen', 'sat_seen'):
            getattr(buf, k)[...] = saved[k]
        buf.pending = int(saved.get('pending', -1))
        return buf

    def fill_missing(self, split, embedder, cfg, cache=None, panos=None):
        """Descriptors no batch wrote, computed with the current weights and normalised: every missing
        panorama and kept tile (--mining_fill 1), or only those of the panoramas `panos` and their positive
        tiles (the batches before a checkpoint whose descriptors were not saved)."""
        if panos is None:
            grd_missing = np.flatnonzero(~self.grd_seen)
            sat_missing = np.flatnonzero(~self.sat_seen)
        else:
            panos = np.unique(np.asarray(panos, np.int64))
            grd_missing = panos[~self.grd_seen[panos]]
            slots = np.unique(self.slot[split.tiles[panos, 0]])
            slots = slots[slots >= 0]
            sat_missing = slots[~self.sat_seen[slots]]
        for out, seen, missing, paths, kind, hw in (
                (self.grd, self.grd_seen, grd_missing, [split.pano_paths[i] for i in grd_missing], 'panorama',
                 cfg.grd_size),
                (self.sat, self.sat_seen, sat_missing, [split.tile_paths[i] for i in self.pool[sat_missing]],
                 'aerial', (cfg.sat_size,) * 2)):
            if len(missing) == 0:
                continue
            raw = embedder.describe(paths, kind, hw, cfg.eval_batch, cache)
            out[missing] = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
            seen[missing] = True


def hard_negatives(grd, pool_desc, pool, topk, rows=1024):
    """The `topk` pool tiles most similar (cosine) to each panorama, most similar first.

    grd: [Q, D] normalised panorama descriptors; pool_desc: [P, D] those of the tiles `pool` (ids); a zero
    row on either side scores 0. Ties keep the lower pool index first (tf.math.top_k).
    -> [Q, topk] int32 tile ids; with fewer than topk pool tiles each row repeats its ranking.
    Works on blocks of `rows` panoramas: memory [rows, P] similarities.
    """
    k = min(topk, len(pool))
    pool_desc = tf.constant(pool_desc, tf.float32)
    table = np.zeros((len(grd), topk), np.int32)
    for s in range(0, len(grd), rows):
        sim = tf.matmul(tf.constant(grd[s:s + rows], tf.float32), pool_desc, transpose_b=True)   # (rows, P)
        ids = pool[tf.math.top_k(sim, k).indices.numpy()]                                        # (rows, k)
        table[s:s + rows] = np.pad(ids, ((0, 0), (0, topk - k)), mode='wrap')
    return table
