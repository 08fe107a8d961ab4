"""study.py: the study's whole pipeline at tiny size (two seeds: city, four stage scripts, evaluation, report)."""
import json
import os

import cv2
import numpy as np
import pytest

from conftest import TINY



@pytest.mark.slow   # ~2 min: 8 stage-script subprocesses
def test_study_pipeline_writes_the_report(tmp_path):
    import study
    out = str(tmp_path / 'study')
    flags = ['--seeds', '0', '1', '--out', out, '--grid', '3', '--panos_per_tile', '2', '--tile_px', '64',
             '--pano_h', '32', '--n_boot', '50'] + TINY + ['--max_steps', '2']
    assert study.main(flags) == 0
    with open(os.path.join(out, 'report.json')) as f:
        report = json.load(f)
    assert [r['seed'] for r in report['seeds']] == [0, 1]
    for r in report['seeds']:
        assert set(r['stages']) == {'E_1', 'E_2_1', 'E_2_2', 'E_3'}
        keys = [t['key'] for t in r['targets']]
        assert keys == ['heatmap_vs_centre', 'coverage_1sigma', 'coverage_2sigma', 'spearman_u_error',
                        'sparsification_vs_random', 'spearman_u_overlap', 'spearman_u_foreground',
                        'spearman_u_viewpoint', 'spearman_u_aliasing', 'e3_active_share']
        assert all(isinstance(t['met'], bool) for t in r['targets'])
        u = r['uncertainty']['E_2_2']
        assert len(u['coverage_curve']['k']) == len(u['coverage_curve']['inside']) == 11
        assert set(u['spearman_u_level']) == {'overlap', 'foreground', 'viewpoint', 'aliasing'}
        assert 0 <= r['e3_table']['active_share'] <= 1
        for key in ('R@1', 'R@10', 'top1_within_10m', 'median_pos_error_m'):
            b = r['e3_vs_e2_2'][key]
            assert b['low'] <= b['diff'] <= b['high'] or np.isclose(b['low'], b['high'])
        with np.load(os.path.join(out, f'seed{r["seed"]}', 'per_query.npz')) as q:
            assert q['levels'].shape == (r['n_query'], 4) and q['E_2_2_u'].shape == (r['n_query'],)
    text = open(os.path.join(out, 'report.txt')).read()
    assert 'seed 0' in text and 'seed 1' in text and 'E_3 against E_2_2' in text
    names = sorted(os.listdir(os.path.join(out, 'figures')))
    assert names == ['coverage.png', 'ellipses_seed0.png', 'ellipses_seed1.png', 'error_vs_level.png',
                     'sparsification.png', 'u_vs_level.png']
    for name in names:
        img = cv2.imread(os.path.join(out, 'figures', name))
        assert img is not None and img.shape[0] > 100 and img.std() > 10, name   # drawn, not blank
    # --report_only rebuilds the same targets and text from report.json, without training
    before = open(os.path.join(out, 'report.txt')).read()
    os.remove(os.path.join(out, 'report.txt'))
    assert study.main(['--out', out, '--report_only']) == 0
    assert open(os.path.join(out, 'report.txt')).read() == before


def _seed_report(u, spearman_error, spearman_level, ratio=0.4, coverage=(0.39, 0.86), active=0.3):
    return {'stages': {'E_2_2': {'localisation_positive': {'median_m': 10 * ratio, 'median_m_centre': 10.0}}},
            'uncertainty': {'E_2_2': {'1sigma': coverage[0], '2sigma': coverage[1], 'spearman_u_error': spearman_error,
                                      'sparsification_vs_random': 0.5, 'u_px': u,
                                      'spearman_u_level': {d: spearman_level for d in
                                                           ('overlap', 'foreground', 'viewpoint', 'aliasing')}}},
            'e3_table': {'active_share': active}}


def test_targets_met_and_a_constant_u_meets_no_ranking_target():
    import study
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
    import study
    assert study.main(['--out', str(tmp_path), '--report_only']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {tmp_path / "report.json"}: no readable study report (FileNotFoundError); run study.py '
                   f'--out {tmp_path} first']
