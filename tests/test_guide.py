"""docs/extending.md, "Adding a stage or a loss", walked once: its code block, saved as train_toy.py beside the
stage scripts' copy of the repository, trains a toy stage with one new loss term and its own setting, and tests it,
with no shared file edited. Its setting is a flag, a field of its config.json, checked by its rule, and acts."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import TINY

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEP = re.compile(r'\[toy\] step (\d+)/\d+ epoch \d+ loss [-\d.e+]+ \(triplet ([-\d.e+]+) offset ([-\d.e+]+)\)')

pytestmark = pytest.mark.slow


def guide_code():
    with open(os.path.join(ROOT, 'docs', 'extending.md')) as f:
        page = f.read()
    section = page[page.index('# Adding a stage or a loss'):]
    return re.search(r'```python\n(.*?)```', section, re.S)[1]


def run(script, args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.run([sys.executable, script] + args, cwd=os.path.dirname(script), env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_guide_trains_and_tests_a_new_stage(tiny_vigor, tmp_path):
    script = str(tmp_path / 'train_toy.py')
    with open(script, 'w') as f:
        f.write(guide_code())
    data = tiny_vigor(3)
    base = TINY + ['--data_root', data, '--max_steps', '3', '--mining', '0']
    runs = {}
    for weight in ('0.5', '0'):
        run_dir = str(tmp_path / f'toy_{weight}')
        out = run(script, base + ['--run_dir', run_dir, '--offset_weight', weight])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs[weight] = [(int(s), float(t), float(o)) for s, t, o in STEP.findall(out.stdout)]
        assert [s for s, _, _ in runs[weight]] == [1, 2, 3], out.stdout
        with open(os.path.join(run_dir, 'config.json')) as f:
            saved = json.load(f)
        assert saved['offset_weight'] == float(weight) and saved['stage'] == 'toy'
    assert all(o > 0 for _, _, o in runs['0.5']) and all(o == 0 for _, _, o in runs['0'])
    # the same first batch: the weight scales the term and nothing else
    assert runs['0.5'][0][1] == pytest.approx(runs['0'][0][1], rel=1e-4)
    test = run(script, base + ['--run_dir', str(tmp_path / 'toy_0.5'), '--offset_weight', '0.5', '--test'])
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    found = [os.path.join(d, 'test_results.json') for d, _, files in os.walk(tmp_path / 'toy_0.5' / 'test')
             if 'test_results.json' in files]
    with open(found[0]) as f:
        results = json.load(f)
    assert results['stage'] == 'toy' and results['localisation']['method'] == 'offset'
    bad = run(script, base + ['--run_dir', str(tmp_path / 'bad'), '--offset_weight', '-1'])
    assert bad.returncode == 2 and bad.stderr.strip() == 'error: --offset_weight -1.0: must be 0 or a positive number'
