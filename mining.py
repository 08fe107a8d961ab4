"""Hard-negative mining (E_1, E_2): after an epoch, rank a pool of tiles against every training panorama
with the descriptors the epoch computed, and keep each panorama's most similar tiles.

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
    """The descriptors an epoch gathers for its mining round: every training panorama and the pool's tiles.

    Memory Q x D x 2 + P x D x 4 bytes (float16 panoramas, float32 pool): 0.6 GB for VIGOR same-area
    (Q ~ 52,600, P = 10,000, D = 4096), whatever the epoch length.
    """

    def __init__(self, n_panos, n_tiles, pool, dim):
        self.pool = pool
        self.slot = np.full(n_tiles, -1, np.int64)       # tile id -> row of `sat`, -1 = not in the pool
        self.slot[pool] = np.arange(len(pool))
        self.grd = np.zeros((n_panos, dim), np.float16)
        self.sat = np.zeros((len(pool), dim), np.float32)
        self.grd_seen = np.zeros(n_panos, bool)
        self.sat_seen = np.zeros(len(pool), bool)

    def add(self, pano, grd, tile, sat):
        """pano [B] panorama ids with grd [B, D]; tile [B] tile ids with sat [B, D] (normalised).
        Non-finite rows (a mixed-precision step skipped for overflow) are left for fill_missing."""
        keep = np.isfinite(grd).all(1)
        self.grd[pano[keep]] = grd[keep]
        self.grd_seen[pano[keep]] = True
        slot = self.slot[tile]
        keep = (slot >= 0) & np.isfinite(sat).all(1)
        self.sat[slot[keep]] = sat[keep]
        self.sat_seen[slot[keep]] = True

    def state(self):
        """Everything a resume needs to continue the round exactly: {name: array}."""
        return {'pool': self.pool, 'grd': self.grd, 'sat': self.sat, 'grd_seen': self.grd_seen,
                'sat_seen': self.sat_seen}

    @classmethod
    def from_state(cls, n_tiles, saved):
        buf = cls(len(saved['grd']), n_tiles, np.asarray(saved['pool']), saved['grd'].shape[1])
        for k in ('grd', 'sat', 'grd_seen', 'sat_seen'):
            getattr(buf, k)[...] = saved[k]
        return buf

    def fill_missing(self, split, embedder, cfg, cache=None):
        """Descriptors the epoch did not gather (panoramas and pool tiles never sampled): computed with the
        current weights, normalised."""
        for out, seen, ids, paths, kind, hw in (
                (self.grd, self.grd_seen, np.arange(len(split)), split.pano_paths, 'panorama', cfg.grd_size),
                (self.sat, self.sat_seen, self.pool, split.tile_paths, 'aerial', (cfg.sat_size,) * 2)):
            missing = np.flatnonzero(~seen)
            if len(missing) == 0:
                continue
            raw = embedder.describe([paths[i] for i in ids[missing]], kind, hw, cfg.eval_batch, cache)
            out[missing] = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
            seen[missing] = True


def hard_negatives(grd, pool_desc, pool, topk, rows=1024):
    """The `topk` pool tiles most similar (cosine) to each panorama, most similar first.

    grd: [Q, D] normalised panorama descriptors; pool_desc: [P, D] those of the tiles `pool` (ids).
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
