"""Bad input: each case stops the stage script with one line `error: <file>[:<line>]: <what>` on stderr and
exit status 2, and leaves an existing run directory as it was.

Most cases call the stage scripts' `train_lib.main` in-process (what `python train_*.py` runs, without
TensorFlow's start-up per case); `test_truncated_jpeg_through_the_shell` runs the real command line.
"""
import hashlib
import os
import shutil
import subprocess
import sys

import cv2
import pytest

import input_data
import train_first_E_1
import train_lib
import train_second_E_2_1
import train_second_E_2_2
import train_third_E_3
import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--grd_size', '32', '64', '--sat_size', '64', '--width', '0.0625', '--batch', '4', '--epochs', '1',
        '--max_steps', '1', '--val_every', '0', '--mining', '0']
E_1 = [train_first_E_1.PHASE_A, train_first_E_1.PHASE_B]


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(3)


@pytest.fixture(scope='module')
def e1_run(vigor, tmp_path_factory):
    """One tiny trained E_1 run directory (1 step per phase), shared by the checkpoint cases."""
    run_dir = str(tmp_path_factory.mktemp('e1') / 'E_1')
    assert train_lib.main(E_1, TINY + ['--data_root', vigor, '--run_dir', run_dir]) == 0
    return run_dir


def fails(stages, argv, capsys):
    """Run a stage script's main; -> its one error line (after checking status 2 and nothing else on stderr)."""
    capsys.readouterr()
    assert train_lib.main(stages, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def train_e1(data, run_dir, capsys, *extra):
    return fails(E_1, TINY + ['--data_root', data, '--run_dir', run_dir] + list(extra), capsys)


def snapshot(run_dir):
    """path -> sha1 of every file under run_dir."""
    out = {}
    for folder, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                out[path] = hashlib.sha1(f.read()).hexdigest()
    return out


def assert_untouched(before, run_dir):
    after = snapshot(run_dir)
    for path, digest in before.items():
        if os.path.basename(path) != 'train.log':    # the log only grows
            assert after.get(path) == digest, f'{path} changed'


def first_batch_files(root):
    """(panorama, positive tile) of the first item of the first training batch (seed 0, batch 4)."""
    split = input_data.load_vigor(root, 'train')
    p = input_data.BatchSampler(split, 4, 0).epoch_plan(0)[0][0, 0]
    return split.pano_paths[p], split.tile_paths[split.tiles[p, 0]]


def split_file(root, city='NewYork'):
    return os.path.join(root, 'splits', city, 'same_area_balanced_train.txt')


def edit_lines(path, edit):
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, 'w') as f:
        f.write('\n'.join(edit(lines)) + '\n')


# ----------------------------------------------------------------------------- dataset files

def test_missing_dataset_root(tmp_path, capsys):
    err = train_e1(str(tmp_path / 'nowhere'), str(tmp_path / 'run'), capsys)
    assert err == f'error: {tmp_path / "nowhere"}: VIGOR dataset root not found (see data/DATASET.md)'
    assert not os.path.exists(tmp_path / 'run' / 'phase_a' / 'config.json')


def test_missing_split_file(vigor_copy, tmp_path, capsys):
    os.remove(split_file(vigor_copy, 'Seattle'))
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {split_file(vigor_copy, "Seattle")}: split file not found'


def test_label_line_without_13_tokens(vigor_copy, tmp_path, capsys):
    edit_lines(split_file(vigor_copy), lambda lines: lines[:1] + [' '.join(lines[1].split()[:12])] + lines[2:])
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err.startswith(f'error: {split_file(vigor_copy)}:2: expected 13 space-separated tokens')
    assert err.endswith('got 12')


def test_label_names_a_tile_not_in_satellite_list(vigor_copy, tmp_path, capsys):
    def rename_positive(lines):
        tok = lines[2].split()
        tok[1] = 'satellite_1.0_2.0.png'
        return lines[:2] + [' '.join(tok)] + lines[3:]
    edit_lines(split_file(vigor_copy), rename_positive)
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err.startswith(f'error: {split_file(vigor_copy)}:3: tile satellite_1.0_2.0.png is not in satellite_list.txt')


def test_empty_split(vigor_copy, tmp_path, capsys):
    open(split_file(vigor_copy, 'Chicago'), 'w').close()
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {split_file(vigor_copy, "Chicago")}: split file is empty'


def test_duplicate_panorama_in_a_split(vigor_copy, tmp_path, capsys):
    edit_lines(split_file(vigor_copy), lambda lines: lines + [lines[0]])
    n = len(open(split_file(vigor_copy)).read().splitlines())
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err.startswith(f'error: {split_file(vigor_copy)}:{n}: panorama ')
    assert err.endswith('listed twice (first at line 1)')


# ----------------------------------------------------------------------------- images

def test_unreadable_image(vigor_copy, tmp_path, capsys):
    pano, _ = first_batch_files(vigor_copy)
    with open(pano, 'wb') as f:
        f.write(b'<html>not a picture</html>')
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {pano}: unreadable image (missing, corrupt or not JPEG/PNG)'
    assert not os.path.exists(tmp_path / 'run' / 'phase_a' / 'ckpt')


def test_empty_image_file(vigor_copy, tmp_path, capsys):
    pano, _ = first_batch_files(vigor_copy)
    open(pano, 'wb').close()
    assert train_e1(vigor_copy, str(tmp_path / 'run'), capsys) == f'error: {pano}: unreadable image (empty file)'


def test_truncated_png(vigor_copy, tmp_path, capsys):
    _, tile = first_batch_files(vigor_copy)
    data = open(tile, 'rb').read()
    open(tile, 'wb').write(data[:len(data) // 2])
    assert train_e1(vigor_copy, str(tmp_path / 'run'), capsys) == f'error: {tile}: truncated PNG (no IEND chunk)'


def test_corrupt_png(vigor_copy, tmp_path, capsys):
    _, tile = first_batch_files(vigor_copy)
    data = bytearray(open(tile, 'rb').read())
    data[100:300] = bytes(200)                      # zeros inside the compressed pixels; IEND intact
    open(tile, 'wb').write(bytes(data))
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {tile}: unreadable image (missing, corrupt or not JPEG/PNG)'


def test_grayscale_image(vigor_copy, tmp_path, capsys):
    _, tile = first_batch_files(vigor_copy)
    cv2.imwrite(tile, cv2.cvtColor(cv2.imread(tile), cv2.COLOR_BGR2GRAY))
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {tile}: expected a 3-channel colour aerial, got a grayscale image'


def test_wrong_size_image(vigor_copy, tmp_path, capsys):
    pano, _ = first_batch_files(vigor_copy)
    cv2.imwrite(pano, cv2.imread(pano)[:, :40])     # 40x32: not a 2:1 panorama
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == (f'error: {pano}: wrong size: expected a 360-degree panorama with width = 2 x height, '
                   'got 40x32')


def test_truncated_jpeg_through_the_shell(vigor_copy, tmp_path):
    """The real command, with TensorFlow's own logging left at the script's default: one stderr line."""
    pano, _ = first_batch_files(vigor_copy)
    data = open(pano, 'rb').read()
    open(pano, 'wb').write(data[:len(data) // 2])   # OpenCV alone would decode this with grey rows
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
    proc = subprocess.run([sys.executable, 'train_first_E_1.py'] + TINY +
                          ['--data_root', vigor_copy, '--run_dir', str(tmp_path / 'run')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'error: {pano}: truncated JPEG (no end-of-image marker)']


# ----------------------------------------------------------------------------- checkpoints and run directories

def test_init_from_another_stage(vigor, e1_run, tmp_path, capsys):
    err = fails([train_second_E_2_2.STAGE], TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_2_2'),
                                                    '--init_from', e1_run], capsys)
    assert err == f'error: {e1_run}: holds a E_1 checkpoint, E_2_2 starts from E_2_1'
    phase_a = os.path.join(e1_run, 'phase_a')
    err = fails([train_third_E_3.STAGE], TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_3'),
                                                 '--init_from', phase_a], capsys)
    assert err == f'error: {phase_a}: holds a E_1a checkpoint, E_3 starts from E_2_2'


def test_init_from_another_architecture(vigor, e1_run, tmp_path, capsys):
    argv = TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_2_1'), '--init_from', e1_run, '--width', '0.125']
    err = fails([train_second_E_2_1.STAGE], argv, capsys)
    assert err == f'error: {e1_run}: checkpoint of another architecture (width: 0.0625 there, 0.125 here)'


def test_init_from_checkpoint_without_config_of_another_architecture(vigor, e1_run, tmp_path, capsys):
    """Without the config.json that says so, the shapes give it away."""
    prev = str(tmp_path / 'E_1')
    shutil.copytree(os.path.join(e1_run, 'ckpt'), os.path.join(prev, 'ckpt'))
    argv = TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_2_1'), '--init_from', prev, '--width', '0.125']
    err = fails([train_second_E_2_1.STAGE], argv, capsys)
    assert err.startswith(f'error: {train_state.latest_checkpoint(prev)}: checkpoint of another architecture')


def test_run_dir_of_another_configuration_is_refused_and_untouched(vigor, e1_run, capsys):
    before = snapshot(e1_run)
    err = train_e1(vigor, e1_run, capsys, '--lr', '0.001')
    config = os.path.join(e1_run, 'phase_a', 'config.json')
    assert err == (f'error: {config}: this run directory holds another configuration (lr: 1e-05 there, 0.001 now); '
                   'use another --run_dir or the same flags')
    assert_untouched(before, e1_run)


def test_failed_restart_leaves_the_run_untouched(vigor_copy, e1_run, tmp_path, capsys):
    """A run killed before phase b's first checkpoint, restarted with the same flags on a dataset that now has
    a bad panorama (and another --data_root): it fails, and its config and checkpoints stay as they were."""
    run_dir = str(tmp_path / 'E_1')
    shutil.copytree(e1_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, 'ckpt'))
    pano, _ = first_batch_files(vigor_copy)
    open(pano, 'wb').close()
    before = snapshot(run_dir)
    assert train_e1(vigor_copy, run_dir, capsys) == f'error: {pano}: unreadable image (empty file)'
    assert_untouched(before, run_dir)
    assert not os.path.exists(os.path.join(run_dir, 'ckpt', 'checkpoint'))


def test_unknown_flag_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_lib.main(E_1, ['--dataset', 'vigr', '--run_dir', str(tmp_path / 'run')])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('usage: ') and "argument --dataset: invalid choice: 'vigr'" in err
    assert not os.path.exists(tmp_path / 'run')
