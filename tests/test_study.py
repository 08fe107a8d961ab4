"""study.py's measurements and report on hand-made and committed numbers: the targets, the per-query
uncertainty report, the paired bootstrap, --report_only against the committed report."""
import os
import shutil

import cv2
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED = os.path.join(os.path.dirname(HERE), 'experiments', 'study')


def test_report_only_rebuilds_the_committed_report(tmp_path):
    """--report_only on the committed report.json rewrites the committed report.txt byte for byte (targets and
    text are functions of the numbers) and draws every figure that comes from numbers."""
    from experiments.study import study
    shutil.copy(os.path.join(COMMITTED, 'report.json'), tmp_path / 'report.json')
    assert study.main(['--out', str(tmp_path), '--report_only']) == 0
    assert open(tmp_path / 'report.txt').read() == open(os.path.join(COMMITTED, 'report.txt')).read()
    names = sorted(os.listdir(tmp_path / 'figures'))
    assert names == ['coverage.png', 'error_vs_level.png', 'sparsification.png', 'u_vs_level.png']
    for name in names:
        img = cv2.imread(str(tmp_path / 'figures' / name))
        assert img is not None and img.shape[0] > 100 and img.std() > 10, name   # drawn, not blank


def hand_made_queries(n=200, seed=0):
    """Per-query arrays as study.per_query makes them: errors grow with the first dial's level, u = the error
    (a perfect ranking), isotropic Gaussians of sigma = u / 4."""
    from geoloc.eval import testing
    rng = np.random.default_rng(seed)
    levels = rng.uniform(0, 1, (n, 4))
    error = 5 + 100 * levels[:, 0]
    angle = rng.uniform(0, 2 * np.pi, n)
    gt = np.full((n, 2), 320.0)
    mu = gt + error[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    sigma = error / 4
    chol = np.stack([sigma, np.zeros(n), sigma], 1).astype(np.float32)
    delta = np.zeros((n, 2))                                                     # the truth at the tile centre
    q = {'mu': mu, 'cov': np.stack([np.diag([s * s, s * s]) for s in sigma]), 'gt': gt, 'error_px': error,
         'u': 4 * sigma, 'summary': testing.uncertainty_summary(mu, chol, delta, np.full(n, 0.1), 0.1 * error)[0]}
    return q, levels


def test_uncertainty_report_on_hand_made_queries():
    from experiments.study import study
    q, levels = hand_made_queries()
    r = study.uncertainty_report(q, levels)
    assert r['spearman_u_error'] == pytest.approx(1.0)
    assert r['spearman_u_level']['overlap'] == pytest.approx(1.0)                # the first dial drives the error
    assert abs(r['spearman_u_level']['aliasing']) < 0.25                           # an unrelated dial
    assert r['spearman_error_level']['overlap'] == pytest.approx(1.0)
    assert abs(r['spearman_error_level']['aliasing']) < 0.25
    assert r['sigma_scale'] == 1.0 and r['uncalibrated'] == {'1sigma': 0.0, '2sigma': 0.0}
    # calibrated by 0.2: before it the ellipses were 5x larger and each truth, 4 sigma out now, lay 0.8 sigma out
    scaled = study.uncertainty_report(q, levels, scale=0.2)
    assert scaled['uncalibrated'] == {'1sigma': 1.0, '2sigma': 1.0} and scaled['sigma_scale'] == 0.2
    assert r['sparsification_vs_random'] < 0.8                                     # the most certain are the best
    assert r['1sigma'] == 0 and r['2sigma'] == 0          # every truth lies 4 sigma out: no ellipse holds it
    assert sum(b['n'] for b in r['u_by_level']['overlap']) == len(levels)
    means = [b['mean'] for b in r['error_by_level']['overlap'] if b['n']]
    assert means == sorted(means)                                                  # error rises with the level


def test_e3_against_e2_2_paired_bootstrap():
    from experiments.study import study
    n = 400
    before = {'rank': np.tile([0, 5, 50, 0], n // 4), 'top1_error_m': np.full(n, 20.0), 'pos_error_m': np.full(n, 8.0)}
    same = study.e3_against_e2_2(before, dict(before), 200, 0)
    assert all(b['diff'] == 0 and b['low'] == b['high'] == 0 for b in same.values())
    better = dict(before, rank=np.where(before['rank'] == 5, 0, before['rank']))  # a quarter of the queries gain R@1
    r = study.e3_against_e2_2(before, better, 200, 0)['R@1']
    assert r['diff'] == pytest.approx(0.25) and 0 < r['low'] <= r['diff'] <= r['high']


def _seed_report(u, spearman_error, spearman_level, ratio=0.4, coverage=(0.39, 0.86), active=0.3):
    return {'stages': {'E_2_2': {'localisation_positive': {'median_m': 10 * ratio, 'median_m_centre': 10.0}}},
            'uncertainty': {'E_2_2': {'1sigma': coverage[0], '2sigma': coverage[1], 'spearman_u_error': spearman_error,
                                      'sparsification_vs_random': 0.5, 'u_px': u,
                                      'spearman_u_level': {d: spearman_level for d in
                                                           ('overlap', 'foreground', 'viewpoint', 'aliasing')}}},
            'e3_table': {'active_share': active}}


def test_targets_met_and_a_constant_u_meets_no_ranking_target():
    from experiments.study import study
    varied = {'mean': 100.0, 'p10': 60.0, 'p90': 150.0}
    rows = {k: (v, t, met) for k, _, v, t, met in study.targets(_seed_report(varied, 0.35, 0.25))}
    assert all(met for _, _, met in rows.values()), rows
    assert rows['heatmap_vs_centre'][0] == pytest.approx(0.4) and rows['e3_active_share'][0] == pytest.approx(30)
    # the same correlations from a u whose 10-90 % spread is 0.5 % of its mean: float noise, not met
    constant = {'mean': 357.7, 'p10': 357.0, 'p90': 358.7}
    rows = {k: (v, t, met) for k, _, v, t, met in study.targets(_seed_report(constant, 0.35, 0.25))}
    ranking = ['spearman_u_error', 'sparsification_vs_random'] + [f'spearman_u_{d}' for d in
                                                                  ('overlap', 'foreground', 'viewpoint', 'aliasing')]
    assert [rows[k][2] for k in ranking] == [False] * 6
    assert all(rows[k][1].endswith('(u constant)') for k in ranking)
    assert rows['coverage_1sigma'][2] and rows['heatmap_vs_centre'][2]        # other targets keep their verdicts
    rows = {k: met for k, _, v, t, met in study.targets(_seed_report(varied, 0.35, 0.25, ratio=0.6, coverage=(0.27, 0.95),
                                                                       active=0.0))}
    assert not rows['heatmap_vs_centre'] and not rows['coverage_1sigma'] and rows['coverage_2sigma']
    assert not rows['e3_active_share']


def test_report_only_without_a_report_is_one_line(tmp_path, capsys):
    from experiments.study import study
    assert study.main(['--out', str(tmp_path), '--report_only']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {tmp_path / "report.json"}: no readable study report (FileNotFoundError); run study.py '
                   f'--out {tmp_path} first']


def test_hold_out_keeps_a_third_of_the_training_panoramas_for_calibration(tiny_vigor, tmp_path):
    """hold_out's two views of one tree: the training split minus a seeded third of each city's training
    panoramas, and a calibration tree whose test split is exactly that third; the test split untouched; the same
    panoramas held out under both label folders; the same seed, the same choice."""
    import input_data
    from experiments.study import study
    root = str(tmp_path / 'V')
    os.symlink(tiny_vigor(3), root)
    train_root, calib_root = study.hold_out(root, 1 / 3, 0)
    names = lambda r, which, labels: {os.path.basename(p) for p in input_data.load_vigor(r, which, 'same',
                                                                                          labels).pano_paths}
    for labels in ('original', 'corrected'):
        full, kept, held = (names(root, 'train', labels), names(train_root, 'train', labels),
                            names(calib_root, 'test', labels))
        assert kept | held == full and not kept & held
        assert len(held) == pytest.approx(len(full) / 3, abs=4)               # a third per city, rounded
        assert names(train_root, 'test', labels) == names(root, 'test', labels)
    first = names(calib_root, 'test', 'corrected')
    assert names(study.hold_out(root, 1 / 3, 0)[1], 'test', 'corrected') == first
    assert names(study.hold_out(root, 1 / 3, 1)[1], 'test', 'corrected') != first


def test_a_bad_city_flag_is_one_line(tmp_path, capsys):
    from experiments.study import study
    assert study.main(['--out', str(tmp_path), '--grid', '2', '--panos_per_tile', '1', '--train_share', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: train_share must leave each city at least one training and one test panorama of its 4, '
                   'got 1.0']
