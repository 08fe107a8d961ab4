"""study.py: the study's whole pipeline at tiny size (two seeds: city, four stage scripts, evaluation, report)."""
import json
import os

import cv2
import numpy as np
import pytest

from conftest import TINY

pytestmark = pytest.mark.slow   # ~2 min: 8 stage-script subprocesses


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
