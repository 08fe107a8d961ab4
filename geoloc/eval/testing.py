"""--test: evaluate a stage's checkpoint on the test split; also the evaluation behind validation.

Every query panorama and every tile is described once. Retrieval ranks every reference tile for each
query; localisation puts the query in its top-1 tile (and, for the figures quoted over positives, in its
positive tile) with the stage's localiser (localisers.py: the offset head, a heatmap's soft-argmax, the
tile centre, or a head's own), which works on those descriptors. A localiser adds its own checks: a heatmap
stage's --test runs the semi-positive branch on each semi-positive tile (SAMP's own measurement) and
measures whether its heatmap looks at the panorama at all (ground_dependence). A stage's own metrics
(Stage.metrics) land under 'stage_metrics'. Metrics are evaluation.py's and calibration.py's pure
functions; the protocol (orientation, field of view) is protocols.py's.

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

from geoloc.data import geometry
from geoloc.eval import calibration
from geoloc.eval import evaluation
from geoloc.eval import localisers
from geoloc.eval import protocols
from geoloc.eval import results
from geoloc.errors import StateError
from geoloc.train import run_lock
import model as model_lib


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
                   protocol=None, semi_branch=False, ground=False, sigma_scale=1.0):
    """Retrieval, localisation and uncertainty metrics of `model` on split[queries] -> Evaluation.

    Every panorama and tile is described once; the stage's localiser (localisers.for_stage) works on those
    descriptors. protocol: a protocols.Protocol (default: north-aligned, full field of view). semi_branch:
    also run a heatmap stage's semi-positive branch on every semi-positive tile (--test; validation skips it).
    ground: a heatmap stage's ground_dependence (--test and validation). sigma_scale: the calibration's scale of
    every predicted ellipse (calibration.read_scale; the covariance factors are multiplied by it).
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
    # The stage's head in the positive tile (every query) and in the top-1 tile (reusing the positive's
    # prediction where the top-1 is right): VIGOR deltas (dy, dx), pixels of the 640 frame, or the tile centre.
    localiser = localisers.for_stage(stage)
    scene = localisers.Scene(model, embedder, split, cfg, queries, grd_raw, sat_raw, cache, progress)
    at_pos = localiser.locate(scene, np.arange(len(queries)), pos, keep_heatmaps)
    at_top1 = localisers.at_top1(localiser, scene, at_pos, top1, correct)
    if sigma_scale != 1.0 and at_pos.chol is not None:
        at_pos = dataclasses.replace(at_pos, chol=at_pos.chol * np.float32(sigma_scale))
        at_top1 = dataclasses.replace(at_top1, chol=at_top1.chol * np.float32(sigma_scale))

    def locate(tiles, delta):
        """-> (predicted position, its error in metres, the tile centre's error in metres)."""
        centre = split.tile_centres[tiles]
        err_centre = geometry.distance_m(centre, gt, split.metric)
        if delta is None:
            return centre, err_centre, err_centre
        pred = geometry.delta_to_position(centre, delta, split.mpp[queries], split.metric)
        return pred, geometry.distance_m(pred, gt, split.metric), err_centre

    pred_top1, err_top1, err_centre_top1 = locate(top1, at_top1.delta)
    _, err_pos, err_centre_pos = locate(pos, at_pos.delta)
    results['localisation'] = evaluation.localisation_summary(err_top1, err_centre_top1, correct, top1_hit=in_block)
    results['localisation']['method'] = localiser.method
    # Over positives: the offset inside the ground-truth tile, for every query.
    results['localisation_positive'] = evaluation.localisation_summary(err_pos, err_centre_pos,
                                                                       np.ones(len(queries), bool))['all']
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
    if at_pos.chol is not None:
        results['uncertainty'], columns = uncertainty_summary(_mu(at_pos), at_pos.chol, split.deltas[queries, 0],
                                                              split.mpp[queries], err_pos)
        results['uncertainty']['sigma_scale'] = float(sigma_scale)
        per_query['u_px'] = model_lib.uncertainty(tf.constant(at_top1.chol)).numpy()
        per_query.update(columns)
    extra, columns = localiser.diagnostics(scene, semi_branch, ground)
    results.update(extra)
    per_query.update(columns)
    yaws = None
    if views is not None:
        yaws = view_table(protocol, names, views, cfg.grd_size[1])
        for column in ('yaw_deg', 'fov_heading_deg'):
            if column in yaws:
                per_query[column] = yaws[column]
    ev = Evaluation(results, queries, grd, sat, ranks, at_pos.delta, at_pos.chol, at_pos.heatmaps, per_query, views,
                    yaws)
    if stage.metrics:
        results['stage_metrics'] = stage_metrics(stage.metrics, ev, split)
    return ev


def stage_metrics(metrics, ev, split):
    """A stage's own metrics (Stage.metrics: callables (Evaluation, split) -> {name: float}) -> one dict;
    ValueError when two of them return the same name."""
    out = {}
    for fn in metrics:
        values = fn(ev, split)
        twice = sorted(set(values) & set(out))
        if twice:
            raise ValueError(f'stage metrics named twice: {", ".join(twice)}')
        out.update({str(k): float(v) for k, v in values.items()})
    return out


def _mu(located):
    """(Q, 2) (row, col) points of the 640 frame where the localiser put the queries."""
    return located.mu if located.mu is not None else geometry.delta_to_rc(located.delta)


def _rows(views, rows):
    return None if views is None else views[rows]


def _basenames(paths, idx):
    return np.array([os.path.basename(paths[i]) for i in idx])


def uncertainty_summary(mu, chol, delta_gt, mpp, err_m):
    """The predicted Gaussians in the positive tile -> (summary, {per_query.csv column: (Q,) array}).

    mu (Q, 2) (row, col) and chol (Q, 3) of the 640 frame, delta_gt (Q, 2) the label's deltas; mpp (Q,) metres
    per pixel; err_m (Q,) the positive tile's errors in metres. Summary: coverage of the 1-/2-sigma ellipses,
    Spearman(u, error), sparsification, mean u, median error (px); the mean NLL of the ground truths (nll_px:
    density per pixel^2 of the 640 frame; nll_m: per square metre, NLL_px + 2 log mpp); ENCE over
    ENCE_BINS bins of sigma = sqrt(mean eigenvalue) (px); selective prediction by sigma (metres)."""
    cov = model_lib.cholesky_to_cov(tf.constant(chol)).numpy()
    u = model_lib.uncertainty(tf.constant(chol)).numpy()
    gt_rc = geometry.delta_to_rc(np.asarray(delta_gt, np.float64))
    pix_err = np.linalg.norm(mu - gt_rc, axis=1)
    cover = evaluation.ellipse_coverage(mu, cov, gt_rc)
    nll_px = calibration.gaussian_nll(mu, cov, gt_rc)
    nll_m = nll_px + 2 * np.log(np.asarray(mpp, np.float64))
    sigma = calibration.sigma_of(cov)
    mean = lambda x: float(np.mean(x)) if len(x) else float('nan')
    summary = {'n': int(len(mu)), '1sigma': cover['1sigma'], '2sigma': cover['2sigma'],
               'spearman_u_error': float(evaluation.rank_correlation(u, pix_err)),
               'sparsification': evaluation.sparsification(u, pix_err), 'mean_u_px': mean(u),
               'median_error_px': float(np.median(pix_err)) if len(u) else float('nan'),
               'nll_px': mean(nll_px), 'nll_m': mean(nll_m), 'mean_sigma_px': mean(sigma),
               'ence': calibration.ence(sigma, pix_err, ENCE_BINS),
               'selective': calibration.selective_prediction(sigma, err_m)}
    columns = {'u_px_positive': u, 'sigma_px_positive': sigma, 'nll_px_positive': nll_px, 'nll_m_positive': nll_m}
    return summary, columns


ENCE_BINS = 10


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
    scale, record = _calibration(stage, cfg, run_dir, ckpt, log)
    ev = evaluate_model(stage, cfg, model, embedding.Embedder(model), split, queries, progress=lambda m: log(m),
                        protocol=protocol, semi_branch=True, ground=True, sigma_scale=scale)
    if cfg.calibrate:
        record = fit_calibration(ev, split, cfg, run_dir, ckpt, log)
    if record is not None:
        ev.results['calibration'] = record
    ev.results['checkpoint'] = ckpt
    results.write_outputs(ev, split, cfg, out_dir, plots=bool(cfg.plots))
    for line in results.format_results(ev.results):
        log(line)
    log(f'test: results in {out_dir}')
    return ev.results


def _calibration(stage, cfg, run_dir, ckpt, log):
    """-> (the scale --test applies to the predicted ellipses, the calibration record or None): (1, None) when
    fitting one (--calibrate 1) or when the run has no calibration.json. StateError (one line) for --calibrate 1
    on a stage without a covariance head, and for a calibration fitted on another checkpoint than the one tested."""
    if cfg.calibrate:
        if 'pos_cholesky' not in stage.parts:
            raise StateError(f'--calibrate 1: {stage.name} has no covariance head to calibrate')
        return 1.0, None
    scale, record = calibration_scale(run_dir, ckpt)
    if record is None:
        return scale, None
    where = record.get('fitted_on', {})
    log(f'test: ellipses scaled by {scale:.4g} (calibration.json: fitted on {where.get("n")} panoramas of '
        f'{where.get("data_root")})')
    if where.get('data_root') == _data_root(cfg) and where.get('labels') == cfg.labels:
        log('test: warning: the calibration was fitted on this very split; its coverage is not a held-out figure')
    return scale, record


def _data_root(cfg):
    from geoloc.data import builtin
    return os.path.abspath(cfg.data_root or builtin.FOLDERS[cfg.dataset])


def calibration_scale(run_dir, ckpt):
    """-> (the run's calibrated scale of the ellipses for checkpoint ckpt, its record): (1, None) without
    calibration.json; StateError (one line) when calibration.json was fitted on another checkpoint."""
    scale, record = calibration.read_scale(run_dir)
    if record is not None and os.path.basename(str(record.get('checkpoint', ''))) != os.path.basename(ckpt):
        raise StateError(f'{os.path.join(run_dir, calibration.FILE)}: fitted on {record.get("checkpoint")!r}, but '
                         f'the latest checkpoint is {os.path.basename(ckpt)}; refit it (--test --calibrate 1 on '
                         'held-out panoramas) or delete it')
    return scale, record


def positive_gaussians(ev, split):
    """The Gaussians an Evaluation predicted in each query's positive tile -> (mu, cov, gt): mu and gt (Q, 2)
    (row, col) of the 640-px frame, gt from the labels; cov (Q, 2, 2) in pixels^2."""
    mu = geometry.delta_to_rc(np.asarray(ev.delta_pos, np.float64))
    gt = geometry.delta_to_rc(np.asarray(split.deltas[ev.queries, 0], np.float64))
    return mu, model_lib.cholesky_to_cov(tf.constant(ev.chol)).numpy(), gt


def fit_calibration(ev, split, cfg, run_dir, ckpt, log):
    """--test --calibrate 1: fit the ellipses' scale on this split's positive-tile predictions
    (calibration.fit_sigma_scale) and write it to <run_dir>/calibration.json -> the record written."""
    maha = np.sqrt(evaluation.mahalanobis_sq(*positive_gaussians(ev, split)))
    scale = calibration.fit_sigma_scale(maha)
    record = {'sigma_scale': scale, 'checkpoint': os.path.basename(ckpt), 'method': 'fit_sigma_scale',
              'fitted_on': {'data_root': _data_root(cfg), 'dataset': split.name,
                            'labels': cfg.labels, 'area': cfg.area, 'split': 'test', 'n': int(len(maha))},
              'coverage_before': calibration.scaled_coverage(maha, 1.0),
              'coverage_after': calibration.scaled_coverage(maha, scale)}
    path = calibration.write_scale(run_dir, record)
    log(f'calibration: ellipses x {scale:.4g} on {len(maha)} panoramas: 1σ / 2σ coverage '
        f'{record["coverage_before"]["1sigma"]:.1%} / {record["coverage_before"]["2sigma"]:.1%} -> '
        f'{record["coverage_after"]["1sigma"]:.1%} / {record["coverage_after"]["2sigma"]:.1%}; written to {path}')
    return record
