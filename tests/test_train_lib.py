"""End to end: all four stages at tiny sizes, each reading the previous stage's checkpoint, and --test.

Also pins the initialisation order: which parts each stage restores, which start fresh, and the
error when a predecessor is missing.
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import model
import synthetic_data
import train_first_E_1
import train_lib
import train_second_E_2_1
import train_second_E_2_2
import train_third_E_3

TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4', '--epochs', '1',
        '--max_steps', '2', '--log_every', '1', '--eval_batch', '16', '--mining_pool', '20', '--mining_topk', '5']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp('e2e')
    data = str(base / 'VIGOR')
    synthetic_data.write_vigor(data, seed=0, grid=4, tile_px=64, pano_hw=(32, 64))
    return base, data


def args(runs, stage, *extra):
    base, data = runs
    out = TINY + ['--data_root', data, '--run_dir', str(base / stage)]
    prev = {'E_2_1': 'E_1', 'E_2_2': 'E_2_1', 'E_3': 'E_2_2'}.get(stage)
    if prev:
        out += ['--init_from', str(base / prev)]
    return out + list(extra)


def variables(m, part):
    return [v.numpy() for v in getattr(m, part).trainable_variables]


def ckpt_part(run_dir, stage, cfg, part):
    m = train_lib.build_model(stage, cfg)
    tf.train.Checkpoint(model=m).read(train_lib.latest_checkpoint(run_dir)).expect_partial()
    return variables(m, part)


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def initialised(stage, argv):
    """A Run built and initialised exactly as training would, without training."""
    cfg = train_lib.parse_config([stage], argv)[0]
    run = train_lib.Run(stage, cfg)
    run.build(train_lib.dataset_splits(cfg, 'train'))
    run.initialise()
    return run, cfg


def test_missing_predecessor_says_what_to_run(runs, capsys):
    base, _ = runs
    code = train_lib.main([train_second_E_2_1.STAGE], args(runs, 'E_2_1') + ['--init_from', str(base / 'absent')])
    assert code == 2
    err = capsys.readouterr().err
    assert 'run `python train_first_E_1.py` first' in err and len(err.strip().splitlines()) == 1


def test_four_stages_end_to_end(runs, capsys):
    base, _ = runs
    # E_1: phase a then phase b, then --test
    assert train_lib.main([train_first_E_1.PHASE_A, train_first_E_1.PHASE_B], args(runs, 'E_1')) == 0
    assert train_lib.latest_checkpoint(str(base / 'E_1' / 'phase_a')).endswith('-2')
    assert train_lib.main([train_first_E_1.PHASE_B], args(runs, 'E_1', '--test')) == 0
    r = json.load(open(base / 'E_1' / 'test' / 'test_results.json'))
    assert r['localisation']['method'] == 'offset' and 0 <= r['retrieval']['R@1'] <= 1
    assert np.load(base / 'E_1' / 'test' / 'grd_descriptors.npy').shape[0] == r['n_query']
    assert os.path.exists(base / 'E_1' / 'test' / 'query_0.png')

    # E_2_1 restores exactly the retrieval parts of E_1; fusion and decoders are fresh
    run, cfg = initialised(train_second_E_2_1.STAGE, args(runs, 'E_2_1'))
    e1_cfg = train_lib.parse_config([train_first_E_1.PHASE_B], args(runs, 'E_1'))[0]
    for part in model.RETRIEVAL_PARTS:
        assert same(variables(run.model, part), ckpt_part(str(base / 'E_1'), train_first_E_1.PHASE_B, e1_cfg, part))
    fresh = train_lib.build_model(train_second_E_2_1.STAGE, cfg)
    assert same(variables(run.model, 'pos_decoder'), variables(fresh, 'pos_decoder'))
    assert train_lib.main([train_second_E_2_1.STAGE], args(runs, 'E_2_1')) == 0
    assert train_lib.main([train_second_E_2_1.STAGE], args(runs, 'E_2_1', '--test')) == 0
    r = json.load(open(base / 'E_2_1' / 'test' / 'test_results.json'))
    assert r['localisation']['method'] == 'heatmap' and 'uncertainty' not in r

    # E_2_2: everything of E_2_1, covariance heads fresh
    run, cfg = initialised(train_second_E_2_2.STAGE, args(runs, 'E_2_2'))
    for part in model.RETRIEVAL_PARTS + model.HEATMAP_PARTS:
        assert same(variables(run.model, part),
                    ckpt_part(str(base / 'E_2_1'), train_second_E_2_1.STAGE, cfg, part)), part
    fresh = train_lib.build_model(train_second_E_2_2.STAGE, cfg)
    assert same(variables(run.model, 'pos_cholesky'), variables(fresh, 'pos_cholesky'))
    assert train_lib.main([train_second_E_2_2.STAGE], args(runs, 'E_2_2')) == 0
    assert train_lib.main([train_second_E_2_2.STAGE], args(runs, 'E_2_2', '--test')) == 0
    r = json.load(open(base / 'E_2_2' / 'test' / 'test_results.json'))
    assert r['uncertainty']['n'] == 0 or 0 <= r['uncertainty']['1sigma'] <= 1

    # E_3: all parts of E_2_2, the u table over the training split, only retrieval parts train
    run, cfg = initialised(train_third_E_3.STAGE, args(runs, 'E_3'))
    for part in model.ALL_PARTS:
        if part in run.model.parts:
            assert same(variables(run.model, part),
                        ckpt_part(str(base / 'E_2_2'), train_second_E_2_2.STAGE, cfg, part)), part
    assert train_lib.main([train_third_E_3.STAGE], args(runs, 'E_3')) == 0
    u = np.load(base / 'E_3' / 'u_table.npz')
    split = train_lib.dataset_splits(cfg, 'train')
    assert u['u'].shape == (len(split), 3) and np.all(u['u'][split.tiles[:, 1:] >= 0] > 0)
    assert str(u['source']).startswith(str(base / 'E_2_2'))
    e3_cfg = train_lib.parse_config([train_third_E_3.STAGE], args(runs, 'E_3'))[0]
    for part in model.HEATMAP_PARTS + model.CHOLESKY_PARTS:   # not trained in E_3
        assert same(ckpt_part(str(base / 'E_3'), train_third_E_3.STAGE, e3_cfg, part),
                    ckpt_part(str(base / 'E_2_2'), train_second_E_2_2.STAGE, e3_cfg, part)), part
    assert not same(ckpt_part(str(base / 'E_3'), train_third_E_3.STAGE, e3_cfg, 'grd_trunk'),
                    ckpt_part(str(base / 'E_2_2'), train_second_E_2_2.STAGE, e3_cfg, 'grd_trunk'))
    assert train_lib.main([train_third_E_3.STAGE], args(runs, 'E_3', '--test')) == 0
    r = json.load(open(base / 'E_3' / 'test' / 'test_results.json'))
    assert set(r['retrieval']) >= {'R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate'}
    assert r['stage'] == 'E_3'


def test_tensorboard_scalars_are_written(runs):
    base, _ = runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = base / 'E_1' / 'tb'
    if not tb.exists():
        pytest.skip('needs the end-to-end run')
    acc = EventAccumulator(str(tb), size_guidance={'tensors': 0})
    acc.Reload()
    tags = set(acc.Tags()['tensors']) | set(acc.Tags().get('scalars', []))
    assert {'loss/total', 'loss/triplet', 'loss/iou_ratio', 'loss/offset', 'learning_rate'} <= tags


def test_lr_schedules():
    v = [tf.Variable(1.0)]
    e1 = train_lib.Adam(v, 1e-5, 0.1, 150000, staircase=True)
    assert float(e1.learning_rate(149999)) == pytest.approx(1e-5)
    assert float(e1.learning_rate(150000)) == pytest.approx(1e-6)
    e22 = train_lib.Adam(v, 5e-6, 0.9, 910, staircase=False)
    assert float(e22.learning_rate(455)) == pytest.approx(5e-6 * 0.9 ** 0.5, rel=1e-5)


def test_adam_matches_reference_update():
    # one Adam step from zero slots: the update is lr * g / (|g| + eps') = lr * sign(g)
    v = tf.Variable([1.0, -2.0])
    opt = train_lib.Adam([v], 0.1)
    opt.apply([tf.constant([0.5, -3.0])])
    np.testing.assert_allclose(v.numpy(), [0.9, -1.9], rtol=1e-5)


def test_cvact_end_to_end(tmp_path):
    import samples_on_cvact
    root = str(tmp_path / 'CVACT')
    synthetic_data.write_cvact(root, seed=0, n_panos=16, pano_hw=(32, 64))
    samples_on_cvact.resample(root, str(tmp_path / 'CVACT' / 'resampled'), seed=0, progress=False)
    argv = TINY + ['--dataset', 'cvact', '--data_root', root, '--run_dir', str(tmp_path / 'run'), '--plots', '0']
    assert train_lib.main([train_first_E_1.PHASE_A, train_first_E_1.PHASE_B], argv) == 0
    assert train_lib.main([train_first_E_1.PHASE_B], argv + ['--test']) == 0
    r = json.load(open(tmp_path / 'run' / 'test' / 'test_results.json'))
    assert r['dataset'] == 'CVACT test' and r['n_ref'] == 4 * r['n_query']
    # one synthetic area: even a wrong top-1 crop is within a few hundred metres (UTM, Euclidean)
    assert 0 < r['localisation']['all']['median_m_centre'] < 1000
