"""run_all.py's table and verdicts on canned results (the main job itself runs once, in tests/test_e2e.py)."""
import numpy as np

import run_all


def result(method, median, centre, top1=None, recall=0.25, unc=None, ground=None):
    """The parts of a stage's test_results.json that run_all reads; ground: {branch: median swap shift}."""
    r = {'retrieval': {'R@1': recall, 'R@5': 0.5, 'R@10': 0.625, 'R@1%': 0.3, 'hit_rate': 0.28},
         'localisation': {'method': method, 'top1_correct': {'median_m': top1}},
         'localisation_positive': {'median_m': median, 'median_m_centre': centre}}
    if unc is not None:
        r['uncertainty'] = unc
    if ground is not None:
        r['ground_dependence'] = {b: {'n_pairs': 1 if m is None else 64, 'swap_shift_px_median': m,
                                      'swap_shift_px_mean': m, 'swap_shift_px_p90': m, 'heatmap_swap_change': 0.0}
                                  for b, m in ground.items()}
    return r


CANNED = {'E_1': result('offset', 14.2, 14.4, 12.0),
          'E_2_1': result('heatmap', 6.0, 14.4, 5.5),
          'E_2_2': result('heatmap', 6.1, 14.4, 5.6, unc={'1sigma': 0.40, '2sigma': 0.85, 'spearman_u_error': 0.42})}


def test_table_rows_and_cells():
    lines = run_all.table(CANNED)
    cells = [line.split() for line in lines]
    assert cells[0][:3] == ['stage', 'R@1', 'R@5'] and [c[0] for c in cells[1:]] == ['E_1', 'E_2_1', 'E_2_2']
    assert cells[1][1] == '25.0' and cells[1][6:9] == ['14.20', '14.40', '12.00'] and cells[1][-3:] == ['-'] * 3
    assert cells[3][-3:] == ['40.0', '85.0', '0.42']
    assert len({len(line) for line in lines}) == 1                  # aligned columns


def test_verdicts_say_whether_each_head_beats_the_centre():
    lines = run_all.verdicts(CANNED, None)
    assert lines[0].startswith('E_1: the offset puts the query no better than the tile centre (median 14.20 m')
    assert lines[1].startswith('E_2_1: the heatmap puts the query better than the tile centre (median 6.00 m')
    assert lines[3] == ('E_2_2: 40.0 % / 85.0 % of the ground truths lie inside the 1-/2-sigma ellipses '
                        '(a calibrated Gaussian: 39.3 % / 86.5 %); Spearman(u, error) 0.42')


def test_verdicts_say_whether_a_heatmap_sees_the_panorama():
    """Below IGNORES_PANORAMA_PX (1 px of the 640 frame) the heatmap ignores the panorama; a shift read back
    from the JSON as null (fewer than 2 pairs) is not measured."""
    assert run_all.IGNORES_PANORAMA_PX == 1.0
    canned = {'E_2_1': result('heatmap', 6.0, 14.4, 5.5, ground={'pos': 0.0, 'semi': 2e-5}),
              'E_2_2': result('heatmap', 6.1, 14.4, 5.6, ground={'pos': 37.25, 'semi': 0.99}),
              'E_3': result('heatmap', 6.1, 14.4, 5.6, ground={'pos': 1.0, 'semi': None})}
    lines = run_all.verdicts(canned, None)
    assert lines[1:3] == [
        'E_2_1: the heatmap ignores the panorama: swapping panoramas moves its point by a median 0.00 px '
        '(of the 640-px tile)',
        'E_2_1: the semi-positive heatmap ignores the panorama: swapping panoramas moves its point by a median '
        '0.00 px (of the 640-px tile)']
    assert lines[4:6] == [
        'E_2_2: the heatmap sees the panorama: swapping panoramas moves its point by a median 37.25 px '
        '(of the 640-px tile)',
        'E_2_2: the semi-positive heatmap ignores the panorama: swapping panoramas moves its point by a median '
        '0.99 px (of the 640-px tile)']
    assert lines[7:] == [
        'E_3: the heatmap sees the panorama: swapping panoramas moves its point by a median 1.00 px '
        '(of the 640-px tile)',
        'E_3: the semi-positive heatmap: not measured (swapping panoramas needs 2 pairs or more, it had 1)']
    assert run_all.verdicts(CANNED, None)[1].startswith('E_2_1: the heatmap puts')   # no measure, no line


def e3_table(u, w):
    w = np.asarray(w)
    return {'u': np.asarray(u), 'w_m': w, 'active_share': np.mean((w > 0.1) & (w < 0.9)), 'active_band': (0.1, 0.9)}


def test_e3_verdicts_name_an_inert_weight():
    flat = run_all.verdicts({}, e3_table([294.2, 296.1], [1.0, 1.0]))[0]
    assert flat.startswith('E_3: u of the training pairs 294.2-296.1 px; W_m mean 1.000; 0.0 % of the pairs')
    assert 'is zero at every step' in flat
    low = run_all.verdicts({}, e3_table([10.0, 12.0], [0.001, 0.002]))[0]
    assert "Every W_m is ~0: E_3's ratio term is VIGOR's ratio loss x 10" in low
    acting = run_all.verdicts({}, e3_table([60.0, 75.0, 90.0, 200.0], [0.02, 0.33, 0.99, 1.0]))[0]
    assert '25.0 % of the pairs in the active band 0.1 < W_m < 0.9' in acting and 'Every W_m' not in acting


def test_stage_metrics_get_a_column_each():
    canned = dict(CANNED)
    canned['E_2_1'] = dict(CANNED['E_2_1'], stage_metrics={'own_a': 0.123456, 'own_b': 7.0})
    canned['E_2_2'] = dict(CANNED['E_2_2'], stage_metrics={'own_b': None})         # NaN read back from the JSON
    cells = [line.split() for line in run_all.table(canned)]
    assert cells[0][-2:] == ['own_a', 'own_b'] and cells[0][-3] == 'rho(u,err)'
    assert cells[1][-2:] == ['-', '-'] and cells[2][-2:] == ['0.1235', '7'] and cells[3][-2:] == ['-', '-']
    assert run_all.table(CANNED)[0].split()[-1] == 'rho(u,err)'                      # none: no column
