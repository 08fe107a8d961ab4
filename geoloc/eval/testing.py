"""--test: evaluate a stage's checkpoint on the test split; also the evaluation behind validation.

Retrieval ranks every reference tile for each query; localisation puts the query in its top-1 tile
(and, for the figures quoted over positives, in its positive tile) with the stage's head: the offset
head, the heatmap's soft-argmax, or the tile centre. A heatmap stage's --test also runs the
semi-positive branch on each semi-positive tile (SAMP's own measurement). Metrics are evaluation.py's
pure functions; the protocol (orientation, field of view) is protocols.py's.

A heatmap stage's evaluation also measures whether its heatmap looks at the panorama at all
(ground_dependence): the same pairs are localised again with each panorama swapped for another query's,
the tile fixed, and the shift of the point is reported.

--test writes one directory per evaluation setting, <--test_dir or <run_dir>/test>/<settings>
(protocols.settings_name: labels, area, protocol, query count), built in a temporary sibling and
moved into place when complete, so a failed --test leaves the previous results of that setting intact:
  test_results.json   every metric, the protocol, the checkpoint
  per_query.csv       one row per query (results.write_per_query)
  yaws.csv            the yaw and heading each panorama was shown with (a yaw or field-of-view protocol)
  grd_descriptors.npy, sat_descriptors.npy, and the figures (--plots 1)
"""
import dataclasses
import os
import shutil

import numpy as np
import tensorflow as tf

from geoloc.eval import evaluation
from geoloc.data import geometry
import model as model_lib
from geoloc.eval import protocols
from geoloc.eval import results
from geoloc.train import run_lock


@dataclasses.dataclass
class Evaluation:
    results: dict            # the JSON-able metrics
    queries: np.ndarray      # (Q,) query indices into the split
    grd: np.ndarray          # (Q, D) normalised descriptors
    sat: np.ndarray          # (N, D)
    ranks: dict              # evaluation.retrieval_ranks output
    delta_pos: np.ndarray    # (Q, 2) predicted (dy, dx) in the positive tile, or None
    chol: np.ndarray         # (Q, 3) covariance factors in the positive tile, or None
    heatmaps: dict           # {i: heatmap} for the first queries
    per_query: dict = None   # {column: (Q,) array} of per_query.csv
    views: np.ndarray = None  # (Q, 3) the protocol's views (protocols.Protocol.views), or None
    yaws: dict = None        # {column: (Q,) array} of yaws.csv (view_table), or None


def evaluate_model(stage, cfg, model, embedder, split, queries, cache=None, keep_heatmaps=4, progress=None,
                   protocol=None, semi_branch=False, ground=False):
    """Retrieval, localisation and uncertainty metrics of `model` on split[queries] -> Evaluation.

    protocol: a protocols.Protocol (default: north-aligned, full field of view). semi_branch: also run
    a heatmap stage's semi-positive branch on every semi-positive tile (--test; validation skips it).
    ground: a heatmap stage's ground_dependence (--test and validation).
    """
    queries = np.asarray(queries)
    protocol = protocol or protocols.Protocol()
    names = [os.path.basename(split.pano_paths[q]) for q in queries]
    views = protocol.views(names, cfg.grd_size[1])
    grd_raw = embedder.describe([split.pano_paths[q] for q in queries], 'panorama', cfg.grd_size, cfg.eval_batch,
                                cache, progress, views=views)
    sat_raw = embedder.describe(split.tile_paths, 'aerial', (cfg.sat_size,) * 2, cfg.eval_batch, cache, progress)
    grd, sat = _normalise(grd_raw), _normalise(sat_raw)
    pos = split.tiles[queries, 0]
    ranks = evaluation.retrieval_ranks(grd, sat, pos, split.tiles[queries, 1:], block=cfg.eval_block)
    n_ref = len(split.tile_paths)
    results = {'stage': stage.name, 'dataset': split.name, 'n_query': int(len(queries)), 'n_ref': n_ref,
               'chance_R@1': 1.0 / n_ref, 'protocol': {'name': protocol.name, 'text': protocol.describe(),
                                                       'yaw': protocol.yaw, 'fov_deg': protocol.fov,
                                                       'seed': protocol.seed},
               'retrieval': evaluation.retrieval_metrics(ranks, n_ref)}
    top1 = ranks['top1']
    correct = top1 == pos
    in_block = (split.tiles[queries] == top1[:, None]).any(axis=1)   # top-1 is the positive or a semi-positive
    gt = split.gt_positions[queries]
    mpp = split.mpp[queries]
    # Offsets predicted in the positive tile (every query) and in the top-1 tile (reusing the positive's
    # prediction where the top-1 is right), as VIGOR deltas (dy, dx), pixels of the 640 frame.
    delta_pos = delta_top1 = chol = chol_top1 = None
    heat = {}
    if stage.localise == 'offset':
        delta_pos = model.offset(tf.constant(sat_raw[pos]), tf.constant(grd_raw)).numpy()
        delta_top1 = model.offset(tf.constant(sat_raw[top1]), tf.constant(grd_raw)).numpy()
    elif stage.localise == 'heatmap':
        mu_pos, chol, heat = embedder.localise_pairs(split, queries, pos, cfg, keep_heatmaps=keep_heatmaps,
                                                     cache=cache, progress=progress, views=views)
        mu_top1 = mu_pos.copy()
        chol_top1 = None if chol is None else chol.copy()
        wrong = np.flatnonzero(~correct)
        if len(wrong):
            mu_w, chol_w, _ = embedder.localise_pairs(split, queries[wrong], top1[wrong], cfg, cache=cache,
                                                      progress=progress, views=_rows(views, wrong))
            mu_top1[wrong] = mu_w
            if chol is not None:
                chol_top1[wrong] = chol_w
        delta_pos = geometry.rc_to_delta(mu_pos)
        delta_top1 = geometry.rc_to_delta(mu_top1)

    def locate(tiles, delta):
        """-> (predicted position, its error in metres, the tile centre's error in metres)."""
        centre = split.tile_centres[tiles]
        err_centre = geometry.distance_m(centre, gt, split.metric)
        if delta is None:
            return centre, err_centre, err_centre
        pred = geometry.delta_to_position(centre, delta, mpp, split.metric)
        return pred, geometry.distance_m(pred, gt, split.metric), err_centre

    pred_top1, err_top1, err_centre_top1 = locate(top1, delta_top1)
    _, err_pos, err_centre_pos = locate(pos, delta_pos)
    results['localisation'] = evaluation.localisation_summary(err_top1, err_centre_top1, correct, top1_hit=in_block)
    results['localisation']['method'] = stage.localise or 'tile centre'
    # Over positives: the offset inside the ground-truth tile, for every query.
    results['localisation_positive'] = evaluation.localisation_summary(err_pos, err_centre_pos,
                                                                       np.ones(len(queries), bool))['all']
    if chol is not None:
        results['uncertainty'] = uncertainty_summary(mu_pos, chol, split.deltas[queries, 0])

    top1_is = np.where(correct, 'positive', np.where(in_block, 'semi-positive', 'other'))
    per_query = {'query': queries, 'panorama': np.array(names), 'positive_tile': _basenames(split.tile_paths, pos),
                 'rank_of_positive': ranks['rank'] + 1, 'top1_tile': _basenames(split.tile_paths, top1),
                 'top1_is': top1_is}
    axes = ('lat', 'lon') if split.metric == 'haversine' else ('north', 'east')
    for a, name in enumerate(axes):
        per_query[f'pred_{name}'] = pred_top1[:, a]
    for a, name in enumerate(axes):
        per_query[f'gt_{name}'] = gt[:, a]
    per_query.update(error_m=err_top1, error_m_centre=err_centre_top1, error_m_positive=err_pos)
    if chol is not None:
        per_query['u_px'] = model_lib.uncertainty(tf.constant(chol_top1)).numpy()
        per_query['u_px_positive'] = model_lib.uncertainty(tf.constant(chol)).numpy()
    if semi_branch and stage.localise == 'heatmap' and 'semi_decoder' in stage.parts:
        results['localisation_semi'], semi_err = semi_branch_errors(embedder, split, queries, cfg, views, cache,
                                                                    progress)
        for k in range(semi_err.shape[1]):
            per_query[f'error_m_semi{k + 1}'] = semi_err[:, k]
    if ground and stage.localise == 'heatmap':
        branches = ('pos', 'semi') if 'semi_decoder' in stage.parts else ('pos',)
        results['ground_dependence'] = ground_dependence(embedder, split, queries, cfg, views, cache, branches)
    yaws = None
    if views is not None:
        yaws = view_table(protocol, names, views, cfg.grd_size[1])
        for column in ('yaw_deg', 'fov_heading_deg'):
            if column in yaws:
                per_query[column] = yaws[column]
    return Evaluation(results, queries, grd, sat, ranks, delta_pos, chol, heat, per_query, views, yaws)


def semi_branch_errors(embedder, split, queries, cfg, views=None, cache=None, progress=None):
    """The semi-positive heatmap branch on each (query, semi-positive tile) pair in the reference set,
    against the label's delta for that tile (SAMP's measurement) -> (summary, (Q, 3) metres, NaN where
    the tile is absent). Errors: pixels of the 640 frame x the query's m/px. A corrected-label delta
    beyond +-320 px puts the truth outside the tile: such pairs are counted in 'outside_tile' and kept
    (a branch cannot point there, so they weigh on the mean)."""
    q_row, k = np.nonzero(split.tiles[queries, 1:] >= 0)
    k = k + 1
    q = queries[q_row]
    tiles = split.tiles[q, k]
    if progress:
        progress(f'semi-positive branch: {len(q)} (panorama, semi-positive tile) pairs')
    mu, _, _ = embedder.localise_pairs(split, q, tiles, cfg, branch='semi', cache=cache, progress=progress,
                                       views=_rows(views, q_row))
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


def ground_dependence(embedder, split, queries, cfg, views=None, cache=None, branches=('pos', 'semi')):
    """Whether each heatmap branch looks at the panorama -> {branch: summary}.

    Pairs: for the first GROUND_PAIRS queries, (query, its positive tile) for 'pos' and (query, its first
    present semi-positive tile) for 'semi'. Each pair is localised as --test localises it
    (embedder.localise_pairs) and again with its panorama swapped for the next pair's, (i + 1) mod n, shown
    with that query's view (views: [Q, 3] of the protocol, rows as queries, or None); the tile stays.
    A heatmap that ignores the panorama gives the same point and the same heatmap.
    Summary: n_pairs; swap_shift_px_median / _mean / _p90, the shift of the soft-argmax mu in pixels of the
    640 frame; heatmap_swap_change, the median of ||H_swapped - H||_1 / ||H||_1 (0/0 counts as 0: two dead
    heatmaps are the same heatmap). With fewer than 2 pairs nothing can be swapped: NaN values.
    """
    queries = np.asarray(queries)
    rows = np.arange(min(GROUND_PAIRS, len(queries)))
    out = {}
    for branch in branches:
        if branch == 'pos':
            keep, tiles = rows, split.tiles[queries[rows], 0]
        else:
            present = split.tiles[queries[rows], 1:] >= 0
            keep = rows[present.any(axis=1)]
            first = np.argmax(present[keep], axis=1) + 1
            tiles = split.tiles[queries[keep], first]
        out[branch] = _swap_summary(embedder, split, queries[keep], tiles, cfg, _rows(views, keep), cache, branch)
    return out


def _swap_summary(embedder, split, queries, tiles, cfg, views, cache, branch):
    n = len(queries)
    if n < 2:
        nan = float('nan')
        return {'n_pairs': int(n), 'swap_shift_px_median': nan, 'swap_shift_px_mean': nan,
                'swap_shift_px_p90': nan, 'heatmap_swap_change': nan}
    other = (np.arange(n) + 1) % n
    shift, change = np.zeros(n), np.full(n, np.nan)
    chunk = max(1, cfg.eval_batch)       # heatmaps are kept one batch at a time (640 x 640 floats each at paper size)
    for a in range(0, n, chunk):
        idx = np.arange(a, min(n, a + chunk))
        mu, _, heat = embedder.localise_pairs(split, queries[idx], tiles[idx], cfg, branch=branch,
                                              keep_heatmaps=len(idx), cache=cache, views=_rows(views, idx))
        mu_s, _, heat_s = embedder.localise_pairs(split, queries[other[idx]], tiles[idx], cfg, branch=branch,
                                                  keep_heatmaps=len(idx), cache=cache,
                                                  views=_rows(views, other[idx]))
        shift[idx] = np.linalg.norm(np.asarray(mu_s, np.float64) - np.asarray(mu, np.float64), axis=1)
        for r in range(len(idx)):
            if r in heat and r in heat_s:
                h, h_s = np.asarray(heat[r], np.float64), np.asarray(heat_s[r], np.float64)
                diff, mass = np.abs(h_s - h).sum(), np.abs(h).sum()
                change[idx[r]] = diff / mass if mass > 0 else (0.0 if diff == 0 else np.inf)
    measured = change[~np.isnan(change)]
    return {'n_pairs': int(n), 'swap_shift_px_median': float(np.median(shift)),
            'swap_shift_px_mean': float(np.mean(shift)), 'swap_shift_px_p90': float(np.percentile(shift, 90)),
            'heatmap_swap_change': float(np.median(measured)) if len(measured) else float('nan')}


def _rows(views, rows):
    return None if views is None else views[rows]


def _basenames(paths, idx):
    return np.array([os.path.basename(paths[i]) for i in idx])


def uncertainty_summary(mu, chol, delta_gt):
    """Calibration and ranking quality of the predicted Gaussians in the positive tile."""
    cov = model_lib.cholesky_to_cov(tf.constant(chol)).numpy()
    u = model_lib.uncertainty(tf.constant(chol)).numpy()
    gt_rc = geometry.delta_to_rc(np.asarray(delta_gt, np.float64))
    pix_err = np.linalg.norm(mu - gt_rc, axis=1)
    cover = evaluation.ellipse_coverage(mu, cov, gt_rc)
    return {'n': int(len(mu)), '1sigma': cover['1sigma'], '2sigma': cover['2sigma'],
            'spearman_u_error': float(evaluation.rank_correlation(u, pix_err)),
            'sparsification': evaluation.sparsification(u, pix_err),
            'mean_u_px': float(u.mean()) if len(u) else float('nan'),
            'median_error_px': float(np.median(pix_err)) if len(u) else float('nan')}


def _normalise(raw):
    return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)


def view_table(protocol, names, views, width):
    """yaws.csv's columns: each panorama's drawn yaw, the yaw applied (a whole number of columns at the
    input width), the column shift, and the field of view's heading and columns."""
    table = {'panorama': np.asarray(names)}
    yaws = protocol.yaws(names)
    if yaws is not None:
        table.update(yaw_drawn_deg=yaws, yaw_deg=protocol.applied_yaws(views, width), shift_px=views[:, 0])
    headings = protocol.headings(names)
    if headings is not None:
        table.update(fov_heading_deg=headings, fov_first_px=views[:, 1], fov_px=views[:, 2])
    table['input_width_px'] = np.full(len(names), width)
    return table


def trained_run(stage, cfg):
    """The run directory's checkpoint to evaluate -> (run directory, checkpoint, cfg with the run's model
    settings). StateError in one line when there is no checkpoint or the directory holds another stage's run."""
    import config
    import stages
    from geoloc.train import train_state
    run_dir, _ = stage.run_dirs(cfg)
    ckpt = train_state.latest_checkpoint(run_dir)
    if not ckpt:
        raise train_state.StateError(f'{run_dir}: no checkpoint to test; train it first with the same --run_dir')
    saved = config.load(os.path.join(run_dir, 'config.json'))
    if saved is not None:
        if saved.get('stage') not in ('', stage.name):
            other = saved.get('stage')
            command = stages.get(other).command if other in stages.SCRIPTS else 'its own script'
            raise train_state.StateError(f'{run_dir}: holds a {other} run, not {stage.name}; '
                                         f'test it with {command} --test')
        cfg = config.model_settings(saved, cfg)
    return run_dir, ckpt, cfg


def restored_model(stage, cfg, ckpt, run_dir):
    """The stage's model with every part restored from ckpt."""
    import stages
    from geoloc.train import train_state
    model = stages.build_model(stage, cfg)
    train_state.restore_parts(model, stage.parts, ckpt, f'{stage.name} ({run_dir})')
    return model


def run_test(stage, cfg):
    """--test: evaluate the run directory's latest checkpoint on the test split (or --max_queries of it). It
    holds the run directory's lock (run_lock) while it runs: it writes train.log there, and by default test/."""
    import errno
    from geoloc.train import train_state
    run_dir, ckpt, cfg = trained_run(stage, cfg)
    out_dir = protocols.results_dir(cfg, run_dir)
    shutil.rmtree(results._staging_dir(out_dir))      # a place we cannot write is refused before the evaluation
    try:
        lock = train_state.take_lock(run_dir, f'{stage.name} --test')
    except OSError as e:   # a run directory we cannot write (results in --test_dir): nothing of ours goes there
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        lock = None
    try:
        return _run_test(stage, cfg, run_dir, ckpt, out_dir, lock)
    finally:
        if lock is not None:
            lock.release()


def _run_test(stage, cfg, run_dir, ckpt, out_dir, lock):
    from geoloc.nn import embedding
    from geoloc import runlog
    from geoloc.data import splits
    log = runlog.open_log(run_dir, stage.name + ' test')
    if lock is not None and lock.took_over:
        log(f'run lock: took over {lock.path}, left by {run_lock.describe(lock.took_over)}, a process of this host '
            'that has ended')
    split = splits.dataset_splits(cfg, 'test')
    model = restored_model(stage, cfg, ckpt, run_dir)
    queries = np.arange(len(split) if not cfg.max_queries else min(cfg.max_queries, len(split)))
    protocol = protocols.Protocol.from_config(cfg)
    log(f'test: {split.name}: {len(queries)} panoramas against {len(split.tile_paths)} tiles; checkpoint {ckpt}')
    log(f'test: protocol {protocol.name}: {protocol.describe()}')
    ev = evaluate_model(stage, cfg, model, embedding.Embedder(model), split, queries, progress=lambda m: log(m),
                        protocol=protocol, semi_branch=True, ground=True)
    ev.results['checkpoint'] = ckpt
    results.write_outputs(ev, split, cfg, out_dir, plots=bool(cfg.plots))
    for line in results.format_results(ev.results):
        log(line)
    log(f'test: results in {out_dir}')
    return ev.results
