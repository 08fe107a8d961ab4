"""config.py: the precedence of flags, presets and defaults; validation; config.json."""
import json

import pytest

import config


def resolve(argv, **stage):
    explicit, preset, test = config.parse_flags(argv)
    return config.resolve('E_x', explicit, preset, stage.get('defaults'), stage.get('presets'), test)


def test_precedence_flag_over_preset_over_stage_over_global():
    stage = {'defaults': {'lr': 1e-6, 'epochs': 80, 'batch': 14}, 'presets': {'demo': {'epochs': 2}}}
    cfg = resolve([], **stage)
    assert (cfg.lr, cfg.epochs, cfg.batch, cfg.alpha) == (1e-6, 80, 14, 10.0)      # stage > global
    cfg = resolve(['--preset', 'demo'], **stage)
    assert (cfg.epochs, cfg.batch, cfg.width, cfg.grd_size) == (2, 10, 0.25, (64, 128))  # presets > stage
    cfg = resolve(['--preset', 'demo', '--epochs', '5', '--grd_size', '32', '64'], **stage)
    assert (cfg.epochs, cfg.grd_size, cfg.preset, cfg.stage) == (5, (32, 64), 'demo', 'E_x')   # flag > all


@pytest.mark.parametrize('argv,message', [
    (['--batch', '0'], '--batch 0: must be at least 2 (the triplet loss needs a negative in the batch)'),
    (['--batch', '1'], '--batch 1: must be at least 2 (the triplet loss needs a negative in the batch)'),
    (['--log_every', '0'], '--log_every 0: must be at least 1'),
    (['--seed', '-1'], '--seed -1: must be 0 or more'),
    (['--grd_size', '0', '0'], '--grd_size 0 0: both sides must be positive multiples of 32 (the trunk downsamples 32x)'),
    (['--grd_size', '64', '64'], '--grd_size 64 64: the width must be twice the height (a 360-degree panorama is '
                                 'read without distortion, H W = 320 640)'),
    (['--sat_size', '1'], '--sat_size 1: must be a positive multiple of 64 (the heatmap decoder of E_2 and E_3 '
                          'upsamples the 1x1 bottleneck by side / 64, and every stage uses one size)'),
    (['--sat_size', '96'], '--sat_size 96: must be a positive multiple of 64 (the heatmap decoder of E_2 and E_3 '
                           'upsamples the 1x1 bottleneck by side / 64, and every stage uses one size)'),
    (['--width', '0'], '--width 0.0: must be a positive number'),
    (['--eval_block', '0'], '--eval_block 0: must be at least 1'),
    (['--val_queries', '0'], '--val_queries 0: must be at least 1'),
    (['--epochs', '0'], '--epochs 0: must be at least 1'),
    (['--max_steps', '-1'], '--max_steps -1: must be 0 or more'),
    (['--lr', 'nan'], '--lr nan: must be a positive number'),
    (['--yaw', 'sideways'], "--yaw sideways: must be 'north', 'random' or a number of degrees"),
    (['--yaw', 'inf'], "--yaw inf: must be 'north', 'random' or a number of degrees"),
    (['--fov', '0'], '--fov 0.0: must be a number of degrees in (0, 360]'),
    (['--fov', '400'], '--fov 400.0: must be a number of degrees in (0, 360]'),
    (['--eval_seed', '-1'], '--eval_seed -1: must be 0 or more'),
    (['--mining_fill', '2'], '--mining_fill 2: must be 0 or 1'),
    (['--mining_topk', '200', '--mining_pool', '100'],
     '--mining_topk 200: must not exceed --mining_pool 100 (the hard tiles are the top of the pool)'),
    (['--dataset', 'cvact', '--labels', 'corrected'],
     '--labels corrected: applies to VIGOR only, not to --dataset cvact'),
    (['--area', 'cross', '--dataset', 'cvact'], '--area cross: applies to VIGOR only, not to --dataset cvact'),
    (['--cvact_mpp', '0.1'], '--cvact_mpp 0.1: applies to CVACT only, not to --dataset vigor'),
    (['--vgg_weights', '/nonexistent/vgg16.npy'], '--vgg_weights /nonexistent/vgg16.npy: not found (the default '
                                                  'path may be missing; a path given on the command line must exist)'),
])
def test_impossible_values_are_one_line_errors(argv, message):
    with pytest.raises(config.ConfigError) as e:
        resolve(argv)
    assert str(e.value) == message


def test_original_cholesky_means_no_floor_unless_one_is_given():
    assert resolve([]).cholesky_floor == 0.01
    assert resolve(['--cholesky', 'original']).cholesky_floor == 0.0
    assert resolve(['--cholesky', 'original', '--cholesky_floor', '0.01']).cholesky_floor == 0.01
    assert resolve(['--cholesky', 'port', '--cholesky_floor', '0.5']).cholesky_floor == 0.5
    assert 'phase b\'s learning-rate schedule restarts' in next(
        f.metadata['help'] for f in config.FLAGS if f.name == 'carry_optimizer')


def test_paths_of_the_wrong_kind(tmp_path):
    path = tmp_path / 'file'
    path.write_text('x')
    for flag in ('run_dir', 'init_from', 'test_dir', 'data_root', 'cvact_resampled'):
        with pytest.raises(config.ConfigError, match=f'--{flag} {path}: names a file, not a directory'):
            resolve([f'--{flag}', str(path)] + (['--dataset', 'cvact'] if flag == 'cvact_resampled' else []))
    with pytest.raises(config.ConfigError, match=f'--vgg_weights {tmp_path}: names a directory'):
        resolve(['--vgg_weights', str(tmp_path)])


def test_save_load_and_mismatch(tmp_path):
    cfg = resolve(['--grd_size', '32', '64'])
    path = str(tmp_path / 'run' / 'config.json')
    config.save(cfg, path)
    saved = config.load(path)
    assert saved['grd_size'] == (32, 64) and config.mismatch(saved, cfg) is None
    assert config.check_run_dir(cfg, path) == saved
    # volatile and extendable settings may change; run and model settings may not
    assert config.mismatch(saved, cfg.replace(log_every=3, epochs=9, max_steps=5)) is None
    assert config.mismatch(saved, cfg.replace(lr=0.1)) == ('lr', 1e-5, 0.1)
    with pytest.raises(config.ConfigError, match=r'another configuration \(width: 1.0 there, 0.5 now\)'):
        config.check_run_dir(cfg.replace(width=0.5), path)


def test_a_config_json_of_another_version_still_matches(tmp_path):
    """A key missing from config.json (written before the setting existed) counts as its default; a key the
    code does not know (written by a newer version) is not compared."""
    cfg = resolve(['--grd_size', '32', '64'])
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ('localiser', 'adam_eps', 'skip_norm')}
    saved['a_future_setting'] = 3
    assert config.mismatch(saved, cfg) is None
    assert config.mismatch(saved, cfg.replace(localiser='correlation')) == ('localiser', 'unet', 'correlation')
    assert config.model_settings(saved, cfg.replace(localiser='correlation')).localiser == 'unet'


def test_a_run_made_before_mining_fill_existed_resumes_with_the_behaviour_it_had():
    """Runs written before --mining_fill filled the round's missing descriptors: a config.json without the key
    compares as --mining_fill 1, so a resume under today's default is refused rather than silently switched."""
    cfg = resolve([])
    assert cfg.mining_fill == 0
    saved = {k: v for k, v in cfg.to_dict().items() if k != 'mining_fill'}
    assert config.mismatch(saved, cfg) == ('mining_fill', 1, 0)
    assert config.mismatch(saved, cfg.replace(mining_fill=1)) is None
    assert config.mismatch(dict(saved, mining_fill=0), cfg) is None


def test_settings_of_parts_a_stage_does_not_restore():
    # E_2_1 restores the trunks only: the decoders' and covariance heads' settings of its predecessor do not matter
    other = config.settings_of_other_parts(('grd_trunk', 'sat_trunk', 'grd_safa', 'sat_safa'))
    assert {'localiser', 'skip_norm', 'correlation_dim', 'cholesky', 'cholesky_scale'} <= set(other)
    assert 'width' not in other and 'grd_size' not in other
    assert 'localiser' not in config.settings_of_other_parts(('pos_decoder',))
    assert 'cholesky_scale' not in config.settings_of_other_parts(('pos_cholesky', 'grd_trunk'))


@pytest.mark.parametrize('content', ['', '{"lr": ', '[1, 2]', '\xff\xfe'])
def test_unreadable_config_json(tmp_path, content):
    path = tmp_path / 'config.json'
    path.write_bytes(content.encode('latin1'))
    with pytest.raises(config.ConfigError, match='unreadable run configuration'):
        config.load(str(path))


def test_every_flag_has_a_kind_and_help():
    assert {f.metadata['kind'] for f in config.FLAGS} <= {'model', 'run', 'extend', 'volatile'}
    assert all(f.metadata['help'] for f in config.FLAGS)
    assert json.loads(json.dumps(resolve([]).to_dict()))['mining_pool'] == 10000
