"""protocols.py and its application through testing.evaluate_model: the seeded yaws, the column shift of a
rotated panorama, the field-of-view window, the directory names; and what a rotation does to a model:
360 degrees changes nothing, 180 degrees costs a north-aligned model its recall. (pipeline.apply_views
itself: tests/test_pipeline.py.)"""
import json
import os

import numpy as np
import pytest
from conftest import TINY

import embedding
import input_data
import protocols
import stages
import synthetic_data
import testing
import train_first_E_1
import train_lib

NAME = 'L-1poX8YZAmBZVLMqBu-4w,41.877949,-87.689396,.jpg'     # SPEC §1's example panorama


def test_seeded_yaws_are_fixed_numbers():
    # SHA-256 of '0/yaw/<name>': 0x4dc260c35244b55a / 2^64 * 360 degrees, on every machine
    assert protocols.seeded_degrees([NAME], 0, 'yaw')[0] == pytest.approx(109.34900013629577, abs=1e-12)
    assert protocols.seeded_degrees([NAME], 1, 'yaw')[0] == pytest.approx(242.4796838652161, abs=1e-12)
    assert protocols.seeded_degrees([NAME], 0, 'fov heading')[0] == pytest.approx(292.33819570406297, abs=1e-12)
    # a panorama's yaw does not depend on which others are drawn with it (query count, split, labels)
    many = protocols.seeded_degrees(['a', NAME, 'b'], 0, 'yaw')
    assert many[1] == protocols.seeded_degrees([NAME], 0, 'yaw')[0] and len(set(many)) == 3
    yaws = protocols.seeded_degrees([f'p{i}' for i in range(2000)], 0, 'yaw')
    assert yaws.min() >= 0 and yaws.max() < 360 and abs(yaws.mean() - 180) < 10      # uniform in [0, 360)


def test_views_shift_and_window():
    rotate = protocols.Protocol(yaw=90.0)
    np.testing.assert_array_equal(rotate.views(['a', 'b'], 64), [[16, 0, 64], [16, 0, 64]])
    assert protocols.Protocol(yaw=360.0).views(['a'], 64)[0, 0] == 0
    assert protocols.Protocol(yaw=-90.0).views(['a'], 64)[0, 0] == 48
    assert protocols.Protocol().views(['a'], 64) is None and protocols.Protocol().identity
    # 90 degrees around a heading: 16 of 64 columns, centred on the heading's column
    fov = protocols.Protocol(fov=90.0)
    heading = fov.headings(['a'])[0]
    shift, start, visible = fov.views(['a'], 64)[0]
    assert shift == 0 and visible == 16
    azimuth = 360 * ((start + np.arange(visible)) % 64 + 0.5) / 64 - 180          # the columns kept
    offset = (azimuth - heading + 180) % 360 - 180
    assert np.abs(offset).max() <= 45 + 360 / 64 and abs(offset.mean()) <= 360 / 64 / 2 + 1e-9


def test_names_and_settings_directories():
    cfg = train_lib.configs([train_first_E_1.PHASE_B], [])[0]
    assert protocols.settings_name(cfg) == 'original_same_north_qall'
    cfg = train_lib.configs([train_first_E_1.PHASE_B], ['--labels', 'corrected', '--area', 'cross', '--yaw', 'random',
                                                        '--eval_seed', '3', '--max_queries', '100'])[0]
    assert protocols.settings_name(cfg) == 'corrected_cross_yawrandom-s3_q100'
    cfg = cfg.replace(yaw='180', fov=72.5, dataset='cvact', max_queries=0)
    assert protocols.settings_name(cfg) == 'cvact_yaw180_fov72.5-s3_qall'
    assert protocols.results_dir(cfg, 'runs/E_1') == os.path.join('runs/E_1', 'test', 'cvact_yaw180_fov72.5-s3_qall')
    assert protocols.results_dir(cfg.replace(test_dir='/elsewhere'), 'runs/E_1') == \
        '/elsewhere/cvact_yaw180_fov72.5-s3_qall'
    assert protocols.Protocol(yaw=180.0).describe() == ('every panorama rotated by a yaw of 180 deg; '
                                                        '360 deg field of view')


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(3)


def test_rotation_by_360_degrees_changes_nothing(vigor):
    """A random-init E_1 model through the real compiled path: yaw 360 gives north's descriptors and metrics
    exactly; yaw 180 changes the panoramas' descriptors (the rotation reaches the network)."""
    stage = stages.get('E_1')
    cfg = train_lib.configs([stage], TINY + ['--data_root', vigor])[0]
    split = input_data.load_vigor(vigor, 'test')
    embedder = embedding.Embedder(stages.build_model(stage, cfg))
    queries = np.arange(len(split))
    runs = {yaw: testing.evaluate_model(stage, cfg, embedder.model, embedder, split, queries,
                                        protocol=protocols.Protocol(yaw=yaw))
            for yaw in (protocols.NORTH, 360.0, 180.0)}
    north, full, half = runs[protocols.NORTH], runs[360.0], runs[180.0]
    np.testing.assert_array_equal(full.grd, north.grd)
    drop = lambda r: {k: v for k, v in r.items() if k != 'protocol'}
    # exactly equal, NaN for NaN (a random-init model may retrieve no query first: its top-1 errors are NaN)
    np.testing.assert_equal(drop(full.results), drop(north.results))
    assert full.results['protocol']['name'] == 'yaw360'
    assert np.abs(half.grd - north.grd).max() > 1e-3
    np.testing.assert_array_equal(half.sat, north.sat)                     # the aerial side is untouched


@pytest.mark.slow
def test_rotation_by_180_degrees_costs_a_north_aligned_model_its_recall(tmp_path):
    """A tiny E_1a trained 300 steps on a 4x4-tile synthetic city (64x128 panoramas, lr 1e-3; ~25 s of CPU
    for the whole test) retrieved 4 of 64 test panoramas first among 144 reference tiles (R@1 6.2 %, chance
    0.7 %) when measured; turned by 180 degrees, 0 of 64."""
    root = str(tmp_path / 'VIGOR')
    synthetic_data.write_vigor(root, seed=0, grid=4, tile_px=64, pano_hw=(64, 128))
    argv = ['--grd_size', '64', '128', '--sat_size', '64', '--width', '0.0625', '--batch', '6', '--epoch_batch', '0',
            '--epochs', '1000', '--max_steps', '300', '--lr', '1e-3', '--mining', '0', '--val_every', '0',
            '--log_every', '100', '--data_root', root, '--run_dir', str(tmp_path / 'run'), '--plots', '0']
    stage = [train_first_E_1.PHASE_A]
    assert train_lib.main(stage, argv) == 0
    r1 = {}
    for yaw in ('north', '180', '360'):
        assert train_lib.main(stage, argv + ['--test', '--yaw', yaw]) == 0
        name = 'north' if yaw == 'north' else f'yaw{yaw}'
        with open(tmp_path / 'run' / 'phase_a' / 'test' / f'original_same_{name}_qall' / 'test_results.json') as f:
            r1[yaw] = json.load(f)['retrieval']['R@1']
    chance = 1 / (4 * 36)                             # 4 cities x (4 + 2)^2 reference tiles (the ring included)
    assert r1['north'] >= 5 * chance                  # the model learnt something north-aligned
    assert r1['180'] <= r1['north'] / 3               # and turning the panoramas round loses most of it
    assert r1['360'] == r1['north']
