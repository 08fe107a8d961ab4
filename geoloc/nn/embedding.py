"""The one embedding path: a batch's descriptors inside the training step, and compiled descriptor,
localisation and uncertainty functions (traced once per model) for mining, validation, --test and
E_3's u table.
"""
import time

import numpy as np
import tensorflow as tf

from geoloc.train import distribute
import model as model_lib
from geoloc.data import pipeline


def embed_batch(model, batch, with_semi=True):
    """The training batch's images -> descriptors (see stages.py, the loss contract).

    Inside strategy.run the global batch's normalised descriptors are gathered from every replica
    (grd_all, sat_all: the triplet loss's negatives; mining reads them too); row0 is this replica's
    first row in them.
    """
    out = {'grd_raw': model.embed_grd(batch['grd'])}
    out['sat_raw'], out['sat_skips'] = model.embed_sat(batch['sat'])
    if with_semi:
        out['semi_raw'], out['semi_skips'] = model.embed_sat(batch['semi'])
        out['semi'] = model_lib.l2_normalize(out['semi_raw'])
    out['grd'] = model_lib.l2_normalize(out['grd_raw'])
    out['sat'] = model_lib.l2_normalize(out['sat_raw'])
    out['grd_all'], out['sat_all'] = distribute.gather(out['grd']), distribute.gather(out['sat'])
    _, replica = distribute.replica_info()
    out['row0'] = replica * tf.shape(out['grd'])[0]
    return out


class LossContext:
    """What a loss sees beyond the batch: the configuration, the run's tables, and report()."""

    def __init__(self, cfg, tables):
        self.cfg, self.tables = cfg, tables
        self.reports = {}

    def report(self, name, value):
        """A diagnostic, logged and never optimised: the mean of `value` over this replica's examples."""
        self.reports[name] = tf.reduce_mean(tf.cast(value, tf.float32))


class Embedder:
    """Compiled inference functions of one model, traced once per input shape and reused all run."""

    def __init__(self, model):
        self.model = model
        self._grd = tf.function(model.embed_grd, autograph=False, reduce_retracing=True)
        self._sat = tf.function(lambda x: model.embed_sat(x)[0], autograph=False, reduce_retracing=True)
        self._localise = {}
        self._cholesky = {}

    def grd(self, images):
        """[B, H, W, 3] panoramas -> raw descriptors [B, D] (numpy)."""
        return self._grd(images).numpy()

    def sat(self, images):
        """[B, S, S, 3] aerial tiles -> raw descriptors [B, D] (numpy)."""
        return self._sat(images).numpy()

    def describe(self, paths, kind, hw, batch, cache=None, progress=None, views=None):
        """Raw descriptors [N, D] of image files ('panorama' or 'aerial'); views: [N, 3] of a test protocol
        (pipeline.apply_views) for panoramas, or None."""
        fn = self._grd if kind == 'panorama' else self._sat
        out = np.zeros((len(paths), self.model.dim), np.float32)
        t0 = t = time.time()
        done = 0
        for images, idx in pipeline.image_dataset(paths, hw, kind, batch, cache=cache, views=views):
            out[idx.numpy()] = fn(images).numpy()
            done += len(idx)
            if progress and time.time() - t > 30:
                progress(f'{done}/{len(paths)} {kind} descriptors')
                t = time.time()
        if progress:
            progress(f'{len(paths)} {kind} descriptors in {time.time() - t0:.1f} s')
        return out

    def localiser(self, branch):
        """A compiled (tile images, raw panorama descriptors) -> {'heatmap', 'mu', 'chol'?} of a heatmap branch:
        the aerial trunk runs on the tiles (the decoder needs its skip features), the ground trunk not at all."""
        if branch not in self._localise:
            model = self.model

            def fn(sat, grd_raw):
                s, skips = model.embed_sat(sat)
                return model.localise(branch, s, grd_raw, skips)
            self._localise[branch] = tf.function(fn, autograph=False, reduce_retracing=True)
        return self._localise[branch]

    def localise_tiles(self, branch, tile_paths, grd_raw, side, batch, cache=None, keep_heatmaps=0, progress=None):
        """A heatmap branch on the pairs (tile file tile_paths[i], raw panorama descriptor grd_raw[i] [n, D], as
        describe() gives them, a protocol's view included) -> (mu [n, 2] (row, col) of the 640 frame, chol [n, 3]
        or None, {i: heatmap} for i < keep_heatmaps). side: the tiles' input side."""
        fn = self.localiser(branch)
        has_chol = f'{branch}_cholesky' in self.model.parts
        n = len(tile_paths)
        mu, chol, heat = np.zeros((n, 2), np.float32), np.zeros((n, 3), np.float32), {}
        done, t = 0, time.time()
        for sat, rows in pipeline.image_dataset(tile_paths, (side, side), 'aerial', batch, cache=cache):
            rows = rows.numpy()
            out = fn(sat, tf.constant(grd_raw[rows]))
            mu[rows] = out['mu'].numpy()
            if has_chol:
                chol[rows] = out['chol'].numpy()
            for r, h in zip(rows, out['heatmap'].numpy()):
                if r < keep_heatmaps:
                    heat[int(r)] = h
            done += len(rows)
            if progress and time.time() - t > 30:
                progress(f'localised {done}/{n} pairs')
                t = time.time()
        return mu, (chol if has_chol else None), heat

    def cholesky_from_descriptors(self, branch, sat_raw, grd_raw, batch=1024):
        """The covariance head of a branch on raw descriptor pairs (fusion + Cholesky head, no decoder):
        [n, D], [n, D] -> chol [n, 3] (pixels of the 640 frame)."""
        if branch not in self._cholesky:
            model = self.model

            def fn(s, g):
                return getattr(model, f'{branch}_cholesky')(getattr(model, f'{branch}_fusion')(s, g))
            self._cholesky[branch] = tf.function(fn, autograph=False, reduce_retracing=True)
        fn = self._cholesky[branch]
        out = [fn(sat_raw[i:i + batch], grd_raw[i:i + batch]).numpy() for i in range(0, len(sat_raw), batch)]
        return np.concatenate(out) if out else np.zeros((0, 3), np.float32)
