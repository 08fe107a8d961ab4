"""--test: evaluate a stage's checkpoint on the test split; also the evaluation behind validation.

Retrieval ranks every reference tile for each query; localisation puts the query in its top-1 tile
(and, for the figures quoted over positives, in its positive tile) with the stage's head: the offset
head, the heatmap's soft-argmax, or the tile centre. Metrics are evaluation.py's pure functions.
"""
import dataclasses
import json
import math
import os

import numpy as np
import tensorflow as tf

import evaluation
import figures
import geometry
import images
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


def evaluate_model(stage, cfg, model, embedder, split, queries, cache=None, keep_heatmaps=4, progress=None):
    """Retrieval, localisation and uncertainty metrics of `model` on split[queries] -> Evaluation."""
    grd_raw = embedder.describe([split.pano_paths[q] for q in queries], 'panorama', cfg.grd_size, cfg.eval_batch,
                                cache, progress)
    sat_raw = embedder.describe(split.tile_paths, 'aerial', (cfg.sat_size,) * 2, cfg.eval_batch, cache, progress)
    grd, sat = _normalise(grd_raw), _normalise(sat_raw)
    pos = split.tiles[queries, 0]
    ranks = evaluation.retrieval_ranks(grd, sat, pos, split.tiles[queries, 1:], block=cfg.eval_block)
    n_ref = len(split.tile_paths)
    results = {'stage': stage.name, 'dataset': split.name, 'n_query': int(len(queries)), 'n_ref': n_ref,
               'chance_R@1': 1.0 / n_ref, 'retrieval': evaluation.retrieval_metrics(ranks, n_ref)}
    top1 = ranks['top1']
    correct = top1 == pos
    gt = split.gt_positions[queries]
    mpp = split.mpp[queries]
    # Offsets predicted in the positive tile (every query) and in the top-1 tile (reusing the positive's
    # prediction where the top-1 is right), as VIGOR deltas (dy, dx), pixels of the 640 frame.
    delta_pos = delta_top1 = chol = None
    heat = {}
    if stage.localise == 'offset':
        delta_pos = model.offset(tf.constant(sat_raw[pos]), tf.constant(grd_raw)).numpy()
        delta_top1 = model.offset(tf.constant(sat_raw[top1]), tf.constant(grd_raw)).numpy()
    elif stage.localise == 'heatmap':
        mu_pos, chol, heat = embedder.localise_pairs(split, queries, pos, cfg, keep_heatmaps=keep_heatmaps,
                                                     cache=cache, progress=progress)
        mu_top1 = mu_pos.copy()
        wrong = np.flatnonzero(~correct)
        if len(wrong):
            mu_top1[wrong] = embedder.localise_pairs(split, queries[wrong], top1[wrong], cfg, cache=cache,
                                                     progress=progress)[0]
        delta_pos = geometry.rc_to_delta(mu_pos)
        delta_top1 = geometry.rc_to_delta(mu_top1)

    def errors(tiles, delta):
        centre = split.tile_centres[tiles]
        err_centre = geometry.distance_m(centre, gt, split.metric)
        if delta is None:
            return err_centre, err_centre
        return geometry.distance_m(geometry.delta_to_position(centre, delta, mpp, split.metric), gt, split.metric), err_centre

    results['localisation'] = evaluation.localisation_summary(*errors(top1, delta_top1), correct)
    results['localisation']['method'] = stage.localise or 'tile centre'
    # Over positives: the offset inside the ground-truth tile, for every query.
    results['localisation_positive'] = evaluation.localisation_summary(*errors(pos, delta_pos),
                                                                       np.ones(len(queries), bool))['all']
    if chol is not None:
        results['uncertainty'] = uncertainty_summary(mu_pos, chol, split.deltas[queries, 0])
    return Evaluation(results, np.asarray(queries), grd, sat, ranks, delta_pos, chol, heat)


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


def localisation_figures(ev, split, cfg, n, path_of=None):
    """The first n queries in their positive tile (heatmap, 1-/2-sigma ellipses): PNG files at
    path_of(i), or RGB arrays when path_of is None."""
    cov = model_lib.cholesky_to_cov(tf.constant(ev.chol)).numpy() if ev.chol is not None else None
    out = []
    for i in range(min(n, len(ev.queries))):
        q = ev.queries[i]
        pano = images.read_image(split.pano_paths[q], cfg.grd_size, 'panorama')
        sat = images.read_image(split.tile_paths[split.tiles[q, 0]], (cfg.sat_size,) * 2, 'aerial')
        gt_rc = geometry.delta_to_rc(split.deltas[q, 0])
        pred_rc = None if ev.delta_pos is None else geometry.delta_to_rc(ev.delta_pos[i])
        rank = int(ev.ranks['rank'][i])
        out.append(figures.plot_localisation(
            path_of(i) if path_of else None, pano, sat, gt_rc, pred_rc, heatmap=ev.heatmaps.get(i),
            cov=None if cov is None else cov[i], title=f'query {q} in its positive tile (retrieval rank {rank + 1})'))
    return out


def write_outputs(ev, split, cfg, out_dir, plots=True):
    """--test's files: test_results.json, the descriptors, and the figures; each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, 'test_results.json'),
            lambda f: f.write(json.dumps(jsonable(ev.results), indent=1).encode()))
    _atomic(os.path.join(out_dir, 'grd_descriptors.npy'), lambda f: np.save(f, ev.grd))
    _atomic(os.path.join(out_dir, 'sat_descriptors.npy'), lambda f: np.save(f, ev.sat))
    if plots:
        figures.plot_recall_curve(os.path.join(out_dir, 'recall_at_k.png'), ev.ranks['rank'], len(ev.sat))
        figures.plot_accuracy_vs_metres(os.path.join(out_dir, 'accuracy_vs_metres.png'),
                                           ev.results['localisation'])
        sp = ev.results.get('uncertainty', {}).get('sparsification')
        if sp:
            figures.plot_sparsification(os.path.join(out_dir, 'sparsification.png'), sp)
        localisation_figures(ev, split, cfg, 4, lambda i: os.path.join(out_dir, f'query_{i}.png'))


def _atomic(path, write):
    """write(file) into path.tmp, then rename: a failure leaves the previous file intact."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def format_results(r):
    ret = r['retrieval']
    lines = [f'retrieval: R@1 {100 * ret["R@1"]:.2f}%  R@5 {100 * ret["R@5"]:.2f}%  R@10 {100 * ret["R@10"]:.2f}%  '
             f'R@1% {100 * ret["R@1%"]:.2f}%  hit rate {100 * ret["hit_rate"]:.2f}%  '
             f'(chance R@1 {100 * r["chance_R@1"]:.2f}%)']
    loc = r['localisation']
    for sub in ('all', 'top1_correct'):
        s = loc[sub]
        lines.append(f'localisation ({sub}, {s["count"]} queries): {loc["method"]}: mean {s["mean_m"]:.2f} m, '
                     f'median {s["median_m"]:.2f} m; tile centre: mean {s["mean_m_centre"]:.2f} m, '
                     f'median {s["median_m_centre"]:.2f} m')
    s = r['localisation_positive']
    lines.append(f'localisation in the positive tile ({s["count"]} queries): {loc["method"]}: mean {s["mean_m"]:.2f} m, '
                 f'median {s["median_m"]:.2f} m; tile centre: mean {s["mean_m_centre"]:.2f} m, '
                 f'median {s["median_m_centre"]:.2f} m')
    u = r.get('uncertainty')
    if u and u.get('n'):
        lines.append(f'uncertainty: inside 1-sigma {100 * u["1sigma"]:.1f}% (calibrated 39.3%), '
                     f'2-sigma {100 * u["2sigma"]:.1f}% (86.5%), Spearman(u, error) '
                     f'{u["spearman_u_error"]:.3f}, AUSE {u["sparsification"]["ause"]:.2f} px, mean u '
                     f'{u["mean_u_px"]:.1f} px')
    return lines


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def run_test(stage, cfg):
    """--test: evaluate the run directory's latest checkpoint on the test split (or --max_queries of it)."""
    import config
    import embedding
    import stages
    import train_lib
    import train_state
    run_dir, _ = stage.run_dirs(cfg)
    ckpt = train_state.latest_checkpoint(run_dir)
    if not ckpt:
        raise train_state.StateError(f'{run_dir}: no checkpoint to test; train it first with the same --run_dir')
    saved = config.load(os.path.join(run_dir, 'config.json'))
    if saved is not None:
        if saved.get('stage') not in ('', stage.name):
            raise train_state.StateError(f'{run_dir}: holds a {saved.get("stage")} run, not {stage.name}; '
                                         f'test it with {stages.get(saved["stage"]).command if saved.get("stage") in stages.SCRIPTS else "its own script"} --test')
        cfg = config.model_settings(saved, cfg)
    log = train_lib.open_log(run_dir, stage.name + ' test')
    split = train_lib.dataset_splits(cfg, 'test')
    model = stages.build_model(stage, cfg)
    train_state.restore_parts(model, stage.parts, ckpt, f'{stage.name} ({run_dir})')
    queries = np.arange(len(split) if not cfg.max_queries else min(cfg.max_queries, len(split)))
    log(f'test: {split.name}: {len(queries)} panoramas against {len(split.tile_paths)} tiles; checkpoint {ckpt}')
    ev = evaluate_model(stage, cfg, model, embedding.Embedder(model), split, queries, progress=lambda m: log(m))
    ev.results['checkpoint'] = ckpt
    out_dir = os.path.join(run_dir, 'test')
    write_outputs(ev, split, cfg, out_dir, plots=bool(cfg.plots))
    for line in format_results(ev.results):
        log(line)
    log(f'test: results in {os.path.join(out_dir, "test_results.json")}')
    return ev.results
