"""benchmarks/gpu_check.py, the accelerator check, through its --smoke run: the same code paths on the CPU
at tiny size (the paper-size run needs a GPU)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from stages import ORDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(out, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--smoke', '--out',
                           str(out), *extra], capture_output=True, text=True, timeout=900, cwd=ROOT)
    with open(out / 'gpu_check.json') as f:
        result = json.load(f)
    return proc, result, (out / 'gpu_check.txt').read_text()


@pytest.mark.slow
def test_smoke_measures_every_stage_in_both_precisions(tmp_path):
    # a budget no loaded machine runs out of: a skipped stage here would be the machine's, not the code's
    proc, out, table = smoke(tmp_path, '--budget', '1200')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert out['smoke'] and out['problems'] == []
    assert out['peak']['float32'] > 0 and out['peak']['float16'] > 0
    for key in ('panoramas_per_s', 'tiles_per_s', 'training_samples_per_s'):
        assert out['pipeline'][key] > 0, key
    rows = {(r['stage'], r['precision']): r for r in out['stages']}
    assert set(rows) == {(s, p) for s in ORDER for p in ('float32', 'mixed')}
    for (stage, precision), r in rows.items():
        assert r['status'] == 'ok', (stage, precision, r['status'])
        assert math.isfinite(r['step_s']) and r['step_s'] > 0 and r['steps_timed'] >= 3
        assert r['flops_step'] > 0 and math.isfinite(r['share_of_peak']) and r['share_of_peak'] > 0
        line = re.search(rf'^{stage}\s+{precision}\s+([\d.]+)\s', table, re.M)
        assert line and float(line.group(1)) == pytest.approx(1e3 * r['step_s'], abs=0.06), (stage, precision)
    # the heatmap stages add two decoders to E_1a's trunks, and both precisions count the same products
    assert rows['E_2_1', 'float32']['flops_step'] > rows['E_1a', 'float32']['flops_step']
    assert all(rows[s, 'mixed']['flops_step'] == rows[s, 'float32']['flops_step'] for s in ORDER)


@pytest.mark.slow
def test_a_spent_budget_skips_a_stage_and_says_so(tmp_path):
    proc, out, table = smoke(tmp_path, '--budget', '1', '--grace', '900', '--stages', 'E_1a',
                             '--precisions', 'float32')
    assert proc.returncode == 1
    assert out['stages'][0]['status'].startswith('skipped: ')
    assert re.search(r'^E_1a\s+float32\s+skipped: ', table, re.M)
    assert 'NOTE: not measured: E_1a float32 (over budget' in table
