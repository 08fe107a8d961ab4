"""The ambiguity study's report: its targets, report.txt, report.json and figures (experiments/study/study.py
measures; this module writes). `python experiments/study/study.py --report_only` rebuilds them from report.json."""
import json
import os
import sys

import numpy as np

import run_all
from tools import synthetic_data

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
             f'{", ".join(str(r["seed"]) for r in seeds)}; settings.json; {meta["wall_min"]:.1f} min, load average '
             f'{meta["load_start"]:.2f} at the start, {meta["load_end"]:.2f} at the end', '']
    lines += run_all.columns(rows, first_left=True)
    lines += ['', localiser_line(seeds)] + calibration_lines(seeds) + dial_lines(seeds)
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
                         f' with b = {t["u_b"]:.1f} px' + (f', a = {t["u_a"]:.4g} / px' if t.get('u_a', t.get(
                             'paper_u_a')) != t.get('paper_u_a') else '') + ' (the study\'s; the paper\'s a = '
                         f'{t.get("paper_u_a", 0.3):g}, b = {t["paper_u_b"]:g} px: {100 * t["paper_active_share"]:.1f} %)'
                         if 'u_b' in t and t['u_b'] != t['paper_u_b'] else ''))
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


def dial_lines(seeds):
    """Per seed, how E_2_2's error and u follow each dial's level (Spearman); none for a report without the
    error's."""
    lines = []
    for r in seeds:
        u = r['uncertainty']['E_2_2']
        if 'spearman_error_level' in u:
            lines.append(f'Dials, seed {r["seed"]} (E_2_2, Spearman with the level): ' + '; '.join(
                f'{dial} error {u["spearman_error_level"][dial]:.2f}, u {rho:.2f}'
                for dial, rho in u['spearman_u_level'].items()))
    return lines


def calibration_lines(seeds):
    """How each seed's E_2_2 ellipses were calibrated: the scale, where it was fitted and the coverage there,
    and the test split's coverage before it (none for a report without calibration)."""
    lines = []
    for r in seeds:
        rec, u = r.get('calibration', {}).get('E_2_2'), r['uncertainty']['E_2_2']
        if not rec:
            continue
        before, after, raw = rec['coverage_before'], rec['coverage_after'], u['uncalibrated']
        lines.append(f'Calibration, seed {r["seed"]}: E_2_2 ellipses x {rec["sigma_scale"]:.3f}, fitted on '
                     f'{rec["fitted_on"]["n"]} held-out training panoramas (1σ / 2σ there {100 * before["1sigma"]:.1f} / '
                     f'{100 * before["2sigma"]:.1f} % -> {100 * after["1sigma"]:.1f} / {100 * after["2sigma"]:.1f} %); '
                     f'on the test split before it: {100 * raw["1sigma"]:.1f} / {100 * raw["2sigma"]:.1f} %')
    return lines


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
