"""localise.py and export.py (geoloc/serve/): a panorama's answer equals --test's for the same panorama when both
pick the same top-1 tile; a SavedModel gives the checkpoint's answer; --yaw rolls a rotated panorama back to
north; --mpp scales the metres; every bad input ends in one line `error: ...` and exit status 2.

Nothing is trained: each run directory holds a checkpoint of the stage's network at random init and the
config.json a stage script writes (the tiny network of conftest.TINY), which --test and localise.py both
restore. Both paths run the same TensorFlow ops on the same decoded pixels, so they agree far below the
tolerances asserted (0.5 m against --test, 0.01 m between checkpoint and SavedModel).
"""
import csv
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

import config
import export
import input_data
import localise
import stages
from geoloc import cli
from geoloc.data import geometry
from geoloc.serve import served, tiles

CITIES = ('NewYork', 'Seattle', 'SanFrancisco', 'Chicago')


def make_run(stage_name, base, data_root, *flags):
    """A run directory of `stage_name` as its script would leave it, holding the random-init network: its
    config.json (the script's resolved flags) and one checkpoint. -> the stage's run directory."""
    stage = stages.get(stage_name)
    cfg, = cli.configs([stage], TINY + ['--data_root', data_root, '--run_dir', base] + list(flags))
    run_dir = stage.run_dirs(cfg)[0]
    model = stages.build_model(stage, cfg)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), os.path.join(run_dir, 'ckpt'), 1).save()
    config.save(cfg, os.path.join(run_dir, 'config.json'))
    return run_dir


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(3)


@pytest.fixture(scope='module')
def runs(vigor, tmp_path_factory):
    """{stage: run directory}: E_1a (no head: the tile centre), E_1 (offset head), E_2_2 (heatmap and covariance;
    a covariance 30 times the default's, so that its ellipses are large enough to draw)."""
    base = tmp_path_factory.mktemp('serve_runs')
    return {'E_1a': make_run('E_1a', str(base / 'E_1'), vigor), 'E_1': make_run('E_1', str(base / 'E_1'), vigor),
            'E_2_2': make_run('E_2_2', str(base / 'E_2_2'), vigor, '--cholesky_scale', '30')}


@pytest.fixture(scope='module')
def tile_dirs(vigor):
    return [os.path.join(vigor, c, 'satellite') for c in CITIES]


def ask(capsys, *argv, stdout=False):
    """localise.py's answer (its --json) for argv (and what it printed, with stdout=True); checks the exit status
    and that stderr is quiet."""
    fd, out = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    capsys.readouterr()
    try:
        assert localise.main(list(argv) + ['--json', out]) == 0
        printed = capsys.readouterr()
        assert printed.err == ''
        with open(out) as f:
            answer = json.load(f)
    finally:
        os.remove(out)
    return (answer, printed.out) if stdout else answer


def metres(a, b):
    return float(geometry.distance_m(np.array([a], np.float64), np.array([b], np.float64), 'haversine')[0])


@pytest.mark.parametrize('stage_name', [pytest.param('E_1a', marks=pytest.mark.slow), 'E_1', 'E_2_2'])
def test_answer_equals_the_test_commands(vigor, runs, tile_dirs, capsys, stage_name):
    """--test's per_query.csv (top-1 tile, predicted lat/lon, u) against localise.py on the same panoramas,
    with every reference tile of the test split as --tiles."""
    run_dir = runs[stage_name]
    base = os.path.dirname(run_dir) if stage_name == 'E_1a' else run_dir
    argv = TINY + ['--data_root', vigor, '--run_dir', base, '--plots', '0', '--max_queries', '4', '--test']
    assert cli.main([stages.get(stage_name)], argv) == 0
    with open(os.path.join(run_dir, 'test', 'original_same_north_q4', 'per_query.csv')) as f:
        rows = list(csv.DictReader(f))
    split = input_data.load_vigor(vigor, 'test')
    assert sorted(split.tile_paths) == sorted(tiles.list_tiles(tile_dirs)[0])     # the same references
    same, moved = 0, []
    for row in rows:
        answer = ask(capsys, '--run_dir', run_dir, '--panorama', split.pano_paths[int(row['query'])],
                     '--tiles', *tile_dirs, '--top_k', '3')
        assert answer['stage'] == stage_name and len(answer['top_tiles']) == 3
        assert answer['top_tiles'][0]['tile'] == answer['tile']
        if os.path.basename(answer['tile']) != row['top1_tile']:
            continue
        same += 1
        assert metres((answer['lat'], answer['lon']), (float(row['pred_lat']), float(row['pred_lon']))) < 0.5
        moved.append(metres((answer['lat'], answer['lon']), (answer['tile_lat'], answer['tile_lon'])))
        if stage_name == 'E_2_2':
            assert answer['u_px'] == pytest.approx(float(row['u_px']), rel=1e-3)
            assert answer['sigma_m'] > 0 and answer['semi_major_m'] >= answer['semi_minor_m'] > 0
        else:
            assert 'sigma_m' not in answer
    assert same >= 3, f'only {same} of {len(rows)} panoramas have the same top-1 tile in both'
    # the comparison is not one of tile centres: the heads move the point
    assert max(moved) == 0.0 if stage_name == 'E_1a' else max(moved) > 0.05


@pytest.mark.parametrize('stage_name', ['E_1', 'E_2_2'])
def test_saved_model_gives_the_checkpoints_answer(vigor, runs, tile_dirs, tmp_path, capsys, stage_name):
    out = str(tmp_path / 'saved')
    assert export.main(['--run_dir', runs[stage_name], '--out', out]) == 0
    # plain TensorFlow: the signatures, the metadata, the outputs of the stage
    loaded = tf.saved_model.load(out)
    assert {'serving_default', 'embed_panorama', 'embed_tile', 'metadata'} <= set(loaded.signatures)
    info = json.loads(loaded.signatures['metadata']()['json'].numpy())
    assert info['stage'] == stage_name and info['grd_size'] == [32, 64] and info['sat_size'] == 64
    pano = np.random.default_rng(0).integers(0, 256, (2, 64, 128, 3), np.uint8)      # resized inside
    outputs = loaded.signatures['serving_default'](panorama=tf.constant(pano), tile=tf.constant(pano[:, :, :64]))
    expected = {'grd_descriptor', 'sat_descriptor', 'score', 'delta', 'mu'}
    expected |= {'chol', 'heatmap'} if stage_name == 'E_2_2' else set()
    assert set(outputs) == expected and outputs['mu'].shape == (2, 2)
    split = input_data.load_vigor(vigor, 'test')
    for q in (0, 5):
        flags = ['--panorama', split.pano_paths[q], '--tiles', *tile_dirs]
        ckpt = ask(capsys, '--run_dir', runs[stage_name], *flags)
        saved = ask(capsys, '--saved_model', out, '--stage', stage_name, *flags)
        assert [t['tile'] for t in saved['top_tiles']] == [t['tile'] for t in ckpt['top_tiles']]
        assert metres((saved['lat'], saved['lon']), (ckpt['lat'], ckpt['lon'])) < 0.01
        if stage_name == 'E_2_2':
            assert saved['sigma_m'] == pytest.approx(ckpt['sigma_m'], abs=0.01)
            assert saved['major_axis_bearing_deg'] == pytest.approx(ckpt['major_axis_bearing_deg'], abs=0.5)


def test_yaw_rolls_a_rotated_panorama_back_to_north(vigor, runs, tile_dirs, tmp_path, capsys):
    """A panorama turned 90 deg clockwise (--test's yaw protocol: rotated[:, c] = original[:, (c + W/4) mod W]),
    written losslessly, localised with --yaw 90: the north-aligned panorama's answer, exactly."""
    run_dir = runs['E_2_2']
    original = input_data.load_vigor(vigor, 'test').pano_paths[3]
    pixels = tiles.read_images([original], (32, 64), 'panorama')[0]            # RGB as the pipeline reads it
    rotated = str(tmp_path / 'rotated.png')
    cv2.imwrite(rotated, np.roll(pixels, -16, axis=1)[..., ::-1])
    flags = ['--run_dir', run_dir, '--tiles', *tile_dirs]
    north = ask(capsys, *flags, '--panorama', original)
    back = ask(capsys, *flags, '--panorama', rotated, '--yaw', '90')
    turned = ask(capsys, *flags, '--panorama', rotated)
    assert back['yaw_deg'] == 90.0
    assert (back['lat'], back['lon'], back['top_tiles']) == (north['lat'], north['lon'], north['top_tiles'])
    assert turned['top_tiles'] != north['top_tiles']        # the roll matters to the network


def test_mpp_scales_the_metres_and_the_picture(runs, vigor, tile_dirs, tmp_path, capsys):
    """--mpp is the files' ground resolution: 1.14 m/px on a 64-px tile is VIGOR's 0.114 m/px of the 640-px frame
    (the default), 2.28 doubles every distance from the tile centre and the ellipse. --picture writes a PNG."""
    flags = ['--run_dir', runs['E_2_2'], '--panorama', input_data.load_vigor(vigor, 'test').pano_paths[1],
             '--tiles', *tile_dirs]
    picture = str(tmp_path / 'answer.png')
    default, printed = ask(capsys, *flags, '--picture', picture, stdout=True)
    assert f'E_2_2 (heatmap): lat {default["lat"]:.7f}, lon {default["lon"]:.7f}' in printed
    assert f'uncertainty: sigma {default["sigma_m"]:.2f} m' in printed
    same = ask(capsys, *flags, '--mpp', '1.14')
    double = ask(capsys, *flags, '--mpp', '2.28')
    centre = (default['tile_lat'], default['tile_lon'])
    d = metres((default['lat'], default['lon']), centre)
    assert d > 0.05
    assert metres((same['lat'], same['lon']), (default['lat'], default['lon'])) < 1e-6
    assert metres((double['lat'], double['lon']), centre) == pytest.approx(2 * d, rel=1e-4)
    assert double['sigma_m'] == pytest.approx(2 * default['sigma_m'], rel=1e-6)
    img = cv2.imread(picture)
    assert img is not None and img.shape[0] > 300 and img.shape[1] > 300


@pytest.mark.slow
def test_calibration_scales_the_ellipses_of_test_localise_and_export(vigor, runs, tile_dirs, tmp_path, capsys):
    """--test --calibrate 1 fits one scale of the ellipses on its split (its results go to calibration/, not
    test/) and keeps it in calibration.json; later --test, localise.py and an export apply it (on the same split
    --test's coverage is the fit's; sigma_m is the scale times the uncalibrated one; the point does not move). A
    checkpoint written after the fit is refused until it is refitted."""
    run_dir = str(tmp_path / 'E_2_2')
    shutil.copytree(runs['E_2_2'], run_dir, ignore=shutil.ignore_patterns('test'))   # other tests' --test results
    stage = stages.get('E_2_2')
    pano_flags = ['--panorama', input_data.load_vigor(vigor, 'test').pano_paths[0], '--tiles', *tile_dirs]
    before = ask(capsys, '--run_dir', run_dir, *pano_flags)
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--plots', '0', '--test']
    assert cli.main([stage], argv + ['--calibrate', '1']) == 0
    record = json.load(open(os.path.join(run_dir, 'calibration.json')))
    scale = record['sigma_scale']
    assert record['fitted_on']['n'] == len(input_data.load_vigor(vigor, 'test')) and record['checkpoint'] == 'ckpt-1'
    assert abs(np.log(scale)) > 0.05                     # the random network's ellipses are far from calibrated
    assert os.path.isdir(os.path.join(run_dir, 'calibration', 'original_same_north_qall'))
    assert not os.path.exists(os.path.join(run_dir, 'test'))
    assert cli.main([stage], argv) == 0
    unc = json.load(open(os.path.join(run_dir, 'test', 'original_same_north_qall', 'test_results.json')))['uncertainty']
    assert unc['sigma_scale'] == pytest.approx(scale)
    for k in ('1sigma', '2sigma'):
        assert unc[k] == pytest.approx(record['coverage_after'][k], abs=1.5 / unc['n'])
    after = ask(capsys, '--run_dir', run_dir, *pano_flags)
    assert after['sigma_m'] == pytest.approx(scale * before['sigma_m'], rel=1e-4)
    assert (after['lat'], after['lon']) == (before['lat'], before['lon'])
    out = str(tmp_path / 'saved')
    assert export.main(['--run_dir', run_dir, '--out', out]) == 0
    assert ask(capsys, '--saved_model', out, *pano_flags)['sigma_m'] == pytest.approx(after['sigma_m'], rel=1e-4)
    cfg, = cli.configs([stage], TINY + ['--data_root', vigor, '--run_dir', run_dir])
    tf.train.CheckpointManager(tf.train.Checkpoint(model=stages.build_model(stage, cfg)),
                               os.path.join(run_dir, 'ckpt'), 2).save(checkpoint_number=2)   # trained further
    err = fails(capsys, lambda a: cli.main([stage], a), *argv)
    assert "calibration.json: fitted on 'ckpt-1', but the latest checkpoint is ckpt-2; refit it" in err
    assert 'fitted on' in fails(capsys, localise.main, '--run_dir', run_dir, *pano_flags)


# ----------------------------------------------------------------------------- bad input

def fails(capsys, main, *argv):
    """-> the one stderr line of a command that must fail with exit status 2."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


@pytest.fixture(scope='module')
def e1_saved(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('e1_saved') / 'E_1')
    served.export(runs['E_1'], out)
    return out


def test_bad_panoramas(runs, vigor, tile_dirs, tmp_path, capsys):
    square = str(tmp_path / 'square.png')
    cv2.imwrite(square, np.zeros((64, 64, 3), np.uint8))
    small = str(tmp_path / 'small.png')
    cv2.imwrite(small, np.zeros((16, 32, 3), np.uint8))
    flags = ['--run_dir', runs['E_1'], '--tiles', *tile_dirs]
    assert 'width = 2 x height, got 64x64' in fails(capsys, localise.main, *flags, '--panorama', square)
    assert 'too small: 32x16' in fails(capsys, localise.main, *flags, '--panorama', small)
    assert 'no_such.jpg' in fails(capsys, localise.main, *flags, '--panorama', str(tmp_path / 'no_such.jpg'))


def test_bad_tiles(runs, vigor, tile_dirs, tmp_path, capsys):
    pano = input_data.load_vigor(vigor, 'test').pano_paths[0]
    flags = ['--run_dir', runs['E_1'], '--panorama', pano, '--tiles']
    some = sorted(os.listdir(tile_dirs[0]))[:2]
    nameless = str(tmp_path / 'nameless')
    os.makedirs(nameless)
    shutil.copy(os.path.join(tile_dirs[0], some[0]), os.path.join(nameless, 'tile.png'))
    err = fails(capsys, localise.main, *flags, nameless)
    assert 'tile.png: not a tile name with coordinates' in err
    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    assert f'{empty}: no aerial tiles in this folder' in fails(capsys, localise.main, *flags, empty)
    assert 'no such tile file or folder' in fails(capsys, localise.main, *flags, str(tmp_path / 'nowhere'))
    broken = str(tmp_path / 'broken')
    os.makedirs(broken)
    shutil.copy(os.path.join(tile_dirs[0], some[0]), broken)
    with open(os.path.join(tile_dirs[0], some[1]), 'rb') as f:
        data = f.read()
    with open(os.path.join(broken, some[1]), 'wb') as f:
        f.write(data[:len(data) // 2])                                          # a truncated PNG
    assert f'{os.path.join(broken, some[1])}: truncated PNG' in fails(capsys, localise.main, *flags, broken)


def test_bad_models(runs, vigor, tile_dirs, e1_saved, tmp_path, capsys):
    rest = ['--panorama', input_data.load_vigor(vigor, 'test').pano_paths[0], '--tiles', *tile_dirs]
    untrained = str(tmp_path / 'untrained')
    os.makedirs(untrained)
    assert 'not a run directory (no config.json)' in fails(capsys, localise.main, '--run_dir', untrained, *rest)
    shutil.copy(os.path.join(runs['E_1'], 'config.json'), untrained)
    assert f'{untrained}: no checkpoint' in fails(capsys, localise.main, '--run_dir', untrained, *rest)
    assert f'{untrained}: no checkpoint' in fails(capsys, export.main, '--run_dir', untrained, '--out',
                                                  str(tmp_path / 'never'))
    assert not os.path.exists(tmp_path / 'never')
    assert 'not a SavedModel directory' in fails(capsys, localise.main, '--saved_model', untrained, *rest)
    other = tf.Module()
    other.f = tf.function(lambda x: {'y': 2 * x}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(other, str(tmp_path / 'other'), signatures={'serving_default': other.f})
    err = fails(capsys, localise.main, '--saved_model', str(tmp_path / 'other'), *rest)
    assert 'not a SavedModel written by export.py (it lacks the signature(s) embed_panorama' in err
    err = fails(capsys, localise.main, '--saved_model', e1_saved, '--stage', 'E_2_2', *rest)
    assert err == 'error: the model is of stage E_1, not --stage E_2_2 (it has no covariance head)'
    assert 'not an empty directory' in fails(capsys, export.main, '--run_dir', runs['E_1'], '--out', e1_saved)
    assert 'one of the arguments --run_dir --saved_model is required' in fails(capsys, localise.main, *rest)
    assert '--top_k must be at least 1' in fails(capsys, localise.main, '--run_dir', runs['E_1'], '--top_k', '0',
                                                *rest)
    test_argv = TINY + ['--data_root', vigor, '--run_dir', runs['E_1'], '--test', '--calibrate', '1']
    assert 'E_1 has no covariance head to calibrate' in fails(capsys, lambda a: cli.main(stages.script_stages(
        'train_first_E_1.py'), a), *test_argv)
    assert '--calibrate 1 fits the ellipses of a trained run on held-out panoramas: give --test too' in fails(
        capsys, lambda a: cli.main([stages.get('E_2_2')], a), *test_argv[:-3], '--calibrate', '1')
