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
    (['--batch', '0'], '--batch 0: must be at least 1'),
    (['--log_every', '0'], '--log_every 0: must be at least 1'),
    (['--seed', '-1'], '--seed -1: must be 0 or more'),
    (['--grd_size', '0', '0'], '--grd_size 0 0: both sides must be positive multiples of 32 (the trunk downsamples 32x)'),
    (['--sat_size', '1'], '--sat_size 1: must be a positive multiple of 32'),
    (['--width', '0'], '--width 0.0: must be a positive number'),
    (['--eval_block', '0'], '--eval_block 0: must be at least 1'),
    (['--max_steps', '-1'], '--max_steps -1: must be 0 or more'),
    (['--lr', 'nan'], '--lr nan: must be a positive number'),
    (['--yaw', 'sideways'], "--yaw sideways: must be 'north', 'random' or a number of degrees"),
    (['--yaw', 'inf'], "--yaw inf: must be 'north', 'random' or a number of degrees"),
    (['--fov', '0'], '--fov 0.0: must be a number of degrees in (0, 360]'),
    (['--fov', '400'], '--fov 400.0: must be a number of degrees in (0, 360]'),
    (['--eval_seed', '-1'], '--eval_seed -1: must be 0 or more'),
])
def test_impossible_values_are_one_line_errors(argv, message):
    with pytest.raises(config.ConfigError) as e:
        resolve(argv)
    assert str(e.value) == message


def test_run_dir_naming_a_file(tmp_path):
    path = tmp_path / 'file'
    path.write_text('x')
    for flag in ('--run_dir', '--test_dir'):
        with pytest.raises(config.ConfigError, match='names a file, not a directory'):
            resolve([flag, str(path)])


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
