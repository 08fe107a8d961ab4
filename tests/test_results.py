"""results.py: the per-query CSV, JSON-safe values, and a results directory that is replaced whole or not at all."""
import csv
import json
import os

import numpy as np
import pytest

from geoloc.eval import calibration
from geoloc.eval import evaluation
from geoloc.eval import results


def test_per_query_csv_is_exact_and_leaves_nan_empty(tmp_path):
    path = str(tmp_path / 'q.csv')
    x = np.array([0.1, 1 / 3, np.nan])
    results.write_per_query(path, {'query': np.array([0, 1, 2]), 'error_m': x, 'ok': np.array([True, False, True]),
                                   'name': np.array(['a.jpg', 'b.jpg', 'c.jpg'])})
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['query', 'error_m', 'ok', 'name']
    assert [float(r[1]) for r in rows[1:3]] == [0.1, 1 / 3]          # repr: read back bit for bit
    assert rows[3][1] == '' and rows[2][2] == 'False' and rows[3][3] == 'c.jpg'


def test_jsonable_turns_numpy_and_non_finite_values_into_json():
    out = results.jsonable({1: np.float32(0.5), 'a': np.array([1.0, np.inf]), 'b': (np.int64(3), np.bool_(True)),
                            'c': float('nan')})
    assert json.loads(json.dumps(out)) == {'1': 0.5, 'a': [1.0, None], 'b': [3, True], 'c': None}


def test_write_outputs_replaces_a_directory_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / 'test' / 'setting'
    out.mkdir(parents=True)
    (out / 'old.txt').write_text('earlier results')
    staging = results._staging_dir(str(out))
    (tmp_path / 'test' / os.path.basename(staging) / 'new.txt').write_text('new')
    results._publish(staging, str(out))
    assert sorted(os.listdir(out)) == ['new.txt'] and os.listdir(tmp_path / 'test') == ['setting']

    def broken(ev, split, cfg, out_dir, plots):
        (open(os.path.join(out_dir, 'half.json'), 'w')).write('{')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(results, '_write_files', broken)
    with pytest.raises(OSError):
        results.write_outputs(None, None, None, str(out), plots=False)
    assert sorted(os.listdir(out)) == ['new.txt'] and os.listdir(tmp_path / 'test') == ['setting']


def canned_results():
    loc = evaluation.localisation_summary(np.array([1.0, 3.0]), np.array([2.0, 4.0]), np.array([True, False]))
    loc['method'] = 'heatmap'
    sigma, err = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 8.0, 2.0, 3.0])
    u = {'n': 4, '1sigma': 0.25, '2sigma': 0.75, 'spearman_u_error': 0.5, 'sparsification': {'ause': 1.5},
         'mean_u_px': 10.0, 'nll_px': 9.8765, 'nll_m': 5.4321, 'mean_sigma_px': 2.5,
         'ence': calibration.ence(sigma, err, 2), 'selective': calibration.selective_prediction(sigma, err, [0.5, 1.0])}
    return {'retrieval': {'R@1': 0.5, 'R@5': 1.0, 'R@10': 1.0, 'R@1%': 0.5, 'hit_rate': 0.5}, 'chance_R@1': 0.25,
            'localisation': loc, 'localisation_positive': loc['all'], 'uncertainty': u,
            'stage_metrics': {'own': 0.25}}


def test_format_results_states_the_calibration_metrics_and_stage_metrics():
    r = canned_results()
    ence = r['uncertainty']['ence']['ence']
    lines = results.format_results(r)
    assert lines[-3] == ('uncertainty: NLL of the ground truths 9.877 (per px^2 of the 640 frame), 5.432 (per m^2); '
                         f'ENCE {ence:.3f} (2 bins of sigma = sqrt(mean eigenvalue), mean sigma 2.5 px)')
    # sigma order keeps 0.5 and 8 m first: median 4.25 m, 1 of 2 within 1 m and 5 m, 1 within 10 m: both
    assert lines[-2] == ('selective prediction (smallest sigma kept first, positive tile; within 1/5/10 m): '
                         '50% (2): median 4.25 m, within 50/50/100 %; 100% (4): median 2.50 m, within 25/75/100 %')
    assert lines[-1] == 'stage metrics: own 0.25'
    # read back from the JSON (NaN as null) the lines still print
    back = json.loads(json.dumps(results.jsonable(r)))
    back['uncertainty']['nll_m'] = back['uncertainty']['selective']['median_m'][0] = None
    back['stage_metrics']['own'] = None
    assert results.format_results(back)[-1] == 'stage metrics: own -'
    assert ', 5.432' not in results.format_results(back)[-3] and 'median - m' in results.format_results(back)[-2]


def test_format_results_prints_every_line_of_a_results_file_with_nulls():
    """A results file read back from disk holds null where a metric was NaN (no correct top-1, a constant u):
    every line still prints, with '-' for each missing value, and the present values unchanged."""
    r = canned_results()
    clean = results.format_results(r)
    back = json.loads(json.dumps(results.jsonable(r)))
    back['retrieval']['R@5'] = back['localisation']['top1_correct']['mean_m'] = None
    back['uncertainty']['spearman_u_error'] = back['uncertainty']['sparsification']['ause'] = None
    lines = results.format_results(back)
    assert len(lines) == len(clean)
    assert 'R@5 -%' in lines[0] and 'R@1 50.00%' in lines[0]
    assert next(line for line in lines if line.startswith('localisation (top1_correct')).count('mean - m') == 1
    assert 'Spearman(u, error) -, AUSE - px' in next(line for line in lines if 'inside 1-sigma' in line)
