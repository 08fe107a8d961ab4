"""The main job: E_1 -> E_2_1 -> E_2_2 -> E_3, each followed by --test, then one comparison table.

  python run_all.py                      # CPU demo on the built-in synthetic city (~6 min on 2 idle cores)
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

import protocols
import train_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def table(results):
    """Rows of the comparison table from {stage: test_results dict}."""
    head = ('stage', 'R@1', 'R@5', 'R@10', 'R@1%', 'hit', 'pos: med m', 'pos: centre', 'top1 ok: med m',
            'in 1sig', 'in 2sig', 'rho(u,err)')
    rows = [head]
    for stage, r in results.items():
        ret, loc, pos = r['retrieval'], r['localisation'], r['localisation_positive']
        unc = r.get('uncertainty') or {}
        pct = lambda x: '-' if x is None else f'{100 * x:.1f}'
        num = lambda x: '-' if x is None else f'{x:.2f}'
        rows.append((stage, pct(ret['R@1']), pct(ret['R@5']), pct(ret['R@10']), pct(ret['R@1%']),
                     pct(ret['hit_rate']), num(pos['median_m']), num(pos['median_m_centre']),
                     num(loc['top1_correct']['median_m']), pct(unc.get('1sigma')), pct(unc.get('2sigma')),
                     num(unc.get('spearman_u_error'))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return ['  '.join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='demo', choices=('demo', 'paper'))
    p.add_argument('--run_root', default='runs', help='stage run directories go to <run_root>/<stage>')
    args, rest = p.parse_known_args(argv)
    train_lib.setup_environment()
    import stages  # imports the stage scripts (and TensorFlow)
    t0 = time.time()
    results = {}
    for script, names in stages.main_scripts():
        first, last = stages.get(names[0]), stages.get(names[-1])
        run_dir = os.path.join(args.run_root, last.home or last.name)
        common = [sys.executable, os.path.join(HERE, script), '--preset', args.preset, '--run_dir', run_dir] + rest
        if first.previous:
            prev = stages.get(first.previous)
            common += ['--init_from', os.path.join(args.run_root, prev.home or prev.name, prev.subdir)]
        stage = last.name
        for cmd in (common, common + ['--test']):
            print(f'\n=== {" ".join(cmd[1:])}', flush=True)
            code = subprocess.call(cmd)
            if code:
                print(f'run_all: {script} exited with {code}; stopping', file=sys.stderr)
                return code
        # --test wrote into the directory of its settings (the same flags as the command above)
        cfg = train_lib.configs([last], ['--preset', args.preset, '--run_dir', run_dir] + rest)[0]
        with open(os.path.join(protocols.results_dir(cfg, run_dir), 'test_results.json')) as f:
            results[stage] = json.load(f)
    any_r = next(iter(results.values()))
    print(f'\n{any_r["dataset"]}: {any_r["n_query"]} queries, {any_r["n_ref"]} references, '
          f'chance R@1 {100 * any_r["chance_R@1"]:.2f}%; protocol: {any_r["protocol"]["text"]}. '
          'Recall and coverage in %; errors are median metres in the positive tile (with the stage\'s offset / '
          'at the tile centre) and for top-1-correct queries')
    lines = table(results)
    print('\n'.join(lines))
    summary = os.path.join(args.run_root, 'summary.txt')
    with open(summary, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'\nrun_all: {(time.time() - t0) / 60:.1f} min; table in {summary}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
