"""testing.py, the metric glue end to end: through the real `--test` command path (flags, dataset loading,
evaluation, JSON), a model whose localisation equals the ground truth scores 0 m, and one that is off by
a known vector scores the known metres, for the offset head and for the heatmap, with both label sets.

The network is replaced by a stand-in whose descriptors retrieve every positive tile and whose offset
head / heatmap branch return the label's delta (plus a chosen shift): what is tested is everything
between the network and the numbers (rc <-> delta, tile centre + delta -> position, m/px per city,
great-circle metres, the JSON).
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

import embedding
import geometry
import input_data
import stages
import train_lib
import train_state


class Standin:
    """Retrieves every query's positive; localises at the label's delta + shift (dy, dx) px."""

    def __init__(self, split, shift):
        self.split, self.shift = split, np.asarray(shift, np.float32)
        self.query_of = {p: i for i, p in enumerate(split.pano_paths)}
        self.tile_of = {p: i for i, p in enumerate(split.tile_paths)}
        self.n = len(split.tile_paths)
        self.dim = self.n + 1
        self.parts = ('pos_cholesky',)

    # the model's offset head (E_1): raw descriptors -> delta
    def offset(self, sat_raw, grd_raw):
        q = np.round(grd_raw.numpy()[:, self.n]).astype(int) - 1
        tile = np.argmax(sat_raw.numpy()[:, :self.n], axis=1)
        return tf.constant(np.stack([self.delta(qi, t) for qi, t in zip(q, tile)]))

    def delta(self, q, tile):
        k = np.flatnonzero(self.split.tiles[q] == tile)
        return (self.split.deltas[q, k[0]] if len(k) else np.zeros(2, np.float32)) + self.shift


class StandinEmbedder:
    def __init__(self, standin):
        self.m = standin

    def describe(self, paths, kind, hw, batch, cache=None, progress=None):
        out = np.zeros((len(paths), self.m.dim), np.float32)
        for i, p in enumerate(paths):
            if kind == 'aerial':
                out[i, self.m.tile_of[p]] = 1.0
            else:
                q = self.m.query_of[p]
                out[i, self.m.split.tiles[q, 0]] = 1.0
                out[i, self.m.n] = q + 1          # the query's id rides in a dimension no tile uses
        return out

    def localise_pairs(self, split, queries, tiles, cfg, branch='pos', keep_heatmaps=0, cache=None, progress=None):
        mu = np.stack([geometry.delta_to_rc(self.m.delta(q, t)) for q, t in zip(queries, tiles)]).astype(np.float32)
        chol = np.tile(np.array([[20.0, 0.0, 20.0]], np.float32), (len(queries), 1))
        return mu, chol, {}


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(3)


def run_test(vigor, tmp_path, monkeypatch, stage_name, labels, shift):
    stage = stages.get(stage_name)
    run_dir = str(tmp_path / stage_name)
    os.makedirs(run_dir)
    split = input_data.load_vigor(vigor, 'test', 'same', labels)
    standin = Standin(split, shift)
    monkeypatch.setattr(train_state, 'latest_checkpoint', lambda d: os.path.join(d, 'ckpt', 'ckpt-1'))
    monkeypatch.setattr(train_state, 'restore_parts', lambda *a: None)
    monkeypatch.setattr(stages, 'build_model', lambda s, c: standin)
    monkeypatch.setattr(embedding, 'Embedder', StandinEmbedder)
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--labels', labels, '--plots', '0', '--test']
    assert train_lib.main([stage], argv) == 0
    with open(os.path.join(run_dir, 'test', 'test_results.json')) as f:
        return json.load(f), split


@pytest.mark.parametrize('labels', ['original', 'corrected'])
@pytest.mark.parametrize('stage_name', ['E_1', 'E_2_2'])
def test_exact_localisation_scores_zero_metres(vigor, tmp_path, monkeypatch, stage_name, labels):
    r, split = run_test(vigor, tmp_path, monkeypatch, stage_name, labels, (0.0, 0.0))
    assert r['retrieval']['R@1'] == 1.0
    assert r['localisation']['method'] == {'E_1': 'offset', 'E_2_2': 'heatmap'}[stage_name]
    for s in (r['localisation_positive'], r['localisation']['all'], r['localisation']['top1_correct']):
        assert s['count'] == len(split) and s['mean_m'] < 1e-3
        assert s['median_m_centre'] > 5            # (the tile centre alone is metres away: the test can fail)


@pytest.mark.parametrize('labels', ['original', 'corrected'])
@pytest.mark.parametrize('stage_name', ['E_1', 'E_2_2'])
def test_known_offset_scores_known_metres(vigor, tmp_path, monkeypatch, stage_name, labels):
    # 30 px south and 40 px west of the truth: 50 px, times the city's m/px (0.114 everywhere with the
    # original labels; SliceMatch's per-city values with the corrected ones)
    r, split = run_test(vigor, tmp_path, monkeypatch, stage_name, labels, (30.0, 40.0))
    expected = 50.0 * split.mpp
    assert len(set(np.round(expected, 6))) == (1 if labels == 'original' else 4)
    s = r['localisation_positive']
    assert s['mean_m'] == pytest.approx(expected.mean(), abs=2e-3)
    assert s['median_m'] == pytest.approx(np.median(expected), abs=2e-3)
    if stage_name == 'E_2_2':   # 50 px against a 20-px isotropic Gaussian: outside 2 sigma (40 px) for every query
        assert r['uncertainty']['2sigma'] == 0.0 and r['uncertainty']['median_error_px'] == pytest.approx(50, abs=1e-3)
