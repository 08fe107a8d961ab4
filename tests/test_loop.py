"""loop.py: the shared training loop — a stage defined here trains with no edit to the shared code; a
non-finite step stops the run and keeps the last good checkpoint; the same seed gives the same losses;
what a run logs to TensorBoard."""
import dataclasses
import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY, tensorboard_events

from geoloc.data import geometry
import losses
import model
from geoloc.data import pipeline
import stages
import train_first_E_1
from geoloc import cli
from geoloc.train import train_state


def scalars(run_dir):
    """tag -> {step: value} of a run's TensorBoard scalars, and the tags of its other summaries (images)."""
    values, others = {}, set()
    for step, tag, value in tensorboard_events(run_dir):
        if value.ndim == 0:
            values.setdefault(tag, {})[step] = float(value)
        else:
            others.add(tag)
    return values, others


# ----------------------------------------------------------------------------- a new stage

def toy_loss(m, emb, batch, ctx):
    """A stage that exists only here: the triplet loss plus a pull of the raw ground descriptor's norm."""
    ctx.report('grd_norm', tf.norm(emb['grd_raw'], axis=-1))
    return {'triplet': losses.batch_triplet_loss(emb, ctx.cfg.alpha),
            'norm_pull': 1e-6 * tf.reduce_mean(tf.norm(emb['grd_raw'], axis=-1))}


TOY = stages.Stage(name='toy', parts=model.RETRIEVAL_PARTS, train_parts=('grd_trunk', 'grd_safa'), loss=toy_loss,
                   uses_semi=False, script='tests/test_loop.py', defaults={'lr': 1e-4, 'mining': 0})


def test_a_stage_defined_in_a_test_trains_two_steps(tiny_vigor, tmp_path):
    run_dir = str(tmp_path / 'toy')
    argv = TINY + ['--data_root', tiny_vigor(3), '--run_dir', run_dir, '--max_steps', '2']
    assert cli.main([TOY], argv) == 0
    ckpt = train_state.latest_checkpoint(run_dir)
    assert ckpt.endswith('ckpt-2')
    values, _ = scalars(run_dir)
    assert sorted(values['loss/total']) == [1, 2] and {'loss/triplet', 'loss/norm_pull', 'diagnostics/grd_norm'} <= set(values)
    np.testing.assert_allclose(values['loss/total'][1], values['loss/triplet'][1] + values['loss/norm_pull'][1],
                               rtol=1e-5)
    # only the parts it trains moved
    saved = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    tf.train.Checkpoint(model=saved).read(ckpt).expect_partial().assert_existing_objects_matched()
    fresh = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    moved = lambda part: not all(np.array_equal(a.numpy(), b.numpy()) for a, b in
                                 zip(getattr(saved, part).variables, getattr(fresh, part).variables))
    assert moved('grd_trunk') and moved('grd_safa') and not moved('sat_trunk') and not moved('sat_safa')


# ----------------------------------------------------------------------------- non-finite steps

def poison_third_batch(monkeypatch):
    """train_dataset's third batch (step 3 of a fresh run) gets a NaN delta."""
    real = pipeline.train_dataset

    def poisoned(*args, **kwargs):
        def poison(i, batch):
            return dict(batch, delta=tf.where(i == 2, tf.fill(tf.shape(batch['delta']), np.nan), batch['delta']))
        return real(*args, **kwargs).enumerate().map(poison)
    monkeypatch.setattr(pipeline, 'train_dataset', poisoned)


def nan_loss(m, emb, batch, ctx):        # phase a's loss, NaN when the batch's delta is
    return {'triplet': train_first_E_1.loss_a(m, emb, batch, ctx)['triplet'] + 0.0 * tf.reduce_mean(batch['delta'])}


def nan_gradient(m, emb, batch, ctx):    # phase a's loss, finite, with NaN gradients when the batch's delta is NaN
    total = train_first_E_1.loss_a(m, emb, batch, ctx)['triplet']
    poisoned = tf.math.is_nan(tf.reduce_mean(batch['delta']))

    @tf.custom_gradient
    def nan_grad(x):
        return tf.identity(x), lambda dy: dy * tf.where(poisoned, np.nan, 1.0)
    return {'triplet': nan_grad(total)}


@pytest.mark.parametrize('loss', [nan_loss, nan_gradient], ids=['loss', 'gradient'])
def test_non_finite_step_stops_and_keeps_last_good_checkpoint(tiny_vigor, tmp_path, monkeypatch, capsys, loss):
    poison_third_batch(monkeypatch)
    stage = dataclasses.replace(train_first_E_1.PHASE_A, loss=loss)
    argv = TINY + ['--epochs', '1', '--ckpt_every', '2', '--mining', '0', '--data_root', tiny_vigor(3),
                   '--run_dir', str(tmp_path)]
    assert cli.main([stage], argv) == 2
    ckpt = os.path.join(str(tmp_path), 'phase_a', 'ckpt', 'ckpt-2')
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith('error: non-finite loss or gradient at step 3 (loss ' + ('nan' if loss is nan_loss else '0.'))
    assert err[0].endswith(f'last good checkpoint: {ckpt}')
    assert train_state.latest_checkpoint(os.path.join(str(tmp_path), 'phase_a')) == ckpt
    reader = tf.train.load_checkpoint(ckpt)
    assert int(reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')) == 2
    weights = [reader.get_tensor(name) for name, _ in tf.train.list_variables(ckpt) if name.startswith('model/')]
    assert all(np.all(np.isfinite(w)) for w in weights)


# ----------------------------------------------------------------------------- determinism and logging

@pytest.fixture(scope='module')
def two_runs(tiny_vigor, tmp_path_factory):
    """Two runs of the same command: 20 steps = two mining rounds and 2 epochs of half-mined batches, with a
    validation at the end."""
    dirs = []
    for name in ('first', 'second'):
        run_dir = str(tmp_path_factory.mktemp('determinism') / name)
        argv = TINY + ['--epochs', '3', '--max_steps', '20', '--ckpt_every', '100', '--data_root', tiny_vigor(3),
                       '--run_dir', run_dir, '--val_every', '3', '--val_queries', '8']
        assert cli.main([train_first_E_1.PHASE_A], argv) == 0
        dirs.append(os.path.join(run_dir, 'phase_a'))
    return dirs


def test_same_seed_same_losses(two_runs):
    first, second = (scalars(d)[0]['loss/total'] for d in two_runs)
    assert sorted(first) == list(range(1, 21))
    assert [first[s] for s in range(1, 21)] == [second[s] for s in range(1, 21)]   # bit for bit
    assert len(set(first.values())) > 10


def test_tensorboard_scalars_and_validation_figures(two_runs):
    values, others = scalars(two_runs[0])
    assert {'loss/total', 'loss/triplet', 'learning_rate', 'steps_per_second', 'val/R@1', 'val/R@10'} <= set(values)
    assert sorted(values['val/R@1']) == [20]           # the last step validates (20 = max_steps, inside epoch 3)
    assert any(t.startswith('val/localisation') for t in others), others
    # validation writes no files of its own: no PNG, no descriptor dump
    assert not glob.glob(os.path.join(two_runs[0], '**', '*.png'), recursive=True)
    assert not glob.glob(os.path.join(two_runs[0], '**', '*.npy'), recursive=True)


def test_an_epoch_is_the_released_codes_in_every_stage():
    """floor(N / 14) steps in every stage by default, batch 10 included (3,757 at same-area VIGOR's 52,605
    training panoramas); --epoch_batch 0 gives the per-batch epoch."""
    import config
    from geoloc.train import loop
    for name in stages.ORDER:
        stage = stages.get(name)
        cfg = config.resolve(name, {}, 'paper', stage.defaults, stage.presets, own=stage.settings)
        assert loop.steps_per_epoch(cfg, 52605) == 3757, name
        assert loop.steps_per_epoch(cfg.replace(epoch_batch=0), 52605) == 52605 // cfg.batch
    e3 = stages.get('E_3')
    cfg = config.resolve('E_3', {}, 'paper', e3.defaults, own=e3.settings)
    state = train_state.TrainState(e3, cfg.replace(grd_size=(32, 64), sat_size=64, width=0.0625), 52605,
                                   loop.steps_per_epoch(cfg, 52605))
    # E_3: lr 1e-6 x 0.9^(step / 3757), continuous
    assert float(state.optimizer.learning_rate(3757 // 2)) == pytest.approx(1e-6 * 0.9 ** ((3757 // 2) / 3757), rel=1e-5)


def test_validation_follows_the_released_cadence_by_default():
    """Every epoch in E_1 (both phases), every 10th (1-based, the released `epoch % 10 == 0`) in E_2_1, E_2_2 and
    E_3, and at a run's last step; --val_every overrides the stage's default, 0 never validates."""
    import config
    from geoloc.train import loop
    spe = 7
    for name, every in (('E_1a', 1), ('E_1', 1), ('E_2_1', 10), ('E_2_2', 10), ('E_3', 10)):
        stage = stages.get(name)
        cfg = config.resolve(name, {}, 'paper', stage.defaults, stage.presets, own=stage.settings)
        assert cfg.val_every == every, name
        total = cfg.epochs * spe
        due = [s for s in range(1, total + 1) if loop.validation_due(cfg, s, spe, total)]
        assert due == [e * spe for e in range(every, cfg.epochs + 1, every)] + (
            [] if cfg.epochs % every == 0 else [total]), name
        cfg = config.resolve(name, {'val_every': 3}, 'paper', stage.defaults, stage.presets, own=stage.settings)
        assert [s for s in range(1, 23) if loop.validation_due(cfg, s, spe, 22)] == [21, 22], name
        cfg = config.resolve(name, {'val_every': 0}, 'paper', stage.defaults, stage.presets, own=stage.settings)
        assert not any(loop.validation_due(cfg, s, spe, total) for s in range(1, total + 1)), name
    # inside an epoch only the run's last step validates (a --max_steps run)
    cfg = config.resolve('E_2_1', {}, 'paper', stages.get('E_2_1').defaults)
    assert [s for s in range(1, 76) if loop.validation_due(cfg, s, spe, 75)] == [70, 75]


# ----------------------------------------------------------------------------- the validation's diagnostics

def grd_norm_loss(m, emb, batch, ctx):
    """Reaches the ground SAFA, never the aerial one."""
    return {'grd_norm': tf.reduce_mean(tf.norm(emb['grd_raw'], axis=-1))}


def test_gradient_probe_gives_the_rms_of_the_steps_gradient_and_names_a_dead_part(tiny_vigor):
    """The probe's RMS equals one computed by hand with a tape; a trained part the loss never reaches reports
    exactly 0 and is the one named as barely training; the probe applies nothing."""
    from geoloc.train import loop
    stage = stages.Stage(name='probe', parts=model.RETRIEVAL_PARTS, train_parts=('grd_safa', 'sat_safa'),
                         loss=grd_norm_loss, uses_semi=False, script='tests/test_loop.py')
    cfg = cli.configs([stage], TINY + ['--data_root', tiny_vigor(3)])[0]
    state = train_state.TrainState(stage, cfg, 4, 1)
    batch = {'grd': tf.random.stateless_normal([4, 32, 64, 3], seed=(3, 1)) * 50,
             'sat': tf.random.stateless_normal([4, 64, 64, 3], seed=(3, 2)) * 50,
             'pano': tf.range(4, dtype=tf.int64), 'sat_idx': tf.range(4, dtype=tf.int64)}
    before = [v.numpy() for v in state.model.trainable_variables]
    rms = {p: float(v) for p, v in loop.make_gradient_probe(state, stage, cfg)(batch).items()}
    assert sorted(rms) == ['grd_safa', 'sat_safa']
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(tf.norm(state.model.embed_grd(batch['grd']), axis=-1))
    grads = tape.gradient(value, state.model.grd_safa.trainable_variables)
    by_hand = np.sqrt(sum(float(tf.reduce_sum(g ** 2)) for g in grads) / sum(int(np.prod(g.shape)) for g in grads))
    assert by_hand > 1e-3 and rms['grd_safa'] == pytest.approx(by_hand, rel=1e-4)
    assert rms['sat_safa'] == 0.0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, state.model.trainable_variables))
    assert int(state.optimizer.updates.numpy()) == 0
    lines = loop.gradient_report(rms, state.optimizer.eps)
    assert lines[0].startswith('gradient RMS on the last training batch (not applied): grd_safa ')
    assert lines[1] == "these parts barely train (gradient RMS below 10 x Adam's eps 1e-08): sat_safa"
    assert loop.gradient_report({'grd_safa': 1e-6}, 1e-8) == [
        "gradient RMS on the last training batch (not applied): grd_safa 1e-06 (100 x eps)"]


def heatmap_toy_loss(m, emb, batch, ctx):
    """The triplet loss and the positive heatmap's loss; the semi-positive branch is built but never used."""
    pos = m.localise('pos', emb['sat_raw'], emb['grd_raw'], emb['sat_skips'])
    return {'triplet': losses.batch_triplet_loss(emb, ctx.cfg.alpha),
            'heatmap_pos': losses.heatmap_loss(pos['mu'], geometry.delta_to_rc(batch['delta']))}


HEATMAP_TOY = stages.Stage(name='heatmap_toy', parts=model.RETRIEVAL_PARTS + model.HEATMAP_PARTS,
                           train_parts=('grd_safa', 'pos_fusion', 'pos_decoder', 'semi_fusion'), loss=heatmap_toy_loss,
                           uses_semi=False, script='tests/test_loop.py', defaults={'lr': 1e-4, 'mining': 0})


def test_validation_logs_ground_dependence_and_gradient_rms(tiny_vigor, tmp_path):
    run_dir = str(tmp_path / 'heatmap_toy')
    argv = TINY + ['--data_root', tiny_vigor(3), '--run_dir', run_dir, '--max_steps', '2', '--val_every', '1',
                   '--val_queries', '8']
    assert cli.main([HEATMAP_TOY], argv) == 0
    values, _ = scalars(run_dir)
    for branch in ('pos', 'semi'):
        for tag in ('swap_shift_px', 'swap_shift_px_mean', 'swap_shift_px_p90', 'heatmap_swap_change'):
            assert sorted(values[f'ground/{branch}_{tag}']) == [2], (branch, tag)
            assert values[f'ground/{branch}_{tag}'][2] >= 0
    for part in HEATMAP_TOY.train_parts:
        assert sorted(values[f'grad_rms/{part}']) == [2]
        assert values[f'grad_rms_over_eps/{part}'][2] == pytest.approx(values[f'grad_rms/{part}'][2] / 1e-8, rel=1e-5)
    assert values['grad_rms/semi_fusion'][2] == 0.0 and values['grad_rms/grd_safa'][2] > 0
    assert not any(tag.startswith('grad_rms/') and tag.split('/')[1] not in HEATMAP_TOY.train_parts for tag in values)
    log = open(os.path.join(run_dir, 'train.log')).read()
    weak = next(line for line in log.splitlines() if 'these parts barely train' in line)
    assert 'semi_fusion' in weak.split(': ')[-1].split(', ') and 'grd_safa' not in weak
    assert 'validation at step 2: ground dependence (each panorama swapped' in log


def test_a_run_whose_config_json_is_of_another_version_resumes_and_extends(tiny_vigor, tmp_path):
    """config.json without settings this version added (they count as their defaults) and with one a newer
    version added (logged and ignored): the run extends instead of refusing 'another configuration'."""
    import json
    run_dir = str(tmp_path / 'run')
    argv = TINY + ['--data_root', tiny_vigor(3), '--run_dir', run_dir, '--max_steps', '2', '--mining', '0']
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0
    path = os.path.join(run_dir, 'phase_a', 'config.json')
    saved = json.load(open(path))
    for key in ('adam_eps', 'localiser', 'skip_norm'):
        del saved[key]
    saved['a_future_setting'] = 3
    json.dump(saved, open(path, 'w'))
    assert cli.main([train_first_E_1.PHASE_A], argv[:-4] + ['--max_steps', '3', '--mining', '0']) == 0
    log = open(os.path.join(run_dir, 'phase_a', 'train.log')).read()
    assert "settings this stage does not read (a newer version's, or another stage's), ignored: a_future_setting" in log
    assert 'extending the run' in log
    assert train_state.latest_checkpoint(os.path.join(run_dir, 'phase_a')).endswith('ckpt-3')


def test_validation_against_a_fixed_reference_subset(tiny_vigor, tmp_path):
    """--val_refs N: each validation ranks its queries against the same N tiles (their positives and
    semi-positives first), said in the log; the recall is that of a smaller reference set, not --test's."""
    run_dir = str(tmp_path / 'refs')
    argv = TINY + ['--data_root', tiny_vigor(3), '--run_dir', run_dir, '--epochs', '2', '--val_every', '1',
                   '--val_queries', '4', '--val_refs', '12', '--mining', '0']
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0
    log = open(os.path.join(run_dir, 'phase_a', 'train.log')).read()
    lines = [line for line in log.splitlines() if 'validation at step' in line and 'R@1' in line]
    assert len(lines) >= 2 and all(line.endswith('(against 12 reference tiles, --val_refs)') for line in lines)
