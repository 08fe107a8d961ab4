"""The ambiguity study: do the paper's mechanisms act on a synthetic VIGOR whose ambiguity is known?

  python experiments/study/study.py                           # seeds 0 and 1 -> runs_study/ (~42 min on 2 idle CPU cores)
  python experiments/study/study.py --seeds 0 --out runs_x    # one seed

For each seed: writes a synthetic VIGOR with the four ambiguity dials (synthetic_data.py; CITY below, drawn
with that seed) to <out>/data/VIGOR_seed<k>, trains the four stage scripts on it as run_all.py does
(subprocesses, `--preset paper --settings SETTINGS --seed <k>`: the study's settings are its own file,
settings.json beside this script; run directories <out>/seed<k>/<stage>), evaluates E_1, E_2_1,
E_2_2 and E_3 on the whole test split and measures every target of the study (report.py: targets). The report:
<out>/report.txt (both seeds against each target, the stage tables, E_3 against E_2_2 with paired
bootstrap intervals), <out>/report.json (every number), <out>/figures/*.png, and per seed
<out>/seed<k>/per_query.npz (the per-query arrays the figures are drawn from).
Any other flag goes to every stage script and beats the settings file (tests/test_study.py runs tiny sizes so).
"""
import argparse
import os
import subprocess
import sys
import time

if __package__ in (None, ''):   # run as a file: the repository root on the import path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

import run_all
from experiments.study.report import (LEVEL_BINS, plot_figures, rewrite_report, targets,  # noqa: F401
                                      write_report)
from geoloc import cli
from tools import synthetic_data

# The study's world: 4 cities x 8 x 8 tiles with 100 panoramas each, in a ring of reference-only tiles (80 % of
# them train, 20 % test; 4 x 10 x 10 = 400 reference tiles), every dial mixed at strength 1 (synthetic_data.py
# says what each level renders). 10 % of each city's training panoramas are held out (hold_out): the stages
# train on 18,432, the ellipses' scale is fitted on the 2,048 held out, and the 5,120 test panoramas are tested.
# So many that each is seen 1.7 times in E_2_1: with 3,072, seen ten times there, the localiser learnt them by
# heart and the NLL fitted the ellipses where the heatmap is nearly always right (benchmarks/LOG.md, session 9).
CITY = dict(grid=8, tile_px=128, pano_hw=(128, 256), panos_per_tile=100, train_share=0.8, ambiguity='mixed')
HOLD_OUT = 0.1               # share of each city's training panoramas kept for calibration
STAGES = ('E_1', 'E_2_1', 'E_2_2', 'E_3')          # evaluated (E_1a is E_1's first phase)
SETTINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'settings.json')   # every stage's settings


# ----------------------------------------------------------------------------- running the stages

class StageFailed(RuntimeError):
    """A stage script failed; str() is one line (the script printed its own error)."""


def build_city(out, seed, city):
    return synthetic_data.ensure_vigor(os.path.join(out, 'data', f'VIGOR_seed{seed}'), seed=seed, **city)


def hold_out(root, share, seed):
    """Two views of the VIGOR tree `root` that share its images (symlinks): <root>_train, whose training split
    lacks a seeded `share` of each city's training panoramas, and <root>_calib, whose test split is exactly those
    (every other file as in root; both label folders). -> (train root, calibration root). Rewritten every call
    (text files only)."""
    import shutil
    rng = np.random.default_rng([seed, 7])
    views = {'train': f'{root}_train', 'calib': f'{root}_calib'}
    for view in views.values():
        shutil.rmtree(view, ignore_errors=True)
        os.makedirs(view)
    cities = sorted(c for c in os.listdir(os.path.join(root, 'splits')))
    for city in cities:
        for view in views.values():
            os.symlink(os.path.abspath(os.path.join(root, city)), os.path.join(view, city))
        with open(os.path.join(root, 'splits__corrected', city, 'same_area_balanced_train__corrected.txt')) as f:
            names = [line.split()[0] for line in f if line.strip()]
        held = set(np.array(names)[rng.permutation(len(names))[:int(round(share * len(names)))]])
        for folder, suffix in (('splits', ''), ('splits__corrected', '__corrected')):
            src = os.path.join(root, folder, city)
            for view in views.values():
                shutil.copytree(src, os.path.join(view, folder, city))
            with open(os.path.join(src, f'same_area_balanced_train{suffix}.txt')) as f:
                lines = [line for line in f if line.strip()]
            kept = [line for line in lines if line.split()[0] not in held]
            out = [line for line in lines if line.split()[0] in held]
            for view, stem, chosen in (('train', 'train', kept), ('calib', 'train', out), ('calib', 'test', out)):
                with open(os.path.join(views[view], folder, city, f'same_area_balanced_{stem}{suffix}.txt'), 'w') as f:
                    f.writelines(chosen)
    return views['train'], views['calib']


def train_stages(run_root, data_root, seed, rest):
    """Train the four stage scripts in order (their own shell commands); -> {script's last stage: seconds}."""
    times = {}
    for stage, _, cmd in run_all.stage_commands(run_root, 'paper', ['--settings', SETTINGS, '--data_root', data_root,
                                                                     '--seed', str(seed)]
                                                + list(rest)):
        print(f'\n=== {" ".join(cmd[1:])}', flush=True)
        t0 = time.time()
        code = subprocess.call(cmd)
        if code:
            raise StageFailed(f'study: {os.path.basename(cmd[1])} exited with {code} (its error is above); stopping')
        times[stage] = time.time() - t0
    return times


def evaluate_stages(run_root, data_root, calib_root, rest=()):
    """Each trained stage on the whole test split -> ({stage: testing.Evaluation}, the test split, {stage:
    calibration record}). The configuration is the stage script's with the flags it trained with (as run_all
    reads its results). A stage with covariance heads first has its ellipses' scale fitted on calib_root's test
    split, the held-out training panoramas (--test --calibrate 1's fit, written to its calibration.json), and
    is then tested with that scale."""
    from geoloc.nn import embedding
    from geoloc.eval import results
    import stages
    from geoloc.eval import testing
    out, split, calibrations = {}, None, {}
    for name in STAGES:
        stage = stages.get(name)
        argv = ['--settings', SETTINGS, '--run_dir', os.path.join(run_root, stage.home or stage.name),
                '--data_root', data_root] + list(rest)
        run_dir, ckpt, cfg = testing.trained_run(stage, cli.configs([stage], argv)[0])
        model = testing.restored_model(stage, cfg, ckpt, run_dir)
        embedder = embedding.Embedder(model)
        if split is None:
            split = cli.dataset_splits(cfg, 'test')
        scale = 1.0
        if 'pos_cholesky' in stage.parts:
            ccfg = cfg.replace(data_root=calib_root, calibrate=1)
            held = cli.dataset_splits(ccfg, 'test')
            ev = testing.evaluate_model(stage, ccfg, model, embedder, held, np.arange(len(held)), keep_heatmaps=0)
            calibrations[name] = testing.fit_calibration(ev, held, ccfg, run_dir, ckpt,
                                                         lambda m: print(f'study: {name}: {m}', flush=True))
            scale = calibrations[name]['sigma_scale']
        out[name] = testing.evaluate_model(stage, cfg, model, embedder, split, np.arange(len(split)),
                                           keep_heatmaps=0, ground=True, sigma_scale=scale)
        out[name].results['localiser'] = cfg.localiser if stage.localise == 'heatmap' else stage.localise
        print(f'study: evaluated {name}: ' + results.format_results(out[name].results)[0], flush=True)
    return out, split, calibrations


# ----------------------------------------------------------------------------- measurements

def per_query(ev, split):
    """The per-query arrays of a heatmap stage with covariance heads: mu, cov, gt (row, col of the 640 frame),
    error (px), u (px), rank, top-1 error (m), positive-tile error (m); and the stage's --test summary of its
    uncertainty ('summary', testing.uncertainty_summary)."""
    from geoloc.eval import testing
    mu, cov, gt = testing.positive_gaussians(ev, split)
    return {'mu': mu, 'cov': cov, 'gt': gt,
            'error_px': np.linalg.norm(mu - gt, axis=1), 'u': ev.per_query['u_px_positive'],
            'rank': ev.ranks['rank'], 'top1_error_m': ev.per_query['error_m'],
            'pos_error_m': ev.per_query['error_m_positive'], 'summary': ev.results['uncertainty']}


def uncertainty_report(q, levels, scale=1.0):
    """One stage's u: its --test summary (1σ / 2σ coverage, Spearman(u, error), sparsification) plus the
    coverage at kσ, the sparsification against random order, and how u and the error follow each dial's
    level (per_query output; levels (Q, 4) in DIALS order); and the coverage before the calibration's `scale`."""
    from geoloc.eval import calibration, evaluation
    summary = q['summary']
    maha = np.sqrt(evaluation.mahalanobis_sq(q['mu'], q['cov'], q['gt']))
    sp = summary['sparsification']
    random_auc = float(np.mean(q['error_px']))          # removing queries in random order keeps the mean
    by_level, rho_level, err_level, rho_error = {}, {}, {}, {}
    for d, dial in enumerate(synthetic_data.DIALS):
        lv = levels[:, d]
        rho_level[dial] = evaluation.rank_correlation(q['u'], lv)
        rho_error[dial] = evaluation.rank_correlation(q['error_px'], lv)
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
            'spearman_u_level': rho_level, 'spearman_error_level': rho_error, 'u_by_level': by_level, 'error_by_level': err_level,
            'level_bins': list(LEVEL_BINS), 'sigma_scale': float(scale),
            'uncalibrated': calibration.scaled_coverage(maha * scale, 1.0)}


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
    from geoloc.train import u_table
    with np.load(os.path.join(run_root, 'E_3', 'u_table.npz')) as t:
        u, w = t['u'], t['w_m']
        return {'active_share': float(t['active_share']), 'active_band': [float(x) for x in t['active_band']],
                'u_b': float(t['u_b']), 'paper_u_b': float(t['paper_u_b']),
                **({'u_a': float(t['u_a']), 'paper_u_a': float(t['paper_u_a'])} if 'u_a' in t else {}),
                'paper_active_share': float(t['paper_active_share']),
                'u_px': {'min': float(u.min()), 'median': float(np.median(u)), 'max': float(u.max())},
                'w_m_mean': float(w.mean()), 'n_pairs': int(u.size), 'band_definition': u_table.ACTIVE}


def measure_seed(seed, run_root, data_root, calib_root, n_boot, rest=()):
    """Evaluate one seed's runs -> (report dict, per-query arrays {stage: {...}}, the test split, levels)."""
    evs, split, calibrations = evaluate_stages(run_root, data_root, calib_root, rest)
    found = synthetic_data.read_ambiguity_levels(data_root, sorted({p.split(os.sep)[-3] for p in split.pano_paths}))
    levels = np.array([found[os.path.basename(p)] for p in split.pano_paths])
    q = {name: per_query(evs[name], split) for name in ('E_2_2', 'E_3')}
    report = {'seed': seed, 'n_query': len(split), 'n_ref': len(split.tile_paths),
              'stages': {name: {k: evs[name].results[k] for k in ('retrieval', 'localisation_positive', 'localiser')}
                         | {k: evs[name].results[k] for k in ('ground_dependence',) if k in evs[name].results}
                         | {'localisation': {k: v for k, v in evs[name].results['localisation'].items()
                                             if k != 'thresholds_m'}} for name in STAGES},
              'uncertainty': {name: uncertainty_report(q[name], levels, calibrations[name]['sigma_scale'])
                              for name in q},
              'calibration': calibrations,
              'e3_table': e3_table(run_root),
              'e3_vs_e2_2': e3_against_e2_2(q['E_2_2'], q['E_3'], n_boot, seed)}
    for stage in report['stages'].values():
        for sub in ('all', 'top1_correct'):
            for k in ('accuracy', 'accuracy_centre'):
                stage['localisation'][sub].pop(k, None)
        for k in ('accuracy', 'accuracy_centre'):
            stage['localisation_positive'].pop(k, None)
    return report, q, split, levels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--out', default='runs_study')
    p.add_argument('--grid', type=int, default=CITY['grid'], help='tiles per city side')
    p.add_argument('--panos_per_tile', type=int, default=CITY['panos_per_tile'])
    p.add_argument('--train_share', type=float, default=CITY['train_share'],
                   help="share of each city's panoramas in the training split (the rest are tested)")
    p.add_argument('--tile_px', type=int, default=CITY['tile_px'], help='aerial tile side on disk')
    p.add_argument('--pano_h', type=int, default=CITY['pano_hw'][0], help='panorama height on disk (width 2x)')
    p.add_argument('--n_boot', type=int, default=2000, help='bootstrap draws of the E_3 against E_2_2 intervals')
    p.add_argument('--report_only', action='store_true',
                   help="rewrite the report, its targets and figures (not the ellipses) from --out's report.json "
                        '(no training)')
    args, rest = p.parse_known_args(argv)
    if args.report_only:
        return rewrite_report(args.out)
    # the demo's sizes: oneDNN on for the stage scripts (1.4-2.3x faster at demo size on this project's 2-core AVX2
    # machine, slower at paper size: benchmarks/LOG.md), as --preset demo sets it (geoloc/cli.py)
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    cli.setup_environment()
    city = dict(CITY, grid=args.grid, panos_per_tile=args.panos_per_tile, train_share=args.train_share,
                tile_px=args.tile_px, pano_hw=(args.pano_h, 2 * args.pano_h))
    t0, load_start = time.time(), os.getloadavg()[0]
    reports, per_seed, stage_times = [], [], {}
    for seed in args.seeds:
        run_root = os.path.join(args.out, f'seed{seed}')
        try:
            root = build_city(args.out, seed, city)
        except (ValueError, FileExistsError) as e:      # a bad city flag, or a folder holding another city
            print(f'error: {e}', file=sys.stderr)
            return 2
        data_root, calib_root = hold_out(root, HOLD_OUT, seed)
        try:
            stage_times[seed] = train_stages(run_root, data_root, seed, rest)
        except StageFailed as e:
            print(e, file=sys.stderr)
            return 2
        report, q, split, levels = measure_seed(seed, run_root, data_root, calib_root, args.n_boot, rest)
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


if __name__ == '__main__':
    sys.exit(main())
