"""train_lib.py: the data splits a stage script loads (what it asks of a CVACT tree)."""
import numpy as np

import samples_on_cvact
import synthetic_data
import train_first_E_1
import train_lib


def test_cvact_tree_without_mpp_says_what_the_value_is_for(tmp_path, capsys):
    root = str(tmp_path / 'CVACT')
    synthetic_data.write_cvact(root, seed=0, n_panos=4, pano_hw=(32, 64))     # no marker: like a real tree
    argv = ['--dataset', 'cvact', '--data_root', root, '--run_dir', str(tmp_path / 'run')]
    capsys.readouterr()
    assert train_lib.main([train_first_E_1.PHASE_A], argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'error: {root}: --cvact_mpp is required on a CVACT tree: the metres per pixel of its 1200-px aerial '
        'images, which turn localisation errors from pixels into metres']


def test_synthetic_cvact_tree_knows_its_resolution(tmp_path):
    root = synthetic_data.ensure_cvact(str(tmp_path / 'CVACT'), n_panos=4, pano_hw=(32, 64))
    samples_on_cvact.resample(root, str(tmp_path / 'CVACT' / 'resampled'), seed=0, progress=False)
    cfg = train_lib.configs([train_first_E_1.PHASE_A], ['--dataset', 'cvact', '--data_root', root])[0]
    split = train_lib.dataset_splits(cfg, 'test')
    np.testing.assert_allclose(split.mpp, synthetic_data.CVACT_MPP_1200 * 600 / 640)
    cfg = cfg.replace(cvact_mpp=0.2)                                             # an explicit value wins
    np.testing.assert_allclose(train_lib.dataset_splits(cfg, 'test').mpp, 0.2 * 600 / 640)
