"""The main job: E_1 -> E_2_1 -> E_2_2 -> E_3, each followed by --test, then one comparison table.

  python run_all.py                      # CPU demo on the built-in synthetic city (about 8 min on 2 cores)
  python run_all.py --preset paper --data_root /data/VIGOR   # the paper's settings (GPU)

Any other flag is passed to every stage (e.g. --labels corrected, --dataset cvact, --run_root runs_x).
Each stage is the real shell command, so a failed stage stops the job with that stage's message.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from geoloc.eval import protocols
from geoloc import cli

HERE = os.path.dirname(os.path.abspath(__file__))

# A heatmap whose point moves less than this (median, pixels of the 640-px tile, ~0.1 m) when each panorama is
# swapped for another query's, the tile fixed, ignores the panorama. The other panorama was taken elsewhere: a
# positive holds its panorama anywhere in its central quarter (docs/design.md §1), two such points lie ~170 px
# apart on average, so a branch that reads the panorama moves by far more than a pixel; one that does not
# moves by float rounding alone (below 1e-4 px).
IGNORES_PANORAMA_PX = 1.0


def table(results):
    """Rows of the comparison table from {stage: test_results dict}; every stage's own metrics
    ('stage_metrics') get a column each, '-' for the stages without it."""
    own = list(dict.fromkeys(k for r in results.values() for k in (r.get('stage_metrics') or {})))
    head = ('stage', 'R@1', 'R@5', 'R@10', 'R@1%', 'hit', 'pos: med m', 'pos: centre', 'top1 ok: med m',
            'in 1sig', 'in 2sig', 'rho(u,err)') + tuple(own)
    rows = [head]
    pct = lambda x: '-' if x is None else f'{100 * x:.1f}'
    num = lambda x, f='.2f': '-' if x is None else format(x, f)
    for stage, r in results.items():
        ret, loc, pos = r['retrieval'], r['localisation'], r['localisation_positive']
        unc, metrics = r.get('uncertainty') or {}, r.get('stage_metrics') or {}
        rows.append((stage, pct(ret['R@1']), pct(ret['R@5']), pct(ret['R@10']), pct(ret['R@1%']),
                     pct(ret['hit_rate']), num(pos['median_m']), num(pos['median_m_centre']),
                     num(loc['top1_correct']['median_m']), pct(unc.get('1sigma')), pct(unc.get('2sigma')),
                     num(unc.get('spearman_u_error'))) + tuple(num(metrics.get(k), '.4g') for k in own))
    return columns(rows)


def columns(rows, first_left=False):
    """Rows of cells as aligned text lines: right-justified columns (the first left-justified if asked)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ['  '.join(str(c).ljust(w) if first_left and i == 0 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths))) for row in rows]


def verdicts(results, e3_table):
    """What the table means, in words: does each mechanism act in this run?"""
    lines = []
    for stage, r in results.items():
        pos = r['localisation_positive']
        if r['localisation']['method'] != 'tile centre' and pos['median_m'] is not None:
            gain = pos['median_m_centre'] - pos['median_m']
            word = 'better than' if gain > 0.1 * pos['median_m_centre'] else 'no better than'
            lines.append(f'{stage}: the {r["localisation"]["method"]} puts the query {word} the tile centre '
                         f'(median {pos["median_m"]:.2f} m against {pos["median_m_centre"]:.2f} m in the positive tile)')
        lines.extend(ground_verdicts(stage, r.get('ground_dependence') or {}))
        unc = r.get('uncertainty')
        if unc and unc.get('1sigma') is not None:
            lines.append(f'{stage}: {100 * unc["1sigma"]:.1f} % / {100 * unc["2sigma"]:.1f} % of the ground truths lie '
                         f'inside the 1-/2-sigma ellipses (a calibrated Gaussian: 39.3 % / 86.5 %); Spearman(u, error) '
                         f'{unc["spearman_u_error"]:.2f}')
    if e3_table is not None:
        u, w, share = e3_table['u'], e3_table['w_m'], float(e3_table['active_share'])
        low, high = (float(x) for x in e3_table['active_band'])
        line = (f'E_3: u of the training pairs {u.min():.1f}-{u.max():.1f} px; W_m mean {w.mean():.3f}; '
                f'{100 * share:.1f} % of the pairs in the active band {low} < W_m < {high}')
        if share == 0 and w.min() > 0.99:
            line += ('. Every W_m is ~1, so the weighted ratio term meets its target by construction and is zero at '
                     "every step: E_3's row is more triplet training, not uncertainty propagation")
        elif share == 0 and w.max() < 0.01:
            line += ". Every W_m is ~0: E_3's ratio term is VIGOR's ratio loss x 10 on every pair, no reweighting"
        lines.append(line)
    return lines


def ground_verdicts(stage, ground):
    """Whether each heatmap branch looks at the panorama (localisers.ground_dependence), in words."""
    lines = []
    for branch, name in (('pos', 'the heatmap'), ('semi', 'the semi-positive heatmap')):
        g = ground.get(branch)
        if not g:
            continue
        median = g.get('swap_shift_px_median')
        if median is None or not np.isfinite(median):
            lines.append(f'{stage}: {name}: not measured (swapping panoramas needs 2 pairs or more, it had '
                         f'{g.get("n_pairs", 0)})')
            continue
        word = 'ignores' if median < IGNORES_PANORAMA_PX else 'sees'
        lines.append(f'{stage}: {name} {word} the panorama: swapping panoramas moves its point by a median '
                     f'{median:.2f} px (of the 640-px tile)')
    return lines


def stage_commands(run_root, preset, rest=()):
    """The stage scripts in training order as shell commands: [(last stage it trains, its run directory,
    argv)]; each script's run directory is <run_root>/<stage> and it starts from its predecessor's there.
    rest: flags passed to every script. Imports the stage scripts (and TensorFlow)."""
    import stages
    out = []
    for script, names in stages.main_scripts():
        first, last = stages.get(names[0]), stages.get(names[-1])
        run_dir = os.path.join(run_root, last.home or last.name)
        cmd = [sys.executable, os.path.join(HERE, script), '--preset', preset, '--run_dir', run_dir] + list(rest)
        if first.previous:
            prev = stages.get(first.previous)
            cmd += ['--init_from', os.path.join(run_root, prev.home or prev.name, *([prev.subdir] if prev.subdir else []))]
        out.append((last.name, run_dir, cmd))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='demo', choices=('demo', 'paper'))
    p.add_argument('--run_root', default='runs', help='stage run directories go to <run_root>/<stage>')
    args, rest = p.parse_known_args(argv)
    cli.setup_environment()
    import stages  # imports the stage scripts (and TensorFlow)
    t0 = time.time()
    if '--data_root' not in rest and not any(a.startswith('--data_root=') for a in rest):
        from tools import synthetic_data
        dataset = next((b for a, b in zip(rest, rest[1:]) if a == '--dataset'), 'vigor')
        root = synthetic_data.ensure_builtin(dataset)
        print(f'run_all: the built-in synthetic {dataset} data set: {root}', flush=True)
    results = {}
    for stage, run_dir, command in stage_commands(args.run_root, args.preset, rest):
        for cmd in (command, command + ['--test']):
            print(f'\n=== {" ".join(cmd[1:])}', flush=True)
            code = subprocess.call(cmd)
            if code:
                print(f'run_all: {os.path.basename(cmd[1])} exited with {code}; stopping', file=sys.stderr)
                return code
        # --test wrote into the directory of its settings (the same flags as the command above)
        cfg = cli.configs([stages.get(stage)], ['--preset', args.preset, '--run_dir', run_dir] + rest)[0]
        with open(os.path.join(protocols.results_dir(cfg, run_dir), 'test_results.json')) as f:
            results[stage] = json.load(f)
    any_r = next(iter(results.values()))
    print(f'\n{any_r["dataset"]}: {any_r["n_query"]} queries, {any_r["n_ref"]} references, '
          f'chance R@1 {100 * any_r["chance_R@1"]:.2f}%; protocol: {any_r["protocol"]["text"]}. '
          'Recall and coverage in %; errors are median metres in the positive tile (with the stage\'s offset / '
          'at the tile centre) and for top-1-correct queries')
    e3 = os.path.join(args.run_root, 'E_3', 'u_table.npz')
    lines = table(results) + [''] + verdicts(results, np.load(e3) if os.path.exists(e3) else None)
    print('\n'.join(lines))
    summary = os.path.join(args.run_root, 'summary.txt')
    with open(summary, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'\nrun_all: {(time.time() - t0) / 60:.1f} min; table in {summary}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
