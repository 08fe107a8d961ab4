"""How --test puts a query inside a tile: one small object per kind of head, and the registry a stage names.

A localiser works on descriptors evaluate_model has already computed, once per image: the queries' raw
panorama descriptors (their protocol's view included) and every tile's. `locate(scene, rows, tiles)` places
the queries of `rows` (rows of scene.grd_raw) in the tiles `tiles`:
  centre   the tile centre (no head);
  offset   VIGOR's offset head on the two descriptors (model.offset);
  heatmap  a heatmap branch ('pos' or 'semi'): the aerial trunk runs on each tile (the decoder needs its skip
           features) and the branch takes the panorama's precomputed descriptor; the ground trunk never runs
           here, so a panorama costs one ground pass however many tiles it is localised in.
A new head registers its own (register(name, factory)) and its stage names it (Stage.localiser); nothing in
testing.py changes. diagnostics() adds a kind's own checks: the heatmap's semi-positive branch on every
semi-positive tile and its ground dependence (does the point move when the panorama is swapped?).
"""
import dataclasses

import numpy as np
import tensorflow as tf

from geoloc.data import geometry
from geoloc.eval import evaluation


@dataclasses.dataclass
class Scene:
    """What a localiser reads: the model, its compiled functions and the precomputed descriptors."""
    model: object
    embedder: object         # embedding.Embedder (or a stand-in with localise_tiles)
    split: object            # the split the queries come from
    cfg: object              # the Config (sat_size, eval_batch)
    queries: np.ndarray      # (Q,) indices into the split; row r of grd_raw is queries[r]
    grd_raw: np.ndarray      # (Q, D) raw panorama descriptors, each under its protocol view
    sat_raw: np.ndarray      # (N, D) raw descriptors of every tile of the split, or None
    cache: object = None     # pipeline.ImageCache, or None
    progress: object = None  # a callable(str), or None


@dataclasses.dataclass
class Located:
    """Where a localiser put n queries: VIGOR deltas (dy, dx) from each tile's centre, pixels of the 640 frame
    (None: the tile centre); mu (row, col) of the same frame where the head gives one; the covariance factors
    [n, 3] (model.cholesky_to_cov) where it has a covariance head; heatmaps {i: heatmap} of the first pairs."""
    delta: np.ndarray = None
    chol: np.ndarray = None
    heatmaps: dict = dataclasses.field(default_factory=dict)
    mu: np.ndarray = None


class Localiser:
    """The tile centre; the base of every other kind."""
    method = 'tile centre'    # the name results['localisation']['method'] gives it

    def locate(self, scene, rows, tiles, keep_heatmaps=0):
        """The queries scene.queries[rows] in the tiles `tiles` (indices into the split's tiles) -> Located."""
        return Located()

    def diagnostics(self, scene, semi_branch, ground):
        """This kind's own checks -> ({results key: value}, {per_query.csv column: (Q,) array})."""
        return {}, {}


class Offset(Localiser):
    """VIGOR's offset head on the raw descriptors of the panorama and the tile."""
    method = 'offset'

    def locate(self, scene, rows, tiles, keep_heatmaps=0):
        delta = scene.model.offset(tf.constant(scene.sat_raw[tiles]), tf.constant(scene.grd_raw[rows]))
        return Located(delta=delta.numpy())


class Heatmap(Localiser):
    """A heatmap branch ('pos' or 'semi'): soft-argmax mu and, where the model has that branch's Cholesky head,
    its covariance. semi: the stage's semi-positive branch (a Heatmap('semi')) for its diagnostics, or None."""
    method = 'heatmap'

    def __init__(self, branch='pos', semi=None):
        self.branch, self.semi = branch, semi

    def locate(self, scene, rows, tiles, keep_heatmaps=0):
        paths = [scene.split.tile_paths[t] for t in tiles]
        mu, chol, heat = scene.embedder.localise_tiles(self.branch, paths, scene.grd_raw[np.asarray(rows, int)],
                                                       scene.cfg.sat_size, scene.cfg.eval_batch, scene.cache,
                                                       keep_heatmaps, scene.progress)
        return Located(geometry.rc_to_delta(mu), chol, heat, mu)

    def diagnostics(self, scene, semi_branch, ground):
        out, per_query = {}, {}
        if semi_branch and self.semi is not None:
            out['localisation_semi'], err = semi_branch_errors(self.semi, scene)
            per_query.update({f'error_m_semi{k + 1}': err[:, k] for k in range(err.shape[1])})
        if ground:
            out['ground_dependence'] = ground_dependence(scene, [self] + ([self.semi] if self.semi else []))
        return out, per_query


REGISTRY = {}


def register(name, factory):
    """A kind of localiser, by name: factory(stage) -> Localiser. A stage names its kind in Stage.localiser."""
    REGISTRY[name] = factory


def for_stage(stage):
    """The stage's localiser: Stage.localiser's kind, else the one its parts say (Stage.localise), else the
    tile centre. KeyError for a name nobody registered."""
    name = stage.localiser or stage.localise or 'centre'
    if name not in REGISTRY:
        raise KeyError(f'{stage.name}: no localiser {name!r}; registered: {", ".join(sorted(REGISTRY))}')
    return REGISTRY[name](stage)


register('centre', lambda stage: Localiser())
register('offset', lambda stage: Offset())
register('heatmap', lambda stage: Heatmap('pos', Heatmap('semi') if 'semi_decoder' in stage.parts else None))


def at_top1(localiser, scene, at_pos, top1, correct):
    """The queries in their top-1 tiles (top1 (Q,)), reusing at_pos (their positive tiles) where the top-1 is
    the positive (correct (Q,) bool): only the wrong ones are localised again. No heatmaps kept."""
    wrong = np.flatnonzero(~correct)
    if at_pos.delta is None or not len(wrong):
        return dataclasses.replace(at_pos, heatmaps={})
    at_wrong = localiser.locate(scene, wrong, top1[wrong])
    out = Located(delta=at_pos.delta.copy(), chol=None if at_pos.chol is None else at_pos.chol.copy(),
                  mu=None if at_pos.mu is None else at_pos.mu.copy())
    for field in ('delta', 'chol', 'mu'):
        if getattr(out, field) is not None:
            getattr(out, field)[wrong] = getattr(at_wrong, field)
    return out


def semi_branch_errors(semi, scene):
    """The semi-positive heatmap branch on each (query, semi-positive tile) pair in the reference set,
    against the label's delta for that tile (SAMP's measurement) -> (summary, (Q, 3) metres, NaN where
    the tile is absent). Errors: pixels of the 640 frame x the query's m/px. A corrected-label delta
    beyond +-320 px puts the truth outside the tile: such pairs are counted in 'outside_tile' and kept
    (a branch cannot point there, so they weigh on the mean)."""
    split, queries = scene.split, scene.queries
    q_row, k = np.nonzero(split.tiles[queries, 1:] >= 0)
    k = k + 1
    q = queries[q_row]
    if scene.progress:
        scene.progress(f'semi-positive branch: {len(q)} (panorama, semi-positive tile) pairs')
    mu = semi.locate(scene, q_row, split.tiles[q, k]).mu
    delta = split.deltas[q, k].astype(np.float64)
    err_px = np.linalg.norm(mu - geometry.delta_to_rc(delta), axis=1)
    err_m = err_px * split.mpp[q]
    outside = (np.abs(delta) > geometry.TILE_PX / 2).any(axis=1)
    summary = evaluation.error_summary(err_m, err_px)
    summary['outside_tile'] = int(outside.sum())
    summary['inside_tile'] = evaluation.error_summary(err_m[~outside], err_px[~outside])
    per_query = np.full((len(queries), split.tiles.shape[1] - 1), np.nan)
    per_query[q_row, k - 1] = err_m
    return summary, per_query


# At most this many pairs (those of the first queries) per branch: the measure costs two localisations of
# at most 256 pairs per branch, whatever the size of the test split.
GROUND_PAIRS = 256


def ground_dependence(scene, branches):
    """Whether each heatmap branch looks at the panorama -> {branch: summary}.

    branches: Heatmap localisers. Pairs: for the first GROUND_PAIRS queries, (query, its positive tile) for
    'pos' and (query, its first present semi-positive tile) for 'semi'. Each pair is localised as --test
    localises it and again with its panorama's descriptor swapped for the next pair's, (i + 1) mod n (that
    query's own descriptor, under its own protocol view; the tile stays). A heatmap that ignores the panorama
    gives the same point and the same heatmap.
    Summary: n_pairs; swap_shift_px_median / _mean / _p90, the shift of the soft-argmax mu in pixels of the
    640 frame; heatmap_swap_change, the median of ||H_swapped - H||_1 / ||H||_1 (0/0 counts as 0: two dead
    heatmaps are the same heatmap). With fewer than 2 pairs nothing can be swapped: NaN values.
    """
    split, queries = scene.split, scene.queries
    rows = np.arange(min(GROUND_PAIRS, len(queries)))
    out = {}
    for heatmap in branches:
        if heatmap.branch == 'pos':
            keep, tiles = rows, split.tiles[queries[rows], 0]
        else:
            present = split.tiles[queries[rows], 1:] >= 0
            keep = rows[present.any(axis=1)]
            first = np.argmax(present[keep], axis=1) + 1
            tiles = split.tiles[queries[keep], first]
        out[heatmap.branch] = _swap_summary(heatmap, scene, keep, tiles)
    return out


def _swap_summary(heatmap, scene, rows, tiles):
    n = len(rows)
    if n < 2:
        nan = float('nan')
        return {'n_pairs': int(n), 'swap_shift_px_median': nan, 'swap_shift_px_mean': nan,
                'swap_shift_px_p90': nan, 'heatmap_swap_change': nan}
    other = rows[(np.arange(n) + 1) % n]
    shift, change = np.zeros(n), np.full(n, np.nan)
    chunk = max(1, scene.cfg.eval_batch)   # heatmaps are kept one batch at a time (640 x 640 floats at paper size)
    for a in range(0, n, chunk):
        idx = np.arange(a, min(n, a + chunk))
        at = heatmap.locate(scene, rows[idx], tiles[idx], keep_heatmaps=len(idx))
        swapped = heatmap.locate(scene, other[idx], tiles[idx], keep_heatmaps=len(idx))
        shift[idx] = np.linalg.norm(np.asarray(swapped.mu, np.float64) - np.asarray(at.mu, np.float64), axis=1)
        for r in range(len(idx)):
            if r in at.heatmaps and r in swapped.heatmaps:
                h, h_s = np.asarray(at.heatmaps[r], np.float64), np.asarray(swapped.heatmaps[r], np.float64)
                diff, mass = np.abs(h_s - h).sum(), np.abs(h).sum()
                change[idx[r]] = diff / mass if mass > 0 else (0.0 if diff == 0 else np.inf)
    measured = change[~np.isnan(change)]
    return {'n_pairs': int(n), 'swap_shift_px_median': float(np.median(shift)),
            'swap_shift_px_mean': float(np.mean(shift)), 'swap_shift_px_p90': float(np.percentile(shift, 90)),
            'heatmap_swap_change': float(np.median(measured)) if len(measured) else float('nan')}
