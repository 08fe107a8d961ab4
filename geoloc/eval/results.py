"""--test's outputs: the results directory written all at once (built in a temporary sibling, moved into
place when complete), the per-query CSV, the figures of a few queries, the one-line summaries, and
JSON-safe values (NaN as null). The files are listed in testing.py's docstring."""
import csv
import io
import json
import math
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from geoloc.eval import figures
from geoloc.data import geometry
from geoloc.data import images
import model as model_lib


def localisation_figures(ev, split, cfg, n, path_of=None):
    """The first n queries in their positive tile (heatmap, 1-/2-sigma ellipses), the panorama as the model
    saw it (the protocol's view): PNG files at path_of(i), or RGB arrays when path_of is None."""
    from geoloc.data import pipeline
    cov = model_lib.cholesky_to_cov(tf.constant(ev.chol)).numpy() if ev.chol is not None else None
    out = []
    for i in range(min(n, len(ev.queries))):
        q = ev.queries[i]
        pano = images.read_image(split.pano_paths[q], cfg.grd_size, 'panorama')
        if ev.views is not None:
            pano = pipeline.apply_views(tf.constant(pano[None]), tf.constant(ev.views[i:i + 1])).numpy()[0]
        sat = images.read_image(split.tile_paths[split.tiles[q, 0]], (cfg.sat_size,) * 2, 'aerial')
        gt_rc = geometry.delta_to_rc(split.deltas[q, 0])
        pred_rc = None if ev.delta_pos is None else geometry.delta_to_rc(ev.delta_pos[i])
        rank = int(ev.ranks['rank'][i])
        out.append(figures.plot_localisation(
            path_of(i) if path_of else None, pano, sat, gt_rc, pred_rc, heatmap=ev.heatmaps.get(i),
            cov=None if cov is None else cov[i], title=f'query {q} in its positive tile (retrieval rank {rank + 1})'))
    return out


def write_outputs(ev, split, cfg, out_dir, plots=True):
    """--test's files (see the module docstring) into out_dir, all at once: they are written into a
    temporary sibling directory that replaces out_dir when complete; a failure leaves out_dir as it was.
    A parent that cannot be written is a one-line config.ConfigError naming --test_dir."""
    staging = _staging_dir(out_dir)
    try:
        _write_files(ev, split, cfg, staging, plots)
        _publish(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _write_files(ev, split, cfg, out_dir, plots):
    with open(os.path.join(out_dir, 'test_results.json'), 'w') as f:
        f.write(json.dumps(jsonable(ev.results), indent=1))
    write_per_query(os.path.join(out_dir, 'per_query.csv'), ev.per_query)
    if ev.yaws is not None:
        write_per_query(os.path.join(out_dir, 'yaws.csv'), ev.yaws)
    np.save(os.path.join(out_dir, 'grd_descriptors.npy'), ev.grd)
    np.save(os.path.join(out_dir, 'sat_descriptors.npy'), ev.sat)
    if plots:
        figures.plot_recall_curve(os.path.join(out_dir, 'recall_at_k.png'), ev.ranks['rank'], len(ev.sat))
        figures.plot_accuracy_vs_metres(os.path.join(out_dir, 'accuracy_vs_metres.png'),
                                        ev.results['localisation'])
        figures.plot_vigor_accuracy(os.path.join(out_dir, 'accuracy_vigor.png'), ev.results['localisation'],
                                    ev.results['localisation_positive'], ev.results['protocol']['name'])
        u = ev.results.get('uncertainty', {})
        if u.get('sparsification'):
            figures.plot_sparsification(os.path.join(out_dir, 'sparsification.png'), u['sparsification'])
        if u.get('ence'):
            figures.plot_reliability(os.path.join(out_dir, 'reliability.png'), u['ence'])
            figures.plot_selective_prediction(os.path.join(out_dir, 'selective_prediction.png'), u['selective'])
        if ev.results.get('stage_metrics'):
            figures.plot_stage_metrics(os.path.join(out_dir, 'stage_metrics.png'), ev.results['stage_metrics'],
                                       ev.results['stage'])
        localisation_figures(ev, split, cfg, 4, lambda i: os.path.join(out_dir, f'query_{i}.png'))


def write_per_query(path, columns):
    """{column: (Q,) array} -> a CSV file with a header row; floats exact (repr), NaN as an empty cell."""
    names = list(columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(names)
    n = len(next(iter(columns.values()))) if columns else 0
    for i in range(n):
        writer.writerow([_cell(columns[c][i]) for c in names])
    with open(path, 'w') as f:
        f.write(buf.getvalue())


def _cell(x):
    if isinstance(x, (float, np.floating)):
        return repr(float(x)) if math.isfinite(x) else ''
    if isinstance(x, (np.integer, np.bool_)):
        return str(x.item())
    return str(x)


def _staging_dir(out_dir):
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
    except OSError as e:
        import config
        raise config.ConfigError(f'{parent}: cannot write the --test results there ({e.strerror}); '
                                 'pass --test_dir DIR to write them elsewhere') from None
    os.chmod(staging, 0o755)
    return staging


def _publish(staging, out_dir):
    """Move the complete staging directory to out_dir, replacing (then deleting) what was there."""
    old = None
    if os.path.lexists(out_dir):
        old = staging + '.old'
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old:
            os.rename(old, out_dir)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def format_results(r):
    """The results in words, one line a topic (values may be None: NaN read back from the JSON)."""
    ret = r['retrieval']
    lines = [f'retrieval: R@1 {_pct(ret["R@1"])}%  R@5 {_pct(ret["R@5"])}%  R@10 {_pct(ret["R@10"])}%  '
             f'R@1% {_pct(ret["R@1%"])}%  hit rate {_pct(ret["hit_rate"])}%  '
             f'(chance R@1 {_pct(r["chance_R@1"])}%)']
    loc = r['localisation']
    for sub in ('all', 'top1_correct', 'top1_hit'):
        if sub not in loc:
            continue
        s = loc[sub]
        lines.append(f'localisation ({sub}, {s["count"]} queries): {loc["method"]}: mean {_num(s["mean_m"])} m, '
                     f'median {_num(s["median_m"])} m; tile centre: mean {_num(s["mean_m_centre"])} m, '
                     f'median {_num(s["median_m_centre"])} m')
    within = loc['all'].get('recall_within_m')
    if within:
        lines.append('recall within ' + ', '.join(f'{t} m {_pct(v)}%' for t, v in within.items())
                     + f' (all {loc["all"]["count"]} queries, top-1 tile + {loc["method"]})')
    s = r['localisation_positive']
    lines.append(f'localisation in the positive tile ({s["count"]} queries): {loc["method"]}: '
                 f'mean {_num(s["mean_m"])} m, '
                 f'median {_num(s["median_m"])} m; tile centre: mean {_num(s["mean_m_centre"])} m, '
                 f'median {_num(s["median_m_centre"])} m')
    s = r.get('localisation_semi')
    if s:
        lines.append(f'semi-positive branch on {s["count"]} semi-positive tiles: mean {_num(s["mean_m"])} m, '
                     f'median {_num(s["median_m"])} m ({s["outside_tile"]} with the truth outside the tile; '
                     f'inside: median {_num(s["inside_tile"]["median_m"])} m)')
    g = r.get('ground_dependence')
    if g:
        name = {'pos': 'heatmap', 'semi': 'semi-positive heatmap'}
        lines.append('ground dependence (each panorama swapped for another query\'s, the tile fixed): ' + '; '.join(
            f'{name.get(b, b)}: mu moves a median {_num(s["swap_shift_px_median"])} px (mean '
            f'{_num(s["swap_shift_px_mean"])}, p90 {_num(s["swap_shift_px_p90"])}; 640-px frame), heatmap change '
            f'{_num(s["heatmap_swap_change"], ".3g")} ({s["n_pairs"]} pairs)' for b, s in g.items()))
    u = r.get('uncertainty')
    if u and u.get('n'):
        lines.append(f'uncertainty: inside 1-sigma {_pct(u["1sigma"], ".1f")}% (calibrated 39.3%), '
                     f'2-sigma {_pct(u["2sigma"], ".1f")}% (86.5%), Spearman(u, error) '
                     f'{_num(u["spearman_u_error"], ".3f")}, AUSE {_num(u["sparsification"]["ause"])} px, mean u '
                     f'{_num(u["mean_u_px"], ".1f")} px')
    if u and u.get('n') and 'nll_px' in u:
        lines.extend(calibration_lines(u))
    if r.get('stage_metrics'):
        lines.append('stage metrics: ' + ', '.join(f'{k} {_num(v, ".4g")}' for k, v in r['stage_metrics'].items()))
    return lines


def calibration_lines(u):
    """uncertainty_summary's NLL, ENCE and selective prediction, in words (values may be None: NaN read back)."""
    e, sel = u['ence'], u['selective']
    lines = [f'uncertainty: NLL of the ground truths {_num(u["nll_px"], ".3f")} (per px^2 of the 640 frame), '
             f'{_num(u["nll_m"], ".3f")} (per m^2); ENCE {_num(e["ence"], ".3f")} ({e["n_bins"]} bins of sigma = '
             f'sqrt(mean eigenvalue), mean sigma {_num(u["mean_sigma_px"], ".1f")} px)']
    within = sel['recall_within_m']
    kept = [f'{100 * k:.0f}% ({n}): median {_num(m)} m, within ' +
            '/'.join(_num(None if v[i] is None else 100 * v[i], '.0f') for v in within.values()) + ' %'
            for i, (k, n, m) in enumerate(zip(sel['kept'], sel['count'], sel['median_m']))]
    lines.append(f'selective prediction (smallest sigma kept first, positive tile; within {"/".join(within)} m): '
                 + '; '.join(kept))
    return lines


def _pct(x, fmt='.2f'):
    """100 x formatted, '-' for None."""
    return _num(None if x is None else 100 * x, fmt)


def _num(x, fmt='.2f'):
    """x formatted, '-' for None (NaN read back from the JSON)."""
    return '-' if x is None else format(x, fmt)


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
