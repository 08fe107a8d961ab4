"""The ambiguity study: do the paper's mechanisms act on a synthetic VIGOR whose ambiguity is known?

  python experiments/study/study.py                           # seeds 0 and 1 -> runs_study/ (~45 min on 2 idle CPU cores)
  python experiments/study/study.py --seeds 0 --out runs_x    # one seed

For each seed: writes a synthetic VIGOR with the four ambiguity dials (synthetic_data.py; CITY below, drawn
with that seed) to <out>/data/VIGOR_seed<k>, trains the four stage scripts on it as run_all.py does
(subprocesses, `--preset study --seed <k>`, run directories <out>/seed<k>/<stage>), evaluates E_1, E_2_1,
E_2_2 and E_3 on the whole test split and measures every target of the study (targets() below). The report:
<out>/report.txt (both seeds against each target, the stage tables, E_3 against E_2_2 with paired
bootstrap intervals), <out>/report.json (every number), <out>/figures/*.png, and per seed
<out>/seed<k>/per_query.npz (the per-query arrays the figures are drawn from).
Any other flag goes to every stage script and beats the preset (tests/test_study.py runs tiny sizes so).
"""
import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ''):   # run as a file: the repository root on the import path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

import run_all
from tools import synthetic_data
from geoloc import cli

# The study's world: 4 cities x 8 x 8 tiles with 16 panoramas each, in a ring of reference-only tiles (2,048
# training and 2,048 test panoramas; 4 x 10 x 10 = 400 reference tiles), every dial mixed at strength 1
# (synthetic_data.py says what each level renders).
CITY = dict(grid=8, tile_px=128, pano_hw=(128, 256), panos_per_tile=16, ambiguity='mixed')
STAGES = ('E_1', 'E_2_1', 'E_2_2', 'E_3')          # evaluated (E_1a is E_1's first phase)
LEVEL_BINS = (0.0, 1e-9, 0.25, 0.5, 0.75, 1.0)     # u against level: level 0, then quarters of (0, 1]
CALIBRATED = {'1sigma': 1 - np.exp(-0.5), '2sigma': 1 - np.exp(-2.0)}
SPARSIFICATION_WELL_BELOW = 0.8   # "well below random order": the curve's area <= 0.8 x the random order's
U_CONSTANT = 0.01                  # u's 10-90 % spread below this share of its mean: u does not rank anything


def targets(seed_report):
    """[(key, what, value, target in words, met)] of one seed's report (the study's targets).

    A u that is constant across queries (10-90 % spread < U_CONSTANT of its mean) meets no ranking target
    (Spearman with error or level, sparsification) whatever its rank correlations read: they rank
    differences of float rounding. Such rows say '(u constant)'."""
    u = seed_report['uncertainty']['E_2_2']
    constant = u_constant(u)
    ranks = ' (u constant)' if constant else ''
    pos = seed_report['stages']['E_2_2']['localisation_positive']
    ratio = pos['median_m'] / pos['median_m_centre']
    rows = [('heatmap_vs_centre', 'E_2_2 heatmap median error / tile centre median (positive tile)', ratio,
             '<= 0.5', ratio <= 0.5)]
    for k, name in (('1sigma', '1σ'), ('2sigma', '2σ')):
        want = 100 * CALIBRATED[k]
        rows.append((f'coverage_{k}', f'E_2_2 ground truths inside the {name} ellipse (%)', 100 * u[k],
                     f'{want - 10:.1f}..{want + 10:.1f}', abs(100 * u[k] - want) <= 10))
    rows.append(('spearman_u_error', 'E_2_2 Spearman(u, error)', u['spearman_u_error'], '>= 0.3' + ranks,
                 u['spearman_u_error'] >= 0.3 and not constant))
    sp = u['sparsification_vs_random']
    rows.append(('sparsification_vs_random', 'E_2_2 sparsification area / random order area', sp,
                 f'<= {SPARSIFICATION_WELL_BELOW}' + ranks, sp <= SPARSIFICATION_WELL_BELOW and not constant))
    for dial, rho in u['spearman_u_level'].items():
        rows.append((f'spearman_u_{dial}', f'E_2_2 Spearman(u, {dial} level)', rho, '>= 0.2' + ranks,
                     rho >= 0.2 and not constant))
    share = seed_report['e3_table']['active_share']
    rows.append(('e3_active_share', 'E_3 training pairs with 0.1 < W_m < 0.9 (%)', 100 * share, '>= 20',
                 share >= 0.2))
    return [(k, what, float(v), t, bool(met) if np.isfinite(v) else False) for k, what, v, t, met in rows]


def u_constant(u_report):
    """True when u's 10-90 % spread is below U_CONSTANT of its mean (uncertainty_report's 'u_px')."""
    px = u_report['u_px']
    return bool(px['p90'] - px['p10'] < U_CONSTANT * abs(px['mean']))


# ----------------------------------------------------------------------------- running the stages

class StageFailed(RuntimeError):
    """A stage script failed; str() is one line (the script printed its own error)."""


def build_city(out, seed, city):
    return synthetic_data.ensure_vigor(os.path.join(out, 'data', f'VIGOR_seed{seed}'), seed=seed, **city)


def train_stages(run_root, data_root, seed, rest):
    """Train the four stage scripts in order (their own shell commands); -> {script's last stage: seconds}."""
    times = {}
    for stage, _, cmd in run_all.stage_commands(run_root, 'study', ['--data_root', data_root, '--seed', str(seed)]
                                                + list(rest)):
        print(f'\n=== {" ".join(cmd[1:])}', flush=True)
        t0 = time.time()
        code = subprocess.call(cmd)
        if code:
            raise StageFailed(f'study: {os.path.basename(cmd[1])} exited with {code} (its error is above); stopping')
        times[stage] = time.time() - t0
    return times


def evaluate_stages(run_root, data_root, rest=()):
    """Each trained stage on the whole test split -> ({stage: testing.Evaluation}, the test split). The
    configuration is the stage script's with the flags it trained with (as run_all reads its results)."""
    from geoloc.nn import embedding
    from geoloc.eval import results
    import stages
    from geoloc.eval import testing
    out, split = {}, None
    for name in STAGES:
        stage = stages.get(name)
        argv = ['--preset', 'study', '--run_dir', os.path.join(run_root, stage.home or stage.name),
                '--data_root', data_root] + list(rest)
        run_dir, ckpt, cfg = testing.trained_run(stage, cli.configs([stage], argv)[0])
        model = testing.restored_model(stage, cfg, ckpt, run_dir)
        if split is None:
            split = cli.dataset_splits(cfg, 'test')
        out[name] = testing.evaluate_model(stage, cfg, model, embedding.Embedder(model), split,
                                           np.arange(len(split)), keep_heatmaps=0, ground=True)
        out[name].results['localiser'] = cfg.localiser if stage.localise == 'heatmap' else stage.localise
        print(f'study: evaluated {name}: ' + results.format_results(out[name].results)[0], flush=True)
    return out, split


# ----------------------------------------------------------------------------- measurements

def per_query(ev, split):
    """The per-query arrays of a heatmap stage with covariance heads: mu, cov, gt (row, col of the 640 frame),
    error (px), u (px), rank, top-1 error (m), positive-tile error (m); and the stage's --test summary of its
    uncertainty ('summary', testing.uncertainty_summary)."""
    import tensorflow as tf

    from geoloc.data import geometry
    import model as model_lib
    mu = geometry.delta_to_rc(ev.delta_pos.astype(np.float64))
    gt = geometry.delta_to_rc(split.deltas[ev.queries, 0].astype(np.float64))
    return {'mu': mu, 'cov': model_lib.cholesky_to_cov(tf.constant(ev.chol)).numpy(), 'gt': gt,
            'error_px': np.linalg.norm(mu - gt, axis=1), 'u': ev.per_query['u_px_positive'],
            'rank': ev.ranks['rank'], 'top1_error_m': ev.per_query['error_m'],
            'pos_error_m': ev.per_query['error_m_positive'], 'summary': ev.results['uncertainty']}


def uncertainty_report(q, levels):
    """One stage's u: its --test summary (1σ / 2σ coverage, Spearman(u, error), sparsification) plus the
    coverage at kσ, the sparsification against random order, and how u and the error follow each dial's
    level (per_query output; levels (Q, 4) in DIALS order)."""
    from geoloc.eval import evaluation
    summary = q['summary']
    sp = summary['sparsification']
    random_auc = float(np.mean(q['error_px']))          # removing queries in random order keeps the mean
    by_level, rho_level, err_level = {}, {}, {}
    for d, dial in enumerate(synthetic_data.DIALS):
        lv = levels[:, d]
        rho_level[dial] = evaluation.rank_correlation(q['u'], lv)
        bins = np.digitize(lv, LEVEL_BINS[1:-1], right=True)          # 0: level 0, 1..4: quarters
        by_level[dial] = [_bin_stats(q['u'][bins == b]) for b in range(len(LEVEL_BINS) - 1)]
        err_level[dial] = [_bin_stats(q['error_px'][bins == b]) for b in range(len(LEVEL_BINS) - 1)]
    return {'n': summary['n'], '1sigma': summary['1sigma'], '2sigma': summary['2sigma'],
            'coverage_curve': evaluation.coverage_curve(q['mu'], q['cov'], q['gt']),
            'spearman_u_error': summary['spearman_u_error'], 'sparsification': sp,
            'random_order_error_px': random_auc,
            'sparsification_vs_random': sp['auc'] / random_auc if random_auc > 0 else float('nan'),
            'u_px': {'mean': float(np.mean(q['u'])), 'min': float(np.min(q['u'])), 'max': float(np.max(q['u'])),
                     'p10': float(np.percentile(q['u'], 10)), 'p90': float(np.percentile(q['u'], 90))},
            'median_error_px': summary['median_error_px'],
            'spearman_u_level': rho_level, 'u_by_level': by_level, 'error_by_level': err_level,
            'level_bins': list(LEVEL_BINS)}


def _bin_stats(x):
    if not len(x):
        return {'n': 0, 'mean': None, 'sem': None}
    return {'n': int(len(x)), 'mean': float(np.mean(x)), 'sem': float(np.std(x) / np.sqrt(len(x)))}


def e3_against_e2_2(before, after, n_boot, seed):
    """E_3 minus E_2_2 on the same test queries, each with a paired bootstrap 95 % interval: R@1, R@10, the
    share of queries put within 10 m by the top-1 tile and its head (a median over all queries would be a
    distance to another city when most top-1 tiles are wrong), the median error in the positive tile."""
    from geoloc.eval import evaluation
    out = {}
    for key, b, a, stat in (('R@1', before['rank'] < 1, after['rank'] < 1, np.mean),
                            ('R@10', before['rank'] < 10, after['rank'] < 10, np.mean),
                            ('top1_within_10m', before['top1_error_m'] < 10, after['top1_error_m'] < 10, np.mean),
                            ('median_pos_error_m', before['pos_error_m'], after['pos_error_m'], np.median)):
        out[key] = evaluation.paired_bootstrap(stat, b.astype(np.float64), a.astype(np.float64), n_boot, seed)
    return out


def e3_table(run_root):
    import train_third_E_3
    with np.load(os.path.join(run_root, 'E_3', 'u_table.npz')) as t:
        u, w = t['u'], t['w_m']
        return {'active_share': float(t['active_share']), 'active_band': [float(x) for x in t['active_band']],
                'u_b': float(t['u_b']), 'paper_u_b': float(t['paper_u_b']),
                'paper_active_share': float(t['paper_active_share']),
                'u_px': {'min': float(u.min()), 'median': float(np.median(u)), 'max': float(u.max())},
                'w_m_mean': float(w.mean()), 'n_pairs': int(u.size), 'band_definition': train_third_E_3.ACTIVE}


def measure_seed(seed, run_root, data_root, n_boot, rest=()):
    """Evaluate one seed's runs -> (report dict, per-query arrays {stage: {...}}, the test split, levels)."""
    evs, split = evaluate_stages(run_root, data_root, rest)
    found = synthetic_data.read_ambiguity_levels(data_root, sorted({p.split(os.sep)[-3] for p in split.pano_paths}))
    levels = np.array([found[os.path.basename(p)] for p in split.pano_paths])
    q = {name: per_query(evs[name], split) for name in ('E_2_2', 'E_3')}
    report = {'seed': seed, 'n_query': len(split), 'n_ref': len(split.tile_paths),
              'stages': {name: {k: evs[name].results[k] for k in ('retrieval', 'localisation_positive', 'localiser')}
                         | {k: evs[name].results[k] for k in ('ground_dependence',) if k in evs[name].results}
                         | {'localisation': {k: v for k, v in evs[name].results['localisation'].items()
                                             if k != 'thresholds_m'}} for name in STAGES},
              'uncertainty': {name: uncertainty_report(q[name], levels) for name in q},
              'e3_table': e3_table(run_root),
              'e3_vs_e2_2': e3_against_e2_2(q['E_2_2'], q['E_3'], n_boot, seed)}
    for stage in report['stages'].values():
        for sub in ('all', 'top1_correct'):
            for k in ('accuracy', 'accuracy_centre'):
                stage['localisation'][sub].pop(k, None)
        for k in ('accuracy', 'accuracy_centre'):
            stage['localisation_positive'].pop(k, None)
    return report, q, split, levels


# ----------------------------------------------------------------------------- the report

def format_report(seeds, meta):
    """The text report: both seeds against each target, the stage tables, E_3 against E_2_2."""
    names = [f'seed {r["seed"]}' for r in seeds]
    rows = [('target', 'wanted') + tuple(names)]
    tag = ' (u constant)'
    for i, t in enumerate(seeds[0]['targets']):
        rows.append((t['what'], t['target'].replace(tag, '')) + tuple(
            f'{r["targets"][i]["value"]:.2f} {"met" if r["targets"][i]["met"] else "NOT met"}'
            + (tag if r['targets'][i]['target'].endswith(tag) else '') for r in seeds))
    lines = [f'Ambiguity study: {meta["n_query"]} test queries, {meta["n_ref"]} reference tiles, seeds '
             f'{", ".join(str(r["seed"]) for r in seeds)}; preset study; {meta["wall_min"]:.1f} min, load average '
             f'{meta["load_start"]:.2f} at the start, {meta["load_end"]:.2f} at the end', '']
    lines += run_all.columns(rows, first_left=True)
    lines += ['', localiser_line(seeds)]
    for r in seeds:
        lines += ['', f'seed {r["seed"]}: recall in %, errors are median metres in the positive tile (the stage\'s '
                  'head / the tile centre); "<= 10 m": queries put within 10 m by their top-1 tile and its head (%)']
        rows = [('stage', 'R@1', 'R@10', 'pos: head', 'pos: centre', '<= 10 m', '1σ', '2σ', 'rho(u,err)')]
        for name, s in r['stages'].items():
            u = r['uncertainty'].get(name, {})
            pct = lambda x: '-' if x is None else f'{100 * x:.1f}'
            rows.append((name, pct(s['retrieval']['R@1']), pct(s['retrieval']['R@10']),
                         f'{s["localisation_positive"]["median_m"]:.2f}',
                         f'{s["localisation_positive"]["median_m_centre"]:.2f}',
                         pct(s['localisation']['all']['recall_within_m']['10']), pct(u.get('1sigma')),
                         pct(u.get('2sigma')),
                         '-' if not u else f'{u["spearman_u_error"]:.2f}'))
        lines += run_all.columns(rows, first_left=True)
        t = r['e3_table']
        lines.append(f'E_3 u table: u {t["u_px"]["min"]:.1f}-{t["u_px"]["max"]:.1f} px (median '
                     f'{t["u_px"]["median"]:.1f}), W_m mean {t["w_m_mean"]:.3f}, {100 * t["active_share"]:.1f} % of '
                     f'{t["n_pairs"]} pairs in the active band' + (
                         f' with b = {t["u_b"]:.1f} px (the study\'s; the paper\'s b = {t["paper_u_b"]:g} px: '
                         f'{100 * t["paper_active_share"]:.1f} %)' if 'u_b' in t and t['u_b'] != t['paper_u_b']
                         else ''))
        inert = t['w_m_mean'] > 0.99 or t['active_share'] < 0.01
        lines.append('E_3 against E_2_2 (same queries, paired bootstrap 95 % interval)' + (
            ": every W_m is ~1, so E_3's weighted ratio term was zero at every step; any change below is E_3's "
            'extra triplet training, not uncertainty propagation:' if inert else ':'))
        for key, b in r['e3_vs_e2_2'].items():
            scale, unit = (1, ' m') if key.endswith('_m') else (100, ' points')
            if max(abs(b['low']), abs(b['high'])) * scale < 0.005:
                verdict = 'no change at this precision'
            elif b['excludes_zero']:
                verdict = f'the interval excludes 0: E_3 {"raises" if b["diff"] > 0 else "lowers"} {key}'
            else:
                verdict = 'the interval includes 0: no change claimed'
            lines.append(f'  {key}: {scale * b["before"]:.2f} -> {scale * b["after"]:.2f}, change '
                         f'{scale * b["diff"]:+.2f}{unit} [{scale * b["low"]:+.2f}, {scale * b["high"]:+.2f}]; {verdict}')
    return lines


def localiser_line(seeds):
    """Which localiser the heatmap stages used, and whether it saw the panorama (the swap shift, px of the
    640-px tile) beside its error against the tile centre's, per seed."""
    parts = []
    for r in seeds:
        s = r['stages'].get('E_2_2', {})
        pos, ground = s.get('localisation_positive'), (s.get('ground_dependence') or {}).get('pos')
        if not pos:
            continue
        shift = f'{ground["swap_shift_px_median"]:.1f} px' if ground else 'not measured'
        parts.append(f'seed {r["seed"]}: E_2_2 {pos["median_m"] / pos["median_m_centre"]:.2f}x the tile centre, '
                     f'swap shift {shift}')
    # a report written before the localiser was recorded comes from the only one there was, the U-Net
    name = next((r['stages']['E_2_2'].get('localiser', 'unet') for r in seeds if 'E_2_2' in r['stages']), 'unet')
    return f'Localiser: {name}; ' + '; '.join(parts)


def plot_figures(fig_dir, seeds, per_seed=None):
    """The report's PNGs: u and error against level per dial, coverage, sparsification, and (with per_seed,
    [(per-query arrays, test split, levels)] per seed) example ellipses."""
    from geoloc.eval import figures
    os.makedirs(fig_dir, exist_ok=True)
    written = []
    centres = [0.0] + [(a + b) / 2 for a, b in zip(LEVEL_BINS[1:-1], LEVEL_BINS[2:])]
    for key, label, fname in (('u_by_level', 'u (px, mean ± s.e.m.)', 'u_vs_level.png'),
                              ('error_by_level', 'error (px, mean ± s.e.m.)', 'error_vs_level.png')):
        fig = figures._figure((12.0, 3.2))
        for d, dial in enumerate(synthetic_data.DIALS):
            ax = fig.add_subplot(1, 4, d + 1)
            for r in seeds:
                u = r['uncertainty']['E_2_2']
                pts = [(c, s['mean'], s['sem']) for c, s in zip(centres, u[key][dial]) if s['n']]
                x, y, e = (np.array(v) for v in zip(*pts))
                ax.errorbar(x, y, e, marker='o', ms=4, capsize=2, label=f'seed {r["seed"]}' + (
                    f': ρ(u, level) {u["spearman_u_level"][dial]:.2f}' if key == 'u_by_level' else ''))
            ax.set_title(dial)
            ax.set_xlabel('level')
            if d == 0:
                ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        written.append(figures._save(fig, os.path.join(fig_dir, fname)))

    fig = figures._figure((5.0, 4.0))
    ax = fig.add_subplot()
    for r in seeds:
        for name, style in (('E_2_2', '-o'), ('E_3', ':')):
            c = r['uncertainty'][name]['coverage_curve']
            ax.plot(c['k'], 100 * np.asarray(c['inside']), style, ms=3, label=f'{name}, seed {r["seed"]}')
    ax.plot(c['k'], 100 * np.asarray(c['calibrated']), 'k--', label='calibrated 1 - exp(-k²/2)')
    ax.set_xlabel('k (ellipse of k σ)')
    ax.set_ylabel('ground truths inside (%)')
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    written.append(figures._save(fig, os.path.join(fig_dir, 'coverage.png')))

    fig = figures._figure((5.0, 4.0))
    ax = fig.add_subplot()
    for r in seeds:
        u = r['uncertainty']['E_2_2']
        sp = u['sparsification']
        f = 100 * np.asarray(sp['fractions'])
        line, = ax.plot(f, sp['curve'], '-o', ms=3,
                        label=f'seed {r["seed"]}: by u (area {u["sparsification_vs_random"]:.2f} x random)')
        ax.plot(f, sp['oracle'], '--', color=line.get_color(), label=f'seed {r["seed"]}: oracle (by error)')
        ax.axhline(u['random_order_error_px'], ls=':', color=line.get_color(), label=f'seed {r["seed"]}: random order')
    ax.set_xlabel('queries removed, most uncertain first (%)')
    ax.set_ylabel('mean error of the rest (px of the 640 frame)')
    ax.set_title('E_2_2 sparsification')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    written.append(figures._save(fig, os.path.join(fig_dir, 'sparsification.png')))

    for r, (q, split, levels) in zip(seeds, per_seed or ()):
        written.append(plot_examples(os.path.join(fig_dir, f'ellipses_seed{r["seed"]}.png'), q['E_2_2'], split, levels))
    return written


def example_queries(levels):
    """{dial: (low query, high query)}: for each dial the query with that dial lowest and the one with it
    highest, each with the other dials as low as can be."""
    out, taken = {}, np.zeros(len(levels), bool)
    for d, dial in enumerate(synthetic_data.DIALS):
        others = np.delete(levels, d, axis=1).sum(1)
        pair = []
        for score in (levels[:, d] + others, -levels[:, d] + 0.5 * others):
            i = int(np.argmin(np.where(taken, np.inf, score)))      # a query shown once (while any is left)
            taken[i] = taken.sum() + 1 < len(levels)
            pair.append(i)
        out[dial] = tuple(pair)
    return out


def plot_examples(path, q, split, levels):
    """Per dial a low- and a high-level query: panorama above its positive tile with the ground truth (star),
    the heatmap's mean (cross) and the 1σ / 2σ ellipses of E_2_2's Gaussian."""
    import cv2

    from geoloc.eval import figures
    from geoloc.data.geometry import TILE_PX
    picks = example_queries(levels)
    fig = figures._figure((12.0, 7.5))
    grid = fig.add_gridspec(4, 4, height_ratios=[0.5, 1, 0.5, 1])
    for d, (dial, pair) in enumerate(picks.items()):
        for k, i in enumerate(pair):
            pano = cv2.imread(split.pano_paths[i])[..., ::-1]
            sat = cv2.imread(split.tile_paths[split.tiles[i, 0]])[..., ::-1]
            scale = sat.shape[0] / TILE_PX
            ax = fig.add_subplot(grid[2 * k, d])
            ax.imshow(pano)
            ax.set_axis_off()
            ax.set_title(f'{dial} {"low" if k == 0 else "high"}: levels ' + ' '.join(f'{v:.2f}' for v in levels[i])
                         + f'\nu {q["u"][i]:.0f} px, error {q["error_px"][i]:.0f} px', fontsize=7)
            ax = fig.add_subplot(grid[2 * k + 1, d])
            ax.imshow(sat)
            eigval, eigvec = np.linalg.eigh(q['cov'][i])
            t = np.linspace(0, 2 * np.pi, 100)
            for n, style in ((1, '-'), (2, '--')):
                rc = q['mu'][i][:, None] + n * (eigvec * np.sqrt(np.maximum(eigval, 0))) @ np.stack([np.cos(t), np.sin(t)])
                ax.plot(rc[1] * scale, rc[0] * scale, style, color='yellow', lw=1)
            ax.plot(q['gt'][i][1] * scale, q['gt'][i][0] * scale, '*', color='lime', ms=10, mec='black')
            ax.plot(q['mu'][i][1] * scale, q['mu'][i][0] * scale, 'X', color='red', ms=8, mec='black')
            ax.set_xlim(-0.5, sat.shape[1] - 0.5)
            ax.set_ylim(sat.shape[0] - 0.5, -0.5)
            ax.set_axis_off()
    fig.suptitle('E_2_2: levels in the order ' + ' '.join(synthetic_data.DIALS)
                 + '; ground truth (star), heatmap mean (cross), 1σ and 2σ ellipses', fontsize=9)
    return figures._save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--out', default='runs_study')
    p.add_argument('--grid', type=int, default=CITY['grid'], help='tiles per city side')
    p.add_argument('--panos_per_tile', type=int, default=CITY['panos_per_tile'])
    p.add_argument('--tile_px', type=int, default=CITY['tile_px'], help='aerial tile side on disk')
    p.add_argument('--pano_h', type=int, default=CITY['pano_hw'][0], help='panorama height on disk (width 2x)')
    p.add_argument('--n_boot', type=int, default=2000, help='bootstrap draws of the E_3 against E_2_2 intervals')
    p.add_argument('--report_only', action='store_true',
                   help="rewrite the report, its targets and figures (not the ellipses) from --out's report.json "
                        '(no training)')
    args, rest = p.parse_known_args(argv)
    if args.report_only:
        return rewrite_report(args.out)
    cli.setup_environment(['--preset', 'study'])
    city = dict(CITY, grid=args.grid, panos_per_tile=args.panos_per_tile, tile_px=args.tile_px,
                pano_hw=(args.pano_h, 2 * args.pano_h))
    t0, load_start = time.time(), os.getloadavg()[0]
    reports, per_seed, stage_times = [], [], {}
    for seed in args.seeds:
        run_root = os.path.join(args.out, f'seed{seed}')
        data_root = build_city(args.out, seed, city)
        try:
            stage_times[seed] = train_stages(run_root, data_root, seed, rest)
        except StageFailed as e:
            print(e, file=sys.stderr)
            return 2
        report, q, split, levels = measure_seed(seed, run_root, data_root, args.n_boot, rest)
        report['train_seconds'] = stage_times[seed]
        reports.append(report)
        per_seed.append((q, split, levels))
        np.savez_compressed(os.path.join(run_root, 'per_query.npz'), levels=levels,
                            **{f'{s}_{k}': v for s in q for k, v in q[s].items() if k != 'summary'})
    for r in reports:
        r['targets'] = [dict(zip(('key', 'what', 'value', 'target', 'met'), row)) for row in targets(r)]
    meta = {'wall_min': (time.time() - t0) / 60, 'load_start': load_start, 'load_end': os.getloadavg()[0],
            'n_query': reports[0]['n_query'], 'n_ref': reports[0]['n_ref'], 'city': city, 'stage_flags': rest}
    written = plot_figures(os.path.join(args.out, 'figures'), reports, per_seed)
    write_report(args.out, {'meta': meta, 'seeds': reports, 'figures': written})
    return 0


def write_report(out, report):
    """report.txt and report.json into out (each written whole, then renamed); prints the text."""
    from geoloc.eval import results
    lines = format_report(report['seeds'], report['meta'])
    for name, text in (('report.txt', '\n'.join(lines) + '\n'),
                       ('report.json', json.dumps(results.jsonable(report), indent=1))):
        with open(os.path.join(out, name + '.tmp'), 'w') as f:
            f.write(text)
        os.replace(os.path.join(out, name + '.tmp'), os.path.join(out, name))
    print('\n'.join(lines))
    print(f'\nstudy: report in {os.path.join(out, "report.txt")}, figures in {os.path.join(out, "figures")}')


def rewrite_report(out):
    """--report_only: the targets, the text and the figures drawn from numbers (all but the example
    ellipses) again from report.json, after a change to the report's rules."""
    path = os.path.join(out, 'report.json')
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f'error: {path}: no readable study report ({type(e).__name__}); run study.py --out {out} first',
              file=sys.stderr)
        return 2
    for r in report['seeds']:
        r['targets'] = [dict(zip(('key', 'what', 'value', 'target', 'met'), row)) for row in targets(r)]
    plot_figures(os.path.join(out, 'figures'), report['seeds'])          # all but the example ellipses
    write_report(out, report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
