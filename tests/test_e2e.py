"""End to end: the main job (run_all.py: all four stage scripts at tiny sizes, each reading the previous
stage's checkpoint, each followed by --test); and the CVACT path. Also pins which parts each stage
restores, which start fresh, and which train."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

import model
import run_all
import stages
from tools import synthetic_data
from geoloc import cli
from geoloc.train import train_state

pytestmark = pytest.mark.slow
TEST = 'original_same_north_qall'   # --test's default settings directory
PREVIOUS = {'E_2_1': 'E_1/phase_a', 'E_2_2': 'E_2_1', 'E_3': 'E_2_2'}


def args(base, data, stage, *extra):
    out = TINY + ['--max_steps', '2', '--data_root', data, '--run_dir', str(base / stage)]
    if stage in PREVIOUS:
        out += ['--init_from', str(base / PREVIOUS[stage])]
    return out + list(extra)


def part(run_dir, stage, p):
    """The variables of part p in a run directory's latest checkpoint."""
    m = stages.build_model(stage, cli.configs([stage], TINY)[0])
    tf.train.Checkpoint(model=m).read(train_state.latest_checkpoint(run_dir)).expect_partial()
    return [v.numpy() for v in getattr(m, p).trainable_variables]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_missing_predecessor_says_what_to_run(tiny_vigor, tmp_path, capsys):
    code = cli.main(stages.script_stages('train_second_E_2_1.py'),
                          args(tmp_path, tiny_vigor(4), 'E_2_1') + ['--init_from', str(tmp_path / 'absent')])
    assert code == 2
    err = capsys.readouterr().err
    assert 'run `python train_first_E_1.py` first' in err and len(err.strip().splitlines()) == 1


def test_main_job_end_to_end(tiny_vigor, tmp_path, capsys):
    """run_all.py, the README's main job, at tiny size: the four stage scripts and their --test as shell
    commands (the suite's one run of it), its table and verdicts; then what each stage restored, trained
    and wrote."""
    data = tiny_vigor(4)
    get = stages.get
    assert run_all.main(['--run_root', str(tmp_path)] + TINY + ['--max_steps', '2', '--data_root', data]) == 0
    assert 'run_all: ' in capsys.readouterr().out
    summary = open(tmp_path / 'summary.txt').read().splitlines()
    assert summary[0].split()[:3] == ['stage', 'R@1', 'R@5']
    assert [line.split()[0] for line in summary[1:5]] == ['E_1', 'E_2_1', 'E_2_2', 'E_3']
    text = '\n'.join(summary)
    assert all(f'{stage}: the ' in text for stage in ('E_1', 'E_2_1', 'E_2_2', 'E_3'))
    assert 'E_3: u of the training pairs' in text and 'active band' in text

    # E_1: phase a then phase b
    assert train_state.latest_checkpoint(str(tmp_path / 'E_1' / 'phase_a')).endswith('-2')
    r = json.load(open(tmp_path / 'E_1' / 'test' / TEST / 'test_results.json'))
    # 64 test panoramas; references: 4 cities x (4 + 2)^2 tiles (the ring of reference-only tiles included)
    assert r['localisation']['method'] == 'offset' and r['n_query'] == 64 and r['n_ref'] == 4 * 36
    assert np.load(tmp_path / 'E_1' / 'test' / TEST / 'grd_descriptors.npy').shape[0] == r['n_query']
    assert os.path.getsize(tmp_path / 'E_1' / 'test' / TEST / 'query_0.png') > 1000
    assert os.path.getsize(tmp_path / 'E_1' / 'test' / TEST / 'accuracy_vigor.png') > 1000
    with open(tmp_path / 'E_1' / 'test' / TEST / 'per_query.csv') as f:
        assert len(f.read().splitlines()) == 1 + r['n_query']

    # E_2_1 from phase a: exactly the retrieval parts; fusion and decoders stay fresh until it trains
    log = open(tmp_path / 'E_2_1' / 'train.log').read()
    assert f'from {tmp_path / "E_1" / "phase_a" / "ckpt" / "ckpt-2"}; fresh: pos_fusion' in log
    r = json.load(open(tmp_path / 'E_2_1' / 'test' / TEST / 'test_results.json'))
    assert r['localisation']['method'] == 'heatmap' and 'uncertainty' not in r
    assert r['localisation_semi']['count'] == 3 * 64          # the semi-positive branch on every semi-positive

    # E_2_2: covariance heads fresh, everything else from E_2_1
    r = json.load(open(tmp_path / 'E_2_2' / 'test' / TEST / 'test_results.json'))
    assert r['uncertainty']['n'] == 64 and r['uncertainty']['mean_u_px'] > 0

    # E_3: the u table over the training split, in the state and on disk; only retrieval parts train
    u = np.load(tmp_path / 'E_3' / 'u_table.npz')
    reader = tf.train.load_checkpoint(train_state.latest_checkpoint(str(tmp_path / 'E_3')))
    table = reader.get_tensor('tables/u_table/.ATTRIBUTES/VARIABLE_VALUE')
    split = cli.dataset_splits(cli.configs([get('E_3')], args(tmp_path, data, 'E_3'))[0], 'train')
    assert table.shape == (len(split), 3) and np.all(table[split.tiles[:, 1:] >= 0] > 0)
    np.testing.assert_array_equal(u['u'], table[split.tiles[:, 1:] >= 0])
    e3, e22 = str(tmp_path / 'E_3'), str(tmp_path / 'E_2_2')
    for p in model.HEATMAP_PARTS + model.CHOLESKY_PARTS:   # not trained in E_3
        assert same(part(e3, get('E_3'), p), part(e22, get('E_2_2'), p)), p
    assert not same(part(e3, get('E_3'), 'grd_trunk'), part(e22, get('E_2_2'), 'grd_trunk'))
    r = json.load(open(tmp_path / 'E_3' / 'test' / TEST / 'test_results.json'))
    assert r['stage'] == 'E_3' and set(r['retrieval']) >= {'R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate'}

    # resuming or extending E_3 reads its u table back from the state: no new table, no new 'u table' line
    before = open(tmp_path / 'E_3' / 'train.log').read().count('u table:')
    assert cli.main([get('E_3')], args(tmp_path, data, 'E_3', '--preset', 'demo', '--max_steps', '3')) == 0
    after = open(tmp_path / 'E_3' / 'train.log').read()
    assert 'extending the run' in after and after.count('u table:') == before
    reader = tf.train.load_checkpoint(train_state.latest_checkpoint(e3))
    assert train_state.latest_checkpoint(e3).endswith('-3')
    np.testing.assert_array_equal(reader.get_tensor('tables/u_table/.ATTRIBUTES/VARIABLE_VALUE'), table)
    np.testing.assert_array_equal(np.load(tmp_path / 'E_3' / 'u_table.npz')['u'], u['u'])


def test_cvact_end_to_end(tmp_path):
    import samples_on_cvact
    root = str(tmp_path / 'CVACT')
    synthetic_data.write_cvact(root, seed=0, n_panos=16, pano_hw=(32, 64))
    samples_on_cvact.resample(root, str(tmp_path / 'CVACT' / 'resampled'), seed=0, progress=False)
    argv = TINY + ['--max_steps', '2', '--dataset', 'cvact', '--data_root', root, '--cvact_mpp', '0.12',
                   '--run_dir', str(tmp_path / 'run'), '--plots', '0']
    e1 = stages.script_stages('train_first_E_1.py')
    assert cli.main(e1, argv) == 0
    assert cli.main(e1[-1:], argv + ['--test']) == 0
    r = json.load(open(tmp_path / 'run' / 'test' / 'cvact_north_qall' / 'test_results.json'))
    assert r['dataset'] == 'CVACT test' and r['n_ref'] == 4 * r['n_query'] == 32
    # one synthetic area: even a wrong top-1 crop is within a few hundred metres (UTM, Euclidean)
    assert 0 < r['localisation']['all']['median_m_centre'] < 1000
