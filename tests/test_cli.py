"""cli.py: the data splits a stage script loads (what it asks of a CVACT tree); the configurations a
script's command line gives its stages (a stage's own flags, settings inherited from the predecessor)."""
import os

import numpy as np
import pytest

import config
import samples_on_cvact
from tools import synthetic_data
import train_first_E_1
from geoloc import cli
import train_third_E_3


def test_cvact_tree_without_mpp_says_what_the_value_is_for(tmp_path, capsys):
    root = str(tmp_path / 'CVACT')
    synthetic_data.write_cvact(root, seed=0, n_panos=4, pano_hw=(32, 64))     # no marker: like a real tree
    argv = ['--dataset', 'cvact', '--data_root', root, '--run_dir', str(tmp_path / 'run')]
    capsys.readouterr()
    assert cli.main([train_first_E_1.PHASE_A], argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'error: {root}: --cvact_mpp is required on a CVACT tree: the metres per pixel of its 1200-px aerial '
        'images, which turn localisation errors from pixels into metres']


def test_synthetic_cvact_tree_knows_its_resolution(tmp_path):
    root = synthetic_data.ensure_cvact(str(tmp_path / 'CVACT'), n_panos=4, pano_hw=(32, 64))
    samples_on_cvact.resample(root, str(tmp_path / 'CVACT' / 'resampled'), seed=0, progress=False)
    cfg = cli.configs([train_first_E_1.PHASE_A], ['--dataset', 'cvact', '--data_root', root])[0]
    split = cli.dataset_splits(cfg, 'test')
    np.testing.assert_allclose(split.mpp, synthetic_data.CVACT_MPP_1200 * 600 / 640)
    cfg = cfg.replace(cvact_mpp=0.2)                                             # an explicit value wins
    np.testing.assert_allclose(cli.dataset_splits(cfg, 'test').mpp, 0.2 * 600 / 640)


def test_e1_phases_take_their_own_lengths():
    """--epochs and --max_steps set both phases; --epochs_a and --max_steps_a set phase a's over them (the
    released cross-area recipe: 11 + 10 epochs)."""
    E_1 = train_first_E_1.STAGES
    lengths = lambda argv: [(c.stage, c.epochs, c.max_steps) for c in cli.configs(E_1, argv)]
    assert lengths([]) == [('E_1a', 30, 0), ('E_1', 15, 0)]
    assert lengths(['--epochs', '4']) == [('E_1a', 4, 0), ('E_1', 4, 0)]
    assert lengths(['--epochs_a', '11', '--epochs', '10']) == [('E_1a', 11, 0), ('E_1', 10, 0)]
    assert lengths(['--epochs_a', '11']) == [('E_1a', 11, 0), ('E_1', 15, 0)]
    assert lengths(['--max_steps', '7', '--max_steps_a', '3']) == [('E_1a', 30, 3), ('E_1', 15, 7)]
    assert lengths(['--preset', 'demo', '--epochs_a', '2']) == [('E_1a', 2, 0), ('E_1', 3, 0)]
    with pytest.raises(config.ConfigError) as e:
        cli.configs(E_1, ['--epochs_a', '0'])
    assert str(e.value) == '--epochs_a 0: must be at least 1'
    with pytest.raises(SystemExit):            # a flag of another script's stage
        cli.configs([train_third_E_3.STAGE], ['--epochs_a', '3'])


def write_config(run_dir, stage, **settings):
    config.save(config.resolve(stage, settings), os.path.join(run_dir, 'config.json'))


def test_e3_takes_e2_2s_nll(tmp_path):
    """E_3 reads E_2_2's u on the scale of the NLL it trained with: without --nll it takes E_2_2's from its
    config.json; a different --nll is refused in one line; a resumed E_3 keeps its own."""
    e22, e3 = str(tmp_path / 'E_2_2'), str(tmp_path / 'E_3')
    write_config(e22, 'E_2_2', nll='original')
    stage = [train_third_E_3.STAGE]
    argv = ['--init_from', e22, '--run_dir', e3]
    assert cli.configs(stage, argv)[0].nll == 'original'
    assert cli.configs(stage, argv + ['--nll', 'original'])[0].nll == 'original'
    with pytest.raises(config.ConfigError) as e:
        cli.configs(stage, argv + ['--nll', 'corrected'])
    assert str(e.value) == (f'--nll corrected: E_2_2 in {e22} was trained with --nll original (its config.json), and '
                            'E_3 reads its outputs with that setting; leave --nll out or pass --nll original')
    write_config(e3, 'E_3', nll='original')
    write_config(e22, 'E_2_2', nll='corrected')                 # E_2_2 trained again since: E_3 keeps its record
    assert cli.configs(stage, argv)[0].nll == 'original'
    # no E_2_2 record (a copied checkpoint): the flag or the default, as resolved
    assert cli.configs(stage, ['--init_from', str(tmp_path / 'none')])[0].nll == 'corrected'
    assert cli.configs(stage, ['--init_from', str(tmp_path / 'none'), '--nll', 'original'])[0].nll == 'original'


def test_e3_refuses_a_different_nll_before_it_writes_anything(tmp_path, capsys):
    e22, e3 = str(tmp_path / 'E_2_2'), str(tmp_path / 'E_3')
    write_config(e22, 'E_2_2', nll='original')
    capsys.readouterr()
    assert cli.main([train_third_E_3.STAGE], ['--init_from', e22, '--run_dir', e3, '--nll', 'corrected']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --nll corrected: E_2_2 in ')
    assert not os.path.exists(e3)


def test_help_shows_the_stages_own_defaults(capsys):
    """--help gives each setting's default as the script's stages set it (the paper's values), not the global
    one: one value when its stages agree, each stage's when they differ."""
    with pytest.raises(SystemExit):
        cli.configs(train_first_E_1.STAGES, ['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '(default 14 in E_1a, 10 in E_1)' in text and '(default 30 in E_1a, 15 in E_1)' in text
    with pytest.raises(SystemExit):
        cli.configs(train_third_E_3.STAGES, ['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'learning rate (default 1e-06)' in text and '(default 0.3)' in text     # E_3's lr; its own --u_a
