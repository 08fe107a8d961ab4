"""run_all.py, the README's main job, end to end at tiny size: the four stage scripts and their --test as
subprocesses, the table and the verdicts in words."""
import os

import pytest
from conftest import TINY

import run_all

pytestmark = pytest.mark.slow   # ~1.5 min: 8 stage-script subprocesses


def test_main_job_trains_tests_and_tabulates_every_stage(tiny_vigor, tmp_path, capsys):
    root = str(tmp_path / 'runs')
    assert run_all.main(['--run_root', root] + TINY + ['--data_root', tiny_vigor(3), '--max_steps', '2',
                                                        '--plots', '0']) == 0
    summary = open(os.path.join(root, 'summary.txt')).read().splitlines()
    assert [line.split()[0] for line in summary[1:5]] == ['E_1', 'E_2_1', 'E_2_2', 'E_3']
    assert summary[0].split()[:3] == ['stage', 'R@1', 'R@5']
    # the verdicts: every stage's localisation, E_2_2's calibration, and what E_3's weights did
    text = '\n'.join(summary)
    for stage in ('E_1', 'E_2_1', 'E_2_2', 'E_3'):
        assert f'{stage}: the ' in text
    assert 'E_3: u of the training pairs' in text and 'active band' in text
    for stage, sub in (('E_1', 'E_1'), ('E_2_1', 'E_2_1'), ('E_2_2', 'E_2_2'), ('E_3', 'E_3')):
        assert os.path.exists(os.path.join(root, sub, 'test', 'original_same_north_qall', 'test_results.json'))
    assert 'run_all: ' in capsys.readouterr().out
