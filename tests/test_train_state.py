"""train_state.py: Adam, the state a run checkpoints, and the initialisation order with what each stage
carries over from its predecessor (docs/design.md §5)."""
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

import config
import model
import stages
import train_first_E_1
from geoloc import cli
import train_second_E_2_1
from geoloc.train import train_state


def index(variables, v):
    return next(i for i, x in enumerate(variables) if x is v)


def test_adam_matches_reference_update():
    # one Adam step from zero slots: the update is lr * g / (|g| + eps') = lr * sign(g)
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    opt = train_state.Adam(m, ['grd_safa'], 0.1)
    v = m.grd_safa.b2
    before = v.numpy().copy()
    grads = [tf.zeros_like(x) for x in opt.vars]
    grads[index(opt.vars, v)] = tf.fill(v.shape, -3.0)
    opt.apply(grads)
    np.testing.assert_allclose(v.numpy(), before + 0.1, rtol=1e-5)
    assert int(opt.updates.numpy()) == int(opt.global_step.numpy()) == 1


def test_lr_schedules():
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    e1 = train_state.Adam(m, ['grd_safa'], 1e-5, 0.1, 150000, staircase=True)
    assert float(e1.learning_rate(149999)) == pytest.approx(1e-5)
    assert float(e1.learning_rate(150000)) == pytest.approx(1e-6)
    e22 = train_state.Adam(m, ['grd_safa'], 5e-6, 0.9, 910, staircase=False)
    assert float(e22.learning_rate(455)) == pytest.approx(5e-6 * 0.9 ** 0.5, rel=1e-5)


def test_bias_correction_follows_the_updates_not_the_global_step():
    """TF1 semantics: restored slots keep their beta powers when the global step is reset (E_2_2, E_3)."""
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    opt = train_state.Adam(m, ['grd_safa'], 0.1)
    v = m.grd_safa.b2
    i = index(opt.vars, v)
    opt.m[i].assign(tf.fill(v.shape, 0.3))
    opt.v[i].assign(tf.fill(v.shape, 0.04))
    opt.updates.assign(10 ** 6)                    # beta powers ~0: no correction
    before = v.numpy().copy()
    grads = [tf.zeros_like(x) for x in opt.vars]
    opt.apply(grads)
    # m = 0.9 * 0.3 = 0.27, v = 0.999 * 0.04 = 0.03996; step = lr m / (sqrt(v) + eps)
    np.testing.assert_allclose(before - v.numpy(), 0.1 * 0.27 / np.sqrt(0.03996), rtol=1e-4)
    assert int(opt.global_step.numpy()) == 1


# ----------------------------------------------------------------------------- stage to stage

@pytest.fixture(scope='module')
def phase_a(tiny_vigor, tmp_path_factory):
    """E_1 phase a, 2 epochs of 9 steps (a mining round after the first): its run directory."""
    data = tiny_vigor(3)
    run_dir = str(tmp_path_factory.mktemp('state') / 'E_1')
    argv = TINY + ['--data_root', data, '--run_dir', run_dir, '--epochs', '2', '--mining_start_epoch', '2']
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0
    return data, run_dir


def built(stage, argv):
    cfg = cli.configs([stage], argv)[0]
    split = cli.dataset_splits(cfg, 'train')
    state = train_state.TrainState(stage, cfg, len(split), len(split) // cfg.batch)
    return state, cfg


def test_phase_b_continues_phase_a(phase_a, capsys):
    """E_1 phase b: the global step, Adam's slots and the mining table of phase a; the learning rate at its
    first step is phase a's schedule continued, and --max_steps counts phase b's own steps. As the released
    code, phase b also continues phase a's mining descriptors (its sat_global_train) and ranks them at once:
    the round phase a's last epoch end did not run."""
    data, run_dir = phase_a
    argv = TINY + ['--data_root', data, '--run_dir', run_dir, '--max_steps', '3']
    a_ckpt = train_state.latest_checkpoint(os.path.join(run_dir, 'phase_a'))
    state, cfg = built(train_first_E_1.PHASE_B, argv)
    logged = []
    assert train_state.initialise(state, train_first_E_1.PHASE_B, cfg, *train_first_E_1.PHASE_B.run_dirs(cfg),
                                  logged.append) == 'previous'
    reader = tf.train.load_checkpoint(a_ckpt)
    a_step = int(reader.get_tensor('optimizer/global_step/.ATTRIBUTES/VARIABLE_VALUE'))
    assert a_step == 18 and int(state.optimizer.global_step.numpy()) == 18 and int(state.step.numpy()) == 0
    lr_a = train_state.Adam(state.model, (), cfg.lr, cfg.lr_decay, cfg.lr_decay_steps).learning_rate(18)
    assert float(state.optimizer.learning_rate()) == pytest.approx(float(lr_a), rel=1e-6)
    assert float(lr_a) < cfg.lr                              # (not a fresh schedule at step 0)
    for part in model.RETRIEVAL_PARTS:
        for k, slot in enumerate(state.optimizer.slots[part]['m']):
            saved = reader.get_tensor(f'optimizer/slots/{part}/m/{k}/.ATTRIBUTES/VARIABLE_VALUE')
            np.testing.assert_array_equal(slot.numpy(), saved)
            assert np.any(saved != 0)
    assert not np.any(state.optimizer.slots['offset_head']['m'][0].numpy())     # fresh
    np.testing.assert_array_equal(state.hard.numpy(), reader.get_tensor('hard/.ATTRIBUTES/VARIABLE_VALUE'))
    assert bool(state.hard_valid.numpy())
    assert 'carried over:' in logged[-1] and 'global step 18' in logged[-1] and 'mining table' in logged[-1]
    # train it: 3 steps of phase b, mined from its first batch, global step 18 + 3
    capsys.readouterr()
    assert cli.main([train_first_E_1.PHASE_B], argv) == 0
    out = capsys.readouterr().out
    b_ckpt = train_state.latest_checkpoint(run_dir)
    reader = tf.train.load_checkpoint(b_ckpt)
    assert int(reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')) == 3
    assert int(reader.get_tensor('optimizer/global_step/.ATTRIBUTES/VARIABLE_VALUE')) == 21
    with np.load(a_ckpt + '.mining.npz') as a, np.load(b_ckpt + '.mining.npz') as b:
        assert int(a['pending']) == 1 and int(b['pending']) == -1      # phase a's last round: run by phase b
        assert len(a['pool']) == len(b['pool']) and a['grd_seen'].sum() > 0
        assert np.all(b['grd_seen'][a['grd_seen']]) and np.all(b['sat_seen'][a['sat_seen']])
    carried = out.index(f'mining: carried over the descriptor table of {a_ckpt}')
    assert out.index('[E_1] mining: epoch 2: top-5 of 20 tiles') > carried
    assert out.index('[E_1] mining: epoch 2: top-5 of 20 tiles') < out.index('[E_1] step 1/3')


def test_phase_b_without_carried_optimizer_restarts_the_schedule(phase_a, tmp_path):
    """--carry_optimizer 0 in phase b: fresh slots and bias correction, and the learning-rate schedule at step 0
    (its help says so); the mining table still comes across."""
    data, run_dir = phase_a
    argv = TINY + ['--data_root', data, '--run_dir', str(tmp_path / 'E_1'), '--carry_optimizer', '0',
                   '--init_from', os.path.join(run_dir, 'phase_a')]
    state, cfg = built(train_first_E_1.PHASE_B, argv)
    logged = []
    train_state.initialise(state, train_first_E_1.PHASE_B, cfg, *train_first_E_1.PHASE_B.run_dirs(cfg), logged.append)
    assert int(state.optimizer.global_step.numpy()) == 0 and int(state.optimizer.updates.numpy()) == 0
    assert float(state.optimizer.learning_rate()) == pytest.approx(cfg.lr)
    assert not np.any(state.optimizer.slots['grd_trunk']['m'][0].numpy())
    assert bool(state.hard_valid.numpy()) and 'mining table' in logged[-1]
    assert ('not the Adam slots nor the global step (--carry_optimizer 0: the learning-rate schedule starts at '
            'step 0)') in logged[-1]


def test_e2_1_restores_slots_and_resets_the_global_step(phase_a, tmp_path):
    data, run_dir = phase_a
    argv = TINY + ['--data_root', data, '--run_dir', str(tmp_path / 'E_2_1'),
                   '--init_from', os.path.join(run_dir, 'phase_a')]
    stage = train_second_E_2_1.STAGE
    state, cfg = built(stage, argv)
    train_state.initialise(state, stage, cfg, *stage.run_dirs(cfg), lambda m: None)
    assert int(state.optimizer.global_step.numpy()) == 0 and int(state.optimizer.updates.numpy()) == 18
    assert np.any(state.optimizer.slots['grd_trunk']['v'][0].numpy())
    assert not np.any(state.optimizer.slots['pos_decoder']['v'][0].numpy())
    # --carry_optimizer 0: fresh slots
    state, cfg = built(stage, argv + ['--carry_optimizer', '0'])
    train_state.initialise(state, stage, cfg, *stage.run_dirs(cfg), lambda m: None)
    assert int(state.optimizer.updates.numpy()) == 0 and not np.any(state.optimizer.slots['grd_trunk']['v'][0].numpy())


def test_resume_comes_first_and_a_damaged_index_is_an_error(phase_a, tmp_path):
    data, run_dir = phase_a
    stage = train_first_E_1.PHASE_A
    state, cfg = built(stage, TINY + ['--data_root', data, '--run_dir', run_dir])
    logged = []
    assert train_state.initialise(state, stage, cfg, os.path.join(run_dir, 'phase_a'), '', logged.append) == 'resume'
    assert int(state.step.numpy()) == 18 and 'resumed this run from' in logged[0]
    broken = tmp_path / 'broken'
    os.makedirs(broken / 'ckpt')
    (broken / 'ckpt' / 'checkpoint').write_text('garbage')
    with pytest.raises(train_state.StateError, match='damaged checkpoint index'):
        train_state.latest_checkpoint(str(broken))


def vgg16_file(path, width, drop=(), first=None):
    """A vgg16.npy of zeros shaped for `width` (without the layers `drop`; conv1_1 of shape `first` if given)."""
    weights, cin = {}, 3
    for layer in model.VGG16_LAYERS:
        if layer != 'pool':
            name, c = layer
            cout = model.channels(c, width)
            weights[name] = [np.zeros((3, 3, cin, cout), np.float32), np.zeros(cout, np.float32)]
            cin = cout
    for name in drop:
        del weights[name]
    if first is not None:
        weights['conv1_1'][0] = np.zeros(first, np.float32)
    np.save(path, weights, allow_pickle=True)
    return str(path)


def test_imagenet_weights_of_another_width_start_random_with_a_message(tmp_path):
    """A VGG16 file of another width with a width-1/16 network: one clear line naming the width it fits, and
    random trunks, never a crash."""
    path = vgg16_file(tmp_path / 'vgg16.npy', 0.125)
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    before = m.grd_trunk.convs[0].w.numpy().copy()
    logged = []
    assert not train_state.load_imagenet(m, path, logged.append)
    assert logged == [f'init: random VGG16 trunks: the ImageNet weights in {path} do not fit this network (layer '
                      'conv1_1 has shape (3, 3, 3, 8), this network needs (3, 3, 3, 4)); they fit --width 0.125 only']
    np.testing.assert_array_equal(m.grd_trunk.convs[0].w.numpy(), before)
    assert train_state.load_imagenet(m, vgg16_file(tmp_path / 'fits.npy', 0.0625), logged.append)


@pytest.mark.parametrize('damage,why', [
    (dict(first=(3, 3, 5, 64)), 'layer conv1_1 has shape (3, 3, 5, 64); a VGG16 of any width needs (3, 3, 3, 64 x '
                                'width)'),
    (dict(drop=('conv4_2',)), 'layer conv4_2 missing'),
    (dict(first=(3, 3, 3, 48)), 'layer conv1_1 has shapes (3, 3, 3, 48) and (64,); with conv1_1 of width 0.75 it '
                                'needs (3, 3, 3, 48) and (48,)'),
])
def test_weights_that_fit_no_width_are_refused_in_one_line(tmp_path, damage, why):
    path = vgg16_file(tmp_path / 'vgg16.npy', 1.0, **damage)
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    with pytest.raises(train_state.StateError) as e:
        train_state.load_imagenet(m, path, lambda line: None)
    assert str(e.value) == (f'{path}: not ImageNet VGG16 weights of any --width ({why}); expected the classic TF-VGG '
                            'vgg16.npy (see data/DATASET.md)')


def test_every_registered_stage_builds_its_state():
    cfg = config.resolve('x', {'grd_size': (32, 64), 'sat_size': 64, 'width': 0.0625})
    for name in stages.ORDER:
        stage = stages.get(name)
        state = train_state.TrainState(stage, cfg, 8, 2)
        assert set(state.optimizer.slots) == set(stage.train_parts)
        assert set(state.tables) == set(stage.tables)


def test_predecessor_architecture_check_covers_what_comes_across(tmp_path):
    """The covariance head's settings must match only when its weights are restored (E_3 from E_2_2)."""
    def fake_run(name, **settings):
        run_dir = tmp_path / name
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(run_dir / 'ckpt'), 1)
        manager.save()
        config.save(config.resolve(name, settings), str(run_dir / 'config.json'))
        return str(run_dir)
    e21 = fake_run('E_2_1', cholesky_scale=1.0)
    e22 = fake_run('E_2_2', cholesky_scale=1.0)
    ask = lambda stage, prev, **kw: train_state.check_predecessor(stages.get(stage), config.resolve(stage, kw), prev)
    assert ask('E_2_2', e21, cholesky_scale=16.0).endswith('ckpt-1')        # E_2_2's heads start fresh
    with pytest.raises(train_state.StateError, match=r'another architecture \(cholesky_scale: 1.0 there, 16.0 here\)'):
        ask('E_3', e22, cholesky_scale=16.0)
    with pytest.raises(train_state.StateError, match=r'another architecture \(width: 1.0 there, 0.5 here\)'):
        ask('E_2_2', e21, width=0.5)
