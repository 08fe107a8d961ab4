"""Bad input: each case stops the stage script with one line `error: <file>[:<line>]: <what>` on stderr and
exit status 2, and leaves an existing run directory as it was. Also what the scripts accept on purpose
(a byte-order mark, corrected labels' out-of-tile semi-positives, ImageNet weights of another width), and
the machine's own failures: Ctrl-C (a checkpoint, one line, status 130) and a full disk (one line, no
temporary files left).

Most cases call the stage scripts' `cli.main` in-process (what `python train_*.py` runs, without
TensorFlow's start-up per case); `test_truncated_jpeg_through_the_shell` and
`test_flag_errors_through_the_shell` run the real command line.
"""
import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

import input_data
from geoloc.train import trainer
import model
import train_first_E_1
from geoloc import cli
import train_second_E_2_1
import train_second_E_2_2
import train_third_E_3
from geoloc.train import train_state

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
    assert cli.main(E_1, TINY + ['--data_root', vigor, '--run_dir', run_dir]) == 0
    return run_dir


def fails(stages, argv, capsys):
    """Run a stage script's main; -> its one error line (after checking status 2 and nothing else on stderr)."""
    capsys.readouterr()
    assert cli.main(stages, argv) == 2
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


@pytest.mark.slow
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
        cli.main(E_1, ['--dataset', 'vigr', '--run_dir', str(tmp_path / 'run')])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('usage: ') and "argument --dataset: invalid choice: 'vigr'" in err
    assert not os.path.exists(tmp_path / 'run')


# ----------------------------------------------------------------------------- flags

E_2_1 = [train_second_E_2_1.STAGE]


@pytest.mark.parametrize('stages,extra,message', [
    (E_1, ['--batch', '0'], '--batch 0: must be at least 2 (the triplet loss needs a negative in the batch)'),
    (E_1, ['--log_every', '0'], '--log_every 0: must be at least 1'),
    (E_1, ['--ckpt_every', '0'], '--ckpt_every 0: must be at least 1'),
    (E_1, ['--seed', '-1'], '--seed -1: must be 0 or more'),
    (E_1, ['--grd_size', '0', '0'], '--grd_size 0 0: both sides must be positive multiples of 32 (the trunk '
                                    'downsamples 32x)'),
    (E_1, ['--sat_size', '1'], '--sat_size 1: must be a positive multiple of 64 (the heatmap decoder of E_2 and E_3 '
                               'upsamples the 1x1 bottleneck by side / 64, and every stage uses one size)'),
    (E_1, ['--width', '0'], '--width 0.0: must be a positive number'),
    # blamed on the flag, not on the missing E_1 phase-a checkpoint E_2_1 would start from
    (E_2_1, ['--epochs', '0'], '--epochs 0: must be at least 1'),
    (E_2_1, ['--max_steps', '-1'], '--max_steps -1: must be 0 or more'),
    (E_1, ['--test', '--eval_block', '0'], '--eval_block 0: must be at least 1'),
    (E_1, ['--test', '--eval_batch', '0'], '--eval_batch 0: must be at least 1'),
    (E_1, ['--test', '--max_queries', '-5'], '--max_queries -5: must be 0 or more'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) and isinstance(v[0], str) else None)
def test_impossible_flag_values_write_nothing(vigor, tmp_path, capsys, stages, extra, message):
    run_dir = tmp_path / 'run'
    argv = TINY + ['--data_root', vigor, '--run_dir', str(run_dir)] + extra
    assert fails(stages, argv, capsys) == f'error: {message}'
    assert not run_dir.exists()


def test_run_dir_naming_a_file(vigor, tmp_path, capsys):
    path = tmp_path / 'results.txt'
    path.write_text('kept')
    err = fails(E_1, TINY + ['--data_root', vigor, '--run_dir', str(path)], capsys)
    assert err == f'error: --run_dir {path}: names a file, not a directory'
    assert path.read_text() == 'kept'


def test_an_epoch_of_no_step_blames_the_flag(vigor, tmp_path, capsys):
    err = fails(E_1, TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'run'), '--epoch_batch', '100'], capsys)
    assert err == ('error: --epoch_batch 100: 36 training panoramas make an epoch of 0 steps (floor(36 / 100)); use a '
                   'smaller --epoch_batch (0: the training batch)')
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------- label files: names and deltas

def set_token(path, line, k, value):
    """Token k of label line `line` (0-based) := value."""
    def edit(lines):
        tok = lines[line].split()
        tok[k] = value
        return lines[:line] + [' '.join(tok)] + lines[line + 1:]
    edit_lines(path, edit)


def test_label_line_whose_semi_positives_are_all_unknown(vigor_copy, tmp_path, capsys):
    for k in (4, 7, 10):
        set_token(split_file(vigor_copy), 1, k, f'satellite_1.{k}_2.0.png')
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == (f'error: {split_file(vigor_copy)}:2: none of the semi-positive tiles satellite_1.4_2.0.png, '
                   "satellite_1.7_2.0.png, satellite_1.10_2.0.png is in satellite_list.txt of ('NewYork', 'Seattle', "
                   "'SanFrancisco', 'Chicago')")


def test_label_file_not_utf8(vigor_copy, tmp_path, capsys):
    path = split_file(vigor_copy, 'Chicago')
    data = open(path, 'rb').read().split(b'\n')
    data[2] = data[2][:10] + b'\xe9' + data[2][10:]        # a Latin-1 'e acute'
    open(path, 'wb').write(b'\n'.join(data))
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {path}:3: not UTF-8 text (byte 0xe9 at column 11)'


@pytest.mark.parametrize('token,value,message', [
    (2, '5000', 'positive delta (5000, {dx}) px lies beyond +-320 px (pixels of the 640-px tile; the panorama must '
                'lie in its positive tile)'),
    (3, 'nan', 'a delta is not finite'),
    (5, '-5000.0', "semi-positive 1 delta (-5000, {sdx}) px lies beyond +-640 px (pixels of the 640-px tile; a "
                   "semi-positive is the positive tile's neighbour in a grid of step 320 px)"),
    (0, 'P_LDsi-H061h3R3nGSyWy1,140.0,-73.979650,.jpg', 'panorama name P_LDsi-H061h3R3nGSyWy1,140.0,-73.979650,.jpg: '
                                                         'latitude 140 is not in [-90, 90]'),
    (0, 'P_LDsi,40.7,-273.9,.jpg', 'panorama name P_LDsi,40.7,-273.9,.jpg: longitude -273.9 is not in [-180, 180]'),
], ids=['positive 5000 px', 'nan', 'semi 5000 px', 'latitude', 'longitude'])
def test_implausible_names_and_deltas(vigor_copy, tmp_path, capsys, token, value, message):
    path = split_file(vigor_copy)
    tok = open(path).read().splitlines()[1].split()
    set_token(path, 1, token, value)
    err = train_e1(vigor_copy, str(tmp_path / 'run'), capsys)
    assert err == f'error: {path}:2: ' + message.format(dx=f'{float(tok[3]):g}', sdx=f'{float(tok[6]):g}')


def test_implausible_tile_name_in_satellite_list(vigor_copy, tmp_path, capsys):
    path = os.path.join(vigor_copy, 'splits', 'Seattle', 'satellite_list.txt')
    edit_lines(path, lambda lines: lines[:4] + ['satellite_47.6_-999.0.png'] + lines[4:])
    assert train_e1(vigor_copy, str(tmp_path / 'run'), capsys) == \
        f'error: {path}:5: tile name satellite_47.6_-999.0.png: longitude -999 is not in [-180, 180]'
    edit_lines(path, lambda lines: lines[:4] + ['sat_47.6.png'] + lines[5:])
    assert train_e1(vigor_copy, str(tmp_path / 'run'), capsys) == \
        f'error: {path}:5: tile name sat_47.6.png: expected satellite_<lat>_<lon>.png'


def test_accepted_byte_order_mark_and_corrected_out_of_tile_semi_positive(vigor_copy, tmp_path, capsys):
    """A UTF-8 BOM (Windows editors write one) is dropped; a corrected label's semi-positive delta beyond the
    tile's +-320 px (docs/design.md §1: 1.5-27 % of them in the real files) trains."""
    for path in (os.path.join(vigor_copy, 'splits', 'NewYork', 'satellite_list.txt'),
                 os.path.join(vigor_copy, 'splits__corrected', 'NewYork', 'same_area_balanced_train__corrected.txt')):
        data = open(path, 'rb').read()
        open(path, 'wb').write(b'\xef\xbb\xbf' + data)
    corrected = os.path.join(vigor_copy, 'splits__corrected', 'NewYork', 'same_area_balanced_train__corrected.txt')
    set_token(corrected, 0, 5, '-410.0')
    capsys.readouterr()
    argv = TINY + ['--data_root', vigor_copy, '--run_dir', str(tmp_path / 'run'), '--labels', 'corrected']
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0
    split = input_data.load_vigor(vigor_copy, 'train', labels='corrected')
    assert split.deltas[0, 1, 0] == -410.0 and len(split) == 36


# ----------------------------------------------------------------------------- CVACT's ACT_data.mat

@pytest.mark.parametrize('damage,message', [
    ('missing', '{mat}: CVACT ACT_data.mat not found: {root} holds no CVACT data (see data/DATASET.md)'),
    ('garbage', '{mat}: not a readable .mat file (Unknown mat file type, version 97, 32)'),
    ('no utm', "{mat}: missing field 'utm'"),
])
def test_cvact_act_data_missing_or_corrupt(tmp_path, capsys, damage, message):
    from fake_act_data import write_act_data
    root = tmp_path / 'CVACT'
    os.makedirs(root / 'resampled' / 'splits')
    mat = str(root / 'ACT_data.mat')
    if damage == 'garbage':
        open(mat, 'wb').write(b'not a mat file ' * 20)
    elif damage == 'no utm':
        write_act_data(mat, drop=('utm',))
    argv = TINY + ['--dataset', 'cvact', '--cvact_mpp', '0.12', '--data_root', str(root),
                   '--run_dir', str(tmp_path / 'run')]
    err = fails(E_1, argv, capsys)
    assert err == 'error: ' + message.format(mat=mat, root=root)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('mpp', [[], ['--cvact_mpp', '0.12']], ids=['without --cvact_mpp', 'with --cvact_mpp'])
def test_cvact_on_a_vigor_tree(vigor, tmp_path, capsys, mpp):
    """--dataset cvact on a tree with no CVACT data says so first (not that --cvact_mpp is missing)."""
    argv = TINY + ['--dataset', 'cvact', '--data_root', vigor, '--run_dir', str(tmp_path / 'run')] + mpp
    assert fails(E_1, argv, capsys) == (f'error: {vigor}/ACT_data.mat: CVACT ACT_data.mat not found: {vigor} holds no '
                                        'CVACT data; it is a VIGOR tree (leave out --dataset cvact)')
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------- damaged checkpoints and configurations

def damaged_copy(e1_run, tmp_path):
    run_dir = str(tmp_path / 'E_1')
    shutil.copytree(e1_run, run_dir)
    return run_dir


@pytest.mark.parametrize('damage', ['truncated', 'zeroed'])
def test_damaged_checkpoint_data_file(vigor, e1_run, tmp_path, capsys, damage):
    run_dir = damaged_copy(e1_run, tmp_path)
    ckpt = train_state.latest_checkpoint(run_dir)
    data_file = glob.glob(ckpt + '.data-*')[0]
    size = os.path.getsize(data_file)
    with open(data_file, 'r+b') as f:
        if damage == 'truncated':
            f.truncate(size // 2)
        else:
            f.write(bytes(size))
    before = snapshot(run_dir)
    for extra in ([], ['--test']):       # the same command again (it restores before it finds nothing to do), --test
        err = train_e1(vigor, run_dir, capsys, *extra)
        assert err.startswith(f'error: {ckpt}: unreadable checkpoint (')
        assert err.endswith('): a damaged or partly copied file')
    assert_untouched(before, run_dir)


@pytest.mark.parametrize('content', ['', 'model_checkpoint_path: "ckpt-1', '\0' * 80],
                         ids=['empty', 'truncated', 'zeroed'])
def test_damaged_checkpoint_index_is_an_error_not_a_restart(vigor, e1_run, tmp_path, capsys, content):
    run_dir = damaged_copy(e1_run, tmp_path)
    index = os.path.join(run_dir, 'ckpt', 'checkpoint')
    with open(index, 'w') as f:
        f.write(content)
    before = snapshot(run_dir)
    err = train_e1(vigor, run_dir, capsys)
    assert err == (f'error: {index}: damaged checkpoint index (names no checkpoint); restore it, or delete '
                   f'{os.path.dirname(index)} to start this run again')
    assert_untouched(before, run_dir)
    assert sorted(os.listdir(os.path.dirname(index))) == sorted(os.listdir(os.path.join(e1_run, 'ckpt')))


@pytest.mark.parametrize('content', ['', '{"alpha": 10.0, "area": "sa'], ids=['empty', 'truncated'])
def test_damaged_config_json(vigor, e1_run, tmp_path, capsys, content):
    run_dir = damaged_copy(e1_run, tmp_path)
    path = os.path.join(run_dir, 'config.json')
    with open(path, 'w') as f:
        f.write(content)
    for extra in ([], ['--test']):
        err = train_e1(vigor, run_dir, capsys, *extra)
        assert err.startswith(f'error: {path}: unreadable run configuration (JSONDecodeError: ')
        assert err.endswith('); restore it or use another --run_dir')


def test_test_of_another_stages_run_directory(vigor, e1_run, capsys):
    err = fails([train_second_E_2_2.STAGE], TINY + ['--data_root', vigor, '--run_dir', e1_run, '--test'], capsys)
    assert err == f'error: {e1_run}: holds a E_1 run, not E_2_2; test it with python train_first_E_1.py --test'


# ----------------------------------------------------------------------------- one writer; finished predecessors

def test_a_busy_run_directory_is_refused_and_nothing_is_lost(vigor, e1_run, tmp_path, capsys):
    """Another process holds the run directories (as a training run does): training and --test are refused in
    one line naming it, and write nothing; once it is dead, the same command takes its stale lock over."""
    import socket
    from test_run_lock import hold
    run_dir = damaged_copy(e1_run, tmp_path)
    before = snapshot(run_dir)
    holders = [hold(os.path.join(run_dir, 'phase_a')), hold(run_dir)]
    try:
        for extra, held, proc in (([], os.path.join(run_dir, 'phase_a'), holders[0]),
                                  (['--test'], run_dir, holders[1])):
            err = train_e1(vigor, run_dir, capsys, *extra)
            assert err.startswith(f'error: {held}: in use by pid {proc.pid} on {socket.gethostname()} (training E_x, '
                                  'since '), err
            assert err.endswith('one process writes a run directory at a time; wait for it to end, or use another '
                                '--run_dir')
        after = snapshot(run_dir)
        assert {p: d for p, d in after.items() if not p.endswith('run.lock')} == before    # train.log included
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
    capsys.readouterr()
    assert cli.main(E_1, TINY + ['--data_root', vigor, '--run_dir', run_dir]) == 0
    out = capsys.readouterr().out
    assert f'[E_1a] run lock: took over {run_dir}/phase_a/run.lock, left by pid {holders[0].pid} on ' in out
    assert f'[E_1] run lock: took over {run_dir}/run.lock, left by pid {holders[1].pid} on ' in out
    assert not glob.glob(os.path.join(run_dir, '**', 'run.lock'), recursive=True)
    assert_untouched(before, run_dir)


def write_fake_run(run_dir, stage, step, **settings):
    """A run directory whose checkpoint holds only its step, with the config.json of those settings."""
    import tensorflow as tf
    import config
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=tf.Variable(step, dtype=tf.int64)),
                                         os.path.join(run_dir, 'ckpt'), 1)
    manager.save(checkpoint_number=step)
    explicit, _, _ = config.parse_flags(TINY)
    config.save(config.resolve(stage, dict(explicit, **settings)), os.path.join(run_dir, 'config.json'))


def test_e3_refuses_an_unfinished_e2_2(vigor, tmp_path, capsys):
    """E_2_2 stopped at step 1 of the 2 its config.json schedules (1 epoch of floor(36 / 14) steps, no
    --max_steps): E_3 refuses it before writing anything."""
    e22 = str(tmp_path / 'E_2_2')
    write_fake_run(e22, 'E_2_2', 1, max_steps=0, data_root=vigor)
    argv = TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_3'), '--init_from', e22]
    err = fails([train_third_E_3.STAGE], argv, capsys)
    assert err == (f'error: {e22}: its checkpoint ckpt-1 is at step 1 of the 2 its config.json schedules (--epochs 1 '
                   'of 2 steps): an unfinished E_2_2; finish it (`python train_second_E_2_2.py` again with its flags) '
                   'or pass --allow_unfinished 1 to start from it anyway')
    assert not (tmp_path / 'E_3').exists()
    # stopped by its own --max_steps, the same checkpoint is finished: E_3 goes on (here to the restore, which
    # this stand-in checkpoint cannot serve)
    write_fake_run(str(tmp_path / 'stopped'), 'E_2_2', 1, max_steps=1, data_root=vigor)
    argv[argv.index(e22)] = str(tmp_path / 'stopped')
    assert 'restoring' in fails([train_third_E_3.STAGE], argv, capsys)


def test_allow_unfinished_starts_from_a_stopped_predecessor_and_says_where(vigor, e1_run, tmp_path, capsys):
    import config
    prev = str(tmp_path / 'phase_a')
    shutil.copytree(os.path.join(e1_run, 'phase_a'), prev)
    config.save(config.Config(**dict(config.load(os.path.join(prev, 'config.json')), max_steps=0)),
                os.path.join(prev, 'config.json'))                  # as if it had stopped at step 1 of 2
    argv = TINY + ['--data_root', vigor, '--run_dir', str(tmp_path / 'E_2_1'), '--init_from', prev]
    err = fails([train_second_E_2_1.STAGE], argv, capsys)
    assert err.startswith(f'error: {prev}: its checkpoint ckpt-1 is at step 1 of the 2 its config.json schedules')
    assert cli.main([train_second_E_2_1.STAGE], argv + ['--allow_unfinished', '1']) == 0
    assert (f'[E_2_1] init: E_1a checkpoint {prev}/ckpt/ckpt-1 is at step 1 of the 2 its configuration schedules '
            '(unfinished; --allow_unfinished 1)') in capsys.readouterr().out


# ----------------------------------------------------------------------------- ImageNet weights of another width

def test_full_size_imagenet_weights_with_the_demo_preset(vigor, tmp_path, capsys):
    """data/DATASET.md's vgg16.npy (here: random values of the real shapes) with --preset demo (width 1/4): one
    line says the trunks start random and why, and the demo trains."""
    rng = np.random.default_rng(0)
    weights, cin = {}, 3
    for layer in model.VGG16_LAYERS:
        if layer != 'pool':
            name, cout = layer
            weights[name] = [rng.normal(0, 0.01, (3, 3, cin, cout)).astype(np.float32), np.zeros(cout, np.float32)]
            cin = cout
    path = str(tmp_path / 'vgg16.npy')
    np.save(path, weights, allow_pickle=True)
    capsys.readouterr()
    argv = ['--preset', 'demo', '--data_root', vigor, '--run_dir', str(tmp_path / 'run'), '--vgg_weights', path,
            '--max_steps', '1', '--val_every', '0', '--batch', '4',   # (the tiny city cannot fill the demo's 10,
            '--grd_size', '32', '64', '--sat_size', '64']           #  nor its 64x128 panoramas: never upscaled)
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0
    out = capsys.readouterr()
    assert out.err == ''
    assert (f'[E_1a] init: random VGG16 trunks: the ImageNet weights in {path} do not fit this network (layer conv1_1 '
            'has shape (3, 3, 3, 64), this network needs (3, 3, 3, 16)); they fit --width 1 only') in out.out


def test_imagenet_weights_of_no_width_are_refused(vigor, tmp_path, capsys):
    """A vgg16.npy whose conv1_1 takes 5 input channels is no VGG16 of any width: one line, not random trunks
    under a message that the file fits --width 1."""
    from test_train_state import vgg16_file
    path = vgg16_file(tmp_path / 'vgg16.npy', 0.0625, first=(3, 3, 5, 4))
    run_dir = str(tmp_path / 'run')
    err = fails([train_first_E_1.PHASE_A], TINY + ['--data_root', vigor, '--run_dir', run_dir, '--vgg_weights', path],
                capsys)
    assert err == (f'error: {path}: not ImageNet VGG16 weights of any --width (layer conv1_1 has shape (3, 3, 5, 4); a '
                   'VGG16 of any width needs (3, 3, 3, 64 x width)); expected the classic TF-VGG vgg16.npy (see '
                   'data/DATASET.md)')
    assert not os.path.exists(os.path.join(run_dir, 'phase_a', 'config.json'))


# ----------------------------------------------------------------------------- Ctrl-C and a full disk

def test_ctrl_c_saves_a_checkpoint_and_says_so_in_one_line(vigor, tmp_path, monkeypatch, capsys, request):
    """SIGINT after step 3 (checkpoints every 100): the step in flight ends, ckpt-3 is saved with the mining
    descriptors gathered so far, one line, status 130. (tests/test_resume.py resumes such a run and compares
    its end with an uninterrupted run's.)"""
    # Python's own handler, as in an interactive shell (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    real = trainer.Trainer.log_step

    def log_and_press_ctrl_c(self, *args):
        real(self, *args)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(trainer.Trainer, 'log_step', log_and_press_ctrl_c)
    run_dir = str(tmp_path / 'run')
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--max_steps', '6', '--ckpt_every', '100',
                   '--mining', '1', '--epoch_batch', '0', '--log_every', '1']
    capsys.readouterr()
    assert cli.main([train_first_E_1.PHASE_A], argv) == 130
    ckpt = os.path.join(run_dir, 'phase_a', 'ckpt', 'ckpt-3')
    assert capsys.readouterr().err.splitlines() == [
        f'interrupted at step 3 of 6: checkpoint {ckpt} saved; run the same command to resume']
    assert train_state.latest_checkpoint(os.path.join(run_dir, 'phase_a')) == ckpt
    assert os.path.exists(ckpt + '.mining.npz')
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # Python's handler is back
    # the mining descriptors saved with it, truncated: resuming says so rather than mining with garbage
    monkeypatch.setattr(trainer.Trainer, 'log_step', real)
    with open(ckpt + '.mining.npz', 'r+b') as f:
        f.truncate(1000)
    err = fails([train_first_E_1.PHASE_A], argv, capsys)
    assert err.startswith(f'error: {ckpt}.mining.npz: unreadable mining descriptors (')
    assert err.endswith('delete it to resume with them recomputed (not bit-identical)')


def test_full_disk_one_line_and_no_temporary_files(vigor, tmp_path, capsys):
    """Files beyond 500 kB cannot be written (RLIMIT_FSIZE; the process ignores SIGXFSZ): the first checkpoint
    (1.4 MB) fails as on a full disk. One line; TensorFlow's ckpt-N_temp/ and our temporary files are gone."""
    run_dir = str(tmp_path / 'run')
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--max_steps', '3', '--ckpt_every', '2',
                   '--mining', '1', '--epoch_batch', '0']
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, hard))
    try:
        err = fails([train_first_E_1.PHASE_A], argv, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    ckpt_dir = os.path.join(run_dir, 'phase_a', 'ckpt')
    assert err == (f'error: {ckpt_dir}/ckpt-2: cannot write the checkpoint of step 2 (File too large); removed what it '
                   'left; last checkpoint: none (run the same command to resume once the disk has room)')
    assert os.listdir(ckpt_dir) == []
    everything = [os.path.join(d, f) for d, dirs, files in os.walk(run_dir) for f in files + dirs]
    assert not [p for p in everything if '_temp' in p or '.tmp' in p]
    assert cli.main([train_first_E_1.PHASE_A], argv) == 0     # with room again, the same command trains
