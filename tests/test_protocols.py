"""protocols.py and its application through testing.evaluate_model: the seeded yaws, the column shift of a
rotated panorama, the field-of-view window, the directory names; and what a rotation does to a model:
360 degrees changes nothing, 180 degrees costs a north-aligned descriptor its recall (a stand-in whose
behaviour under rotation is known). (pipeline.apply_views itself: tests/test_pipeline.py.)"""
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

from geoloc.nn import embedding
import input_data
from geoloc.eval import protocols
import stages
from geoloc.eval import testing
import train_first_E_1
from geoloc import cli

NAME = 'L-1poX8YZAmBZVLMqBu-4w,41.877949,-87.689396,.jpg'     # docs/design.md §1's example panorama


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
    cfg = cli.configs([train_first_E_1.PHASE_B], [])[0]
    assert protocols.settings_name(cfg) == 'original_same_north_qall'
    cfg = cli.configs([train_first_E_1.PHASE_B], ['--labels', 'corrected', '--area', 'cross', '--yaw', 'random',
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
    cfg = cli.configs([stage], TINY + ['--data_root', vigor])[0]
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


class HarmonicModel(tf.Module):
    """A stand-in whose behaviour is known: a panorama's descriptor is the odd Fourier harmonics (k = 1, 3, 5, 7)
    of its column profile (the mean over rows, per channel). Turning a panorama by 180 degrees shifts its columns
    by W/2, which multiplies harmonic k by (-1)^k: the descriptor becomes exactly its negative."""
    dim = 3 * 4 * 2

    def embed_grd(self, grd):
        profile = tf.transpose(tf.reduce_mean(grd, axis=1), [0, 2, 1])          # (B, 3, W)
        harmonics = tf.gather(tf.signal.rfft(profile), [1, 3, 5, 7], axis=2)     # (B, 3, 4) complex
        return tf.reshape(tf.concat([tf.math.real(harmonics), tf.math.imag(harmonics)], -1), [-1, self.dim])

    def embed_sat(self, sat):
        raise AssertionError('the stand-in describes tiles from its table')


class HarmonicEmbedder(embedding.Embedder):
    """The real descriptor path (pipeline, protocol views, compiled function) over HarmonicModel for panoramas;
    a tile's descriptor is the sum of the north-aligned descriptors of the panoramas whose positive it is, so a
    north-aligned query finds its tile by construction."""

    def __init__(self, split, cfg):
        super().__init__(HarmonicModel())
        north = self.describe(split.pano_paths, 'panorama', cfg.grd_size, cfg.eval_batch)
        self.tiles = {path: np.zeros(HarmonicModel.dim, np.float32) for path in split.tile_paths}
        for q, tile in enumerate(split.tiles[:, 0]):
            self.tiles[split.tile_paths[tile]] += north[q]

    def describe(self, paths, kind, hw, batch, cache=None, progress=None, views=None):
        if kind == 'aerial':
            return np.stack([self.tiles[p] for p in paths])
        return super().describe(paths, kind, hw, batch, cache, progress, views)


def test_rotation_by_180_degrees_costs_a_north_aligned_model_its_recall(vigor):
    """Through evaluate_model and the real pipeline, with the harmonic stand-in: north-aligned queries find
    their tiles, every panorama turned by 180 degrees gets the negative of its descriptor and loses them,
    360 degrees changes nothing."""
    stage = stages.get('E_1a')
    cfg = cli.configs([stage], TINY + ['--data_root', vigor])[0]
    split = input_data.load_vigor(vigor, 'test')
    embedder = HarmonicEmbedder(split, cfg)
    queries = np.arange(len(split))
    runs = {yaw: testing.evaluate_model(stage, cfg, None, embedder, split, queries, protocol=protocols.Protocol(yaw=yaw))
            for yaw in (protocols.NORTH, 180.0, 360.0)}
    north, half, full = (runs[y].results['retrieval']['R@1'] for y in (protocols.NORTH, 180.0, 360.0))
    np.testing.assert_allclose(runs[180.0].grd, -runs[protocols.NORTH].grd, atol=1e-4)
    assert north >= 0.5 and full == north                  # chance is 1 / len(split.tile_paths)
    assert half <= north / 3
