"""results.py: the per-query CSV, JSON-safe values, and a results directory that is replaced whole or not at all."""
import csv
import json
import os

import numpy as np
import pytest

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
