"""testing.py, the metric glue end to end: through the real `--test` command path (flags, dataset loading,
evaluation, JSON), a model whose localisation equals the ground truth scores 0 m, and one that is off by
a known vector scores the known metres, for the offset head and for the heatmap, with both label sets.

The network is replaced by a stand-in whose descriptors retrieve every positive tile and whose offset
head / heatmap branch return the label's delta (plus a chosen shift): what is tested is everything
between the network and the numbers (rc <-> delta, tile centre + delta -> position, m/px per city,
great-circle metres, the JSON).

ground_dependence (whether a heatmap looks at the panorama): known answers with stand-in models run through
the real Embedder (pipeline, protocol views, compiled localiser): one whose point is a known function of the
panorama gives the hand-computed shifts, one whose point ignores it gives exactly 0; then a random-init E_2_1
through the real --test command writes the measure for both branches.

The evaluation is open: a stage with its own localiser and metrics goes through --test untouched; and a heatmap
stage's evaluation runs the ground trunk once per panorama, with the numbers of the full-image path.
"""
import csv
import dataclasses
import json
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

from geoloc.nn import embedding
from geoloc.data import geometry
import input_data
import model as model_lib
from geoloc.eval import localisers
from geoloc.eval import protocols
from geoloc.eval import results
import stages
from geoloc.eval import testing
from geoloc import cli
from geoloc.train import train_state


class Standin:
    """Retrieves every query's positive (or, for every `wrong_every`-th query, its first semi-positive);
    localises at the label's delta + shift (dy, dx) px (the semi-positive heatmap branch: + 2 shift)."""

    def __init__(self, split, shift, wrong_every=0):
        self.split, self.shift = split, np.asarray(shift, np.float32)
        self.wrong_every = wrong_every
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

    def describe(self, paths, kind, hw, batch, cache=None, progress=None, views=None):
        out = np.zeros((len(paths), self.m.dim), np.float32)
        for i, p in enumerate(paths):
            if kind == 'aerial':
                out[i, self.m.tile_of[p]] = 1.0
            else:
                q = self.m.query_of[p]
                wrong = self.m.wrong_every and q % self.m.wrong_every == self.m.wrong_every - 1
                out[i, self.m.split.tiles[q, 1 if wrong else 0]] = 1.0
                out[i, self.m.n] = q + 1          # the query's id rides in a dimension no tile uses
        return out

    def localise_tiles(self, branch, tile_paths, grd_raw, side, batch, cache=None, keep_heatmaps=0, progress=None):
        """The heatmap branch on (tile, panorama descriptor) pairs: the query rides in the descriptor."""
        extra = self.m.shift if branch == 'semi' else 0.0
        queries = np.round(grd_raw[:, self.m.n]).astype(int) - 1
        tiles = [self.m.tile_of[p] for p in tile_paths]
        mu = np.array([geometry.delta_to_rc(self.m.delta(q, t) + extra) for q, t in zip(queries, tiles)], np.float32)
        chol = np.tile(np.array([[20.0, 0.0, 20.0]], np.float32), (len(tiles), 1))
        return mu.reshape(-1, 2), chol, {}


@pytest.fixture(scope='module')
def vigor(tiny_vigor):
    return tiny_vigor(3)


def use_standin(monkeypatch, vigor, labels, shift, wrong_every=0):
    """--test runs the Standin instead of a checkpoint's network."""
    split = input_data.load_vigor(vigor, 'test', 'same', labels)
    standin = Standin(split, shift, wrong_every)
    monkeypatch.setattr(train_state, 'latest_checkpoint', lambda d: os.path.join(d, 'ckpt', 'ckpt-1'))
    monkeypatch.setattr(train_state, 'restore_parts', lambda *a: None)
    monkeypatch.setattr(stages, 'build_model', lambda s, c: standin)
    monkeypatch.setattr(embedding, 'Embedder', StandinEmbedder)
    return split


def run_test(vigor, tmp_path, monkeypatch, stage_name, labels, shift, *extra, wrong_every=0,
             settings=None):
    """--test of a Standin through the stage script's main -> (test_results.json, split, results directory)."""
    stage = stages.get(stage_name)
    run_dir = str(tmp_path / stage_name)
    os.makedirs(run_dir, exist_ok=True)
    split = use_standin(monkeypatch, vigor, labels, shift, wrong_every)
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--labels', labels, '--plots', '0', '--test']
    assert cli.main([stage], argv + list(extra)) == 0
    out = os.path.join(run_dir, 'test', settings or f'{labels}_same_north_qall')
    with open(os.path.join(out, 'test_results.json')) as f:
        return json.load(f), split, out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('labels', ['original', 'corrected'])
@pytest.mark.parametrize('stage_name', ['E_1', 'E_2_2'])
def test_exact_localisation_scores_zero_metres(vigor, tmp_path, monkeypatch, stage_name, labels):
    r, split, _ = run_test(vigor, tmp_path, monkeypatch, stage_name, labels, (0.0, 0.0))
    assert r['retrieval']['R@1'] == 1.0
    assert r['localisation']['method'] == {'E_1': 'offset', 'E_2_2': 'heatmap'}[stage_name]
    for s in (r['localisation_positive'], r['localisation']['all'], r['localisation']['top1_correct']):
        assert s['count'] == len(split) and s['mean_m'] < 1e-3
        assert s['median_m_centre'] > 5            # (the tile centre alone is metres away: the test can fail)
    if stage_name == 'E_2_2':                      # the semi-positive branch on each of the 3 semi-positive tiles
        assert r['localisation_semi']['count'] == 3 * len(split) and r['localisation_semi']['mean_m'] < 1e-3


@pytest.mark.parametrize('labels', ['original', 'corrected'])
@pytest.mark.parametrize('stage_name', ['E_1', 'E_2_2'])
def test_known_offset_scores_known_metres(vigor, tmp_path, monkeypatch, stage_name, labels):
    # 30 px south and 40 px west of the truth: 50 px, times the city's m/px (0.114 everywhere with the
    # original labels; SliceMatch's per-city values with the corrected ones)
    r, split, _ = run_test(vigor, tmp_path, monkeypatch, stage_name, labels, (30.0, 40.0))
    expected = 50.0 * split.mpp
    assert len(set(np.round(expected, 6))) == (1 if labels == 'original' else 4)
    s = r['localisation_positive']
    assert s['mean_m'] == pytest.approx(expected.mean(), abs=2e-3)
    assert s['median_m'] == pytest.approx(np.median(expected), abs=2e-3)
    if stage_name == 'E_2_2':   # 50 px against a 20-px isotropic Gaussian: outside 2 sigma (40 px) for every query
        u = r['uncertainty']
        assert u['2sigma'] == 0.0 and u['median_error_px'] == pytest.approx(50, abs=1e-3)
        # NLL: 0.5 x 50^2 / 20^2 + 0.5 log(20^4) + log 2pi; per m^2: + 2 log(m/px) of each query
        nll = 0.5 * 2500 / 400 + np.log(400) + np.log(2 * np.pi)
        assert u['nll_px'] == pytest.approx(nll, abs=1e-4)
        assert u['nll_m'] == pytest.approx(nll + 2 * np.mean(np.log(split.mpp)), abs=1e-4)
        # one sigma for all (20 px): every bin's RMV is 20, its per-axis RMSE sqrt(50^2 / 2)
        assert u['ence']['ence'] == pytest.approx(abs(20 - np.sqrt(1250)) / 20, abs=1e-4)
        assert u['ence']['n_bins'] == 10 and sum(u['ence']['count']) == len(split)
        sel = u['selective']   # ties: the first ceil(f Q) queries, each 50 px x its m/px from the truth
        assert sel['count'] == [int(np.ceil(round(f * len(split), 9))) for f in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
        for n, median in zip(sel['count'], sel['median_m']):
            assert median == pytest.approx(np.median(50 * split.mpp[:n]), abs=2e-3)
        # the semi-positive branch (the Standin's: 2 x the shift, 100 px) against each semi-positive's own label
        semi = r['localisation_semi']
        assert semi['median_px'] == pytest.approx(100, abs=1e-3) and semi['count'] == 3 * len(split)
        assert semi['median_m'] == pytest.approx(np.median(100 * split.mpp), abs=2e-3)
    else:
        assert 'localisation_semi' not in r        # no semi-positive branch in E_1


def test_per_query_file_reproduces_the_json(vigor, tmp_path, monkeypatch):
    """Every third query retrieves its first semi-positive: per_query.csv's rows give back the JSON's medians
    and VIGOR curve, for all queries, the top-1-correct ones, the hit ones and in the positive tile."""
    r, split, out = run_test(vigor, tmp_path, monkeypatch, 'E_2_2', 'original', (30.0, 40.0), wrong_every=3)
    rows = read_csv(os.path.join(out, 'per_query.csv'))
    assert len(rows) == len(split) == r['n_query']
    assert [row['panorama'] for row in rows] == [os.path.basename(p) for p in split.pano_paths]
    col = lambda name, keep=lambda row: True: np.array([float(row[name]) for row in rows if keep(row)])
    loc = r['localisation']
    assert np.median(col('error_m')) == pytest.approx(loc['all']['median_m'], rel=1e-12)
    correct = lambda row: row['top1_is'] == 'positive'
    assert np.median(col('error_m', correct)) == pytest.approx(loc['top1_correct']['median_m'], rel=1e-12)
    assert np.median(col('error_m_positive')) == pytest.approx(r['localisation_positive']['median_m'], rel=1e-12)
    assert np.mean(col('error_m_centre')) == pytest.approx(loc['all']['mean_m_centre'], rel=1e-12)
    # the wrong third: the positive is second (rank 2), the top-1 tile a semi-positive, so every query is a hit
    wrong = np.arange(len(rows)) % 3 == 2
    assert [row['top1_is'] for row in rows] == ['semi-positive' if w else 'positive' for w in wrong]
    np.testing.assert_array_equal(col('rank_of_positive'), np.where(wrong, 2, 1))
    assert [row['top1_tile'] for row in rows] == [os.path.basename(split.tile_paths[split.tiles[q, 1 if w else 0]])
                                                  for q, w in enumerate(wrong)]
    assert loc['top1_correct']['count'] == (~wrong).sum() and loc['top1_hit']['count'] == len(rows)
    assert r['retrieval']['R@1'] == pytest.approx(np.mean(~wrong))
    # localised 50 px from the truth in the semi-positive tile too (its label delta + the shift)
    np.testing.assert_allclose(col('error_m'), 50 * split.mpp, atol=0.2)
    t = np.array(loc['vigor_thresholds_m'])
    brute = [(col('error_m') < t[i]).mean() for i in range(len(t))]
    np.testing.assert_allclose(loc['all']['vigor_accuracy'], brute, atol=1e-12)
    assert loc['all']['recall_within_m'] == {'1': 0.0, '5': 0.0, '10': 1.0}      # every error is ~5.7 m
    # the predicted positions are the ones that give those errors; u of the Standin's 20-px Gaussian: 2*20 + 2*20
    pred = np.stack([col('pred_lat'), col('pred_lon')], 1)
    gt = np.stack([col('gt_lat'), col('gt_lon')], 1)
    np.testing.assert_allclose(geometry.distance_m(pred, gt, 'haversine'), col('error_m'), rtol=1e-9)
    np.testing.assert_allclose(col('u_px'), 80.0, rtol=1e-5)
    np.testing.assert_allclose(col('sigma_px_positive'), 20.0, rtol=1e-5)
    np.testing.assert_allclose(col('nll_px_positive'), 3.125 + np.log(400 * 2 * np.pi), rtol=1e-5)
    assert np.mean(col('nll_m_positive')) == pytest.approx(r['uncertainty']['nll_m'], rel=1e-12)
    for k in (1, 2, 3):
        np.testing.assert_allclose(col(f'error_m_semi{k}'), 100 * split.mpp, rtol=1e-4)
    assert 'yaw_deg' not in rows[0]                              # north-aligned: no yaw column


def test_a_new_head_and_a_stage_metric_through_the_test_command(vigor, tmp_path, monkeypatch):
    """A stage with its own localiser (registered here, testing.py untouched) and its own metrics: --test
    localises with that head and writes the metrics to test_results.json, the log and a figure."""
    split = use_standin(monkeypatch, vigor, 'original', (30.0, 40.0), wrong_every=3)
    standin = stages.build_model(None, None)

    class LabelHead(localisers.Localiser):
        method = 'label head'

        def locate(self, scene, rows, tiles, keep_heatmaps=0):
            return localisers.Located(delta=np.stack([standin.delta(q, t) for q, t in zip(scene.queries[rows], tiles)]))
    monkeypatch.setitem(localisers.REGISTRY, 'label', lambda stage: LabelHead())

    def toy(ev, split):
        return {'share_top1_positive': np.mean(ev.per_query['top1_is'] == 'positive'),
                'mean_rank': np.mean(ev.per_query['rank_of_positive'])}
    stage = dataclasses.replace(stages.get('E_1'), localiser='label', metrics=(toy,))
    run_dir = str(tmp_path / 'E_1')
    os.makedirs(run_dir)
    assert cli.main([stage], TINY + ['--data_root', vigor, '--run_dir', run_dir, '--test']) == 0
    out = os.path.join(run_dir, 'test', 'original_same_north_qall')
    r = json.load(open(os.path.join(out, 'test_results.json')))
    assert r['localisation']['method'] == 'label head'
    assert r['localisation_positive']['mean_m'] == pytest.approx(np.mean(50 * split.mpp), abs=2e-3)
    # every third query retrieves its first semi-positive (rank 2): 24 of 36 right, mean rank 48 / 36
    assert r['stage_metrics'] == pytest.approx({'share_top1_positive': 2 / 3, 'mean_rank': 48 / 36})
    log = open(os.path.join(run_dir, 'train.log')).read()
    assert 'stage metrics: share_top1_positive 0.6667, mean_rank 1.333' in log
    assert os.path.getsize(os.path.join(out, 'stage_metrics.png')) > 1000
    with pytest.raises(ValueError, match='named twice: a'):
        testing.stage_metrics((lambda ev, split: {'a': 1.0}, lambda ev, split: {'a': 2.0, 'b': 0.0}), None, None)


def test_yaw_protocol_is_reported_and_its_yaws_saved(vigor, tmp_path, monkeypatch):
    r, split, out = run_test(vigor, tmp_path, monkeypatch, 'E_1', 'original', (0.0, 0.0), '--yaw', 'random',
                             '--fov', '90', '--max_queries', '5', settings='original_same_yawrandom-s0_fov90-s0_q5')
    assert r['n_query'] == 5 and r['protocol']['name'] == 'yawrandom-s0_fov90-s0'
    assert r['protocol']['text'].startswith('unknown orientation: each panorama rotated by a yaw drawn uniformly')
    names = [os.path.basename(p) for p in split.pano_paths[:5]]
    yaws = read_csv(os.path.join(out, 'yaws.csv'))
    assert [row['panorama'] for row in yaws] == names
    drawn = protocols.seeded_degrees(names, 0, 'yaw')
    np.testing.assert_array_equal([float(row['yaw_drawn_deg']) for row in yaws], drawn)
    shift = np.array([int(row['shift_px']) for row in yaws])
    np.testing.assert_array_equal(shift, np.rint(drawn * 64 / 360).astype(int) % 64)      # 64-px-wide input
    rows = read_csv(os.path.join(out, 'per_query.csv'))
    np.testing.assert_allclose([float(row['yaw_deg']) for row in rows], shift * 360 / 64)
    np.testing.assert_allclose([float(row['fov_heading_deg']) for row in rows],
                               protocols.seeded_degrees(names, 0, 'fov heading'))
    assert [int(row['fov_px']) for row in yaws] == [16] * 5                                # 90 deg of 64 px


def test_two_settings_write_two_directories(vigor, tmp_path, monkeypatch):
    first, _, out1 = run_test(vigor, tmp_path, monkeypatch, 'E_1', 'original', (0.0, 0.0))
    before = snapshot(out1)
    second, _, out2 = run_test(vigor, tmp_path, monkeypatch, 'E_1', 'corrected', (0.0, 0.0), '--max_queries', '5',
                               settings='corrected_same_north_q5')
    assert out1 != out2 and first['n_query'] == 36 and second['n_query'] == 5
    assert snapshot(out1) == before
    assert sorted(os.listdir(os.path.dirname(out1))) == ['corrected_same_north_q5', 'original_same_north_qall']


def test_failed_test_leaves_the_earlier_results_intact(vigor, tmp_path, monkeypatch):
    _, _, out = run_test(vigor, tmp_path, monkeypatch, 'E_1', 'original', (0.0, 0.0))
    before = snapshot(out)
    assert set(os.path.basename(p) for p in before) == {'test_results.json', 'per_query.csv', 'grd_descriptors.npy',
                                                        'sat_descriptors.npy'}

    def disk_full(path, columns):
        with open(path, 'w') as f:
            f.write('query,pan')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(results, 'write_per_query', disk_full)
    with pytest.raises(OSError, match='No space left'):
        run_test(vigor, tmp_path, monkeypatch, 'E_1', 'original', (5.0, 5.0))
    assert snapshot(out) == before
    assert os.listdir(os.path.dirname(out)) == [os.path.basename(out)]     # no half-written directory left


def test_read_only_run_directory(vigor, tmp_path, monkeypatch, capsys):
    """Where the run directory cannot be written (simulated: this test may run as root, whom chmod does not
    stop), --test says in one line where to write instead, before evaluating; with --test_dir it works."""
    run_dir = str(tmp_path / 'E_1')
    mkdtemp = tempfile.mkdtemp

    def refuse(*args, dir=None, **kw):
        if dir and os.path.abspath(dir).startswith(run_dir):
            raise PermissionError(13, 'Permission denied', dir)
        return mkdtemp(*args, dir=dir, **kw)
    monkeypatch.setattr(tempfile, 'mkdtemp', refuse)
    os.makedirs(run_dir)
    use_standin(monkeypatch, vigor, 'original', (0.0, 0.0))
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--plots', '0', '--test']
    capsys.readouterr()
    assert cli.main([stages.get('E_1')], argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'error: {os.path.join(run_dir, "test")}: cannot write the --test results there (Permission denied); '
        'pass --test_dir DIR to write them elsewhere']
    elsewhere = tmp_path / 'elsewhere'
    assert cli.main([stages.get('E_1')], argv + ['--test_dir', str(elsewhere)]) == 0
    assert json.load(open(elsewhere / 'original_same_north_qall' / 'test_results.json'))['n_query'] == 36


def snapshot(folder):
    """path -> bytes of every file under folder."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), 'rb') as f:
                out[os.path.join(d, name)] = f.read()
    return out


# ----------------------------------------------------------------------------- ground_dependence

class ColourModel(tf.Module):
    """A heatmap stand-in whose output is a known function of its inputs' mean colours (VGG-mean-subtracted
    BGR, the descriptors): mu = 320 + 2 x (mean B, mean G) of the panorama (of the tile if sees=False), and
    a 4 x 4 heatmap of constant value 1 + |mean R|. The semi-positive branch adds 10 px to the row."""
    parts = ('pos_fusion', 'pos_decoder', 'semi_fusion', 'semi_decoder')   # no covariance head
    dim = 3

    def __init__(self, sees=True):
        super().__init__()
        self.sees = sees

    def embed_grd(self, grd):
        return tf.reduce_mean(grd, [1, 2])

    def embed_sat(self, sat):
        return tf.reduce_mean(sat, [1, 2]), {}

    def localise(self, branch, sat_desc, grd_desc, skips):
        d = grd_desc if self.sees else sat_desc
        mu = 320.0 + 2.0 * d[:, :2] + (tf.constant([10.0, 0.0]) if branch == 'semi' else 0.0)
        heatmap = tf.ones([tf.shape(d)[0], 4, 4]) * (1.0 + tf.abs(d[:, 2]))[:, None, None]
        return {'heatmap': heatmap, 'mu': mu}


def setting(vigor, *flags):
    cfg = cli.configs([stages.get('E_2_1')], TINY + ['--data_root', vigor] + list(flags))[0]
    split = input_data.load_vigor(vigor, 'test')
    queries = np.arange(len(split))
    names = [os.path.basename(split.pano_paths[q]) for q in queries]
    return cfg, split, queries, protocols.Protocol.from_config(cfg).views(names, cfg.grd_size[1])


BRANCHES = (localisers.Heatmap('pos'), localisers.Heatmap('semi'))


def ground_dependence(embedder, split, queries, cfg, views=None, branches=BRANCHES):
    """localisers.ground_dependence on the queries' panorama descriptors, described as evaluate_model does."""
    grd_raw = embedder.describe([split.pano_paths[q] for q in queries], 'panorama', cfg.grd_size, cfg.eval_batch,
                                views=views)
    scene = localisers.Scene(embedder.model, embedder, split, cfg, np.asarray(queries), grd_raw, None)
    return localisers.ground_dependence(scene, branches)


def expected(desc, rows):
    """By hand from the panoramas' descriptors (mean colours, under their own views): the pairs `rows`, each
    panorama swapped for the next row's, (i + 1) mod n -> (median, mean, p90 shift, median heatmap change)."""
    d = desc[rows].astype(np.float64)
    other = np.roll(d, -1, axis=0)
    shift = np.linalg.norm(2.0 * (other[:, :2] - d[:, :2]), axis=1)
    mass, mass_other = 1 + np.abs(d[:, 2]), 1 + np.abs(other[:, 2])
    return np.median(shift), shift.mean(), np.percentile(shift, 90), np.median(np.abs(mass_other - mass) / mass)


@pytest.mark.parametrize('flags', [(), ('--fov', '90')], ids=['north', 'fov90'])
def test_known_shift_of_a_model_that_reads_the_panorama(vigor, monkeypatch, flags):
    """At most GROUND_PAIRS pairs (10 here) of the first queries; the semi-positive pairs skip queries without
    one; the swapped panorama keeps its own query's view (with a 90-degree field of view, a panorama's mean
    colour depends on its heading, so the wrong view would give other numbers)."""
    monkeypatch.setattr(localisers, 'GROUND_PAIRS', 10)
    cfg, split, queries, views = setting(vigor, *flags)
    assert (views is None) == (not flags)
    split.tiles = split.tiles.copy()
    split.tiles[[2, 5], 1:] = -1                          # queries 2 and 5: no semi-positive in the reference set
    split.tiles[7, 1] = -1                                # query 7: its first present one is the second
    embedder = embedding.Embedder(ColourModel(sees=True))
    desc = embedder.describe(split.pano_paths, 'panorama', cfg.grd_size, cfg.eval_batch, views=views)
    g = ground_dependence(embedder, split, queries, cfg, views)
    assert set(g) == {'pos', 'semi'}
    semi_rows = np.array([0, 1, 3, 4, 6, 7, 8, 9])
    for branch, rows in (('pos', np.arange(10)), ('semi', semi_rows)):
        median, mean, p90, change = expected(desc, rows)
        s = g[branch]
        assert s['n_pairs'] == len(rows)
        assert median > 1.0                               # the stand-in moves: the test can tell 0 from this
        assert s['swap_shift_px_median'] == pytest.approx(median, rel=1e-4, abs=1e-3)
        assert s['swap_shift_px_mean'] == pytest.approx(mean, rel=1e-4, abs=1e-3)
        assert s['swap_shift_px_p90'] == pytest.approx(p90, rel=1e-4, abs=1e-3)
        assert s['heatmap_swap_change'] == pytest.approx(change, rel=1e-4, abs=1e-6) and change > 0


def test_a_model_that_ignores_the_panorama_gives_zero(vigor):
    cfg, split, queries, views = setting(vigor, '--yaw', 'random')
    embedder = embedding.Embedder(ColourModel(sees=False))
    g = ground_dependence(embedder, split, queries, cfg, views)
    for branch in ('pos', 'semi'):
        assert g[branch]['n_pairs'] == len(split)
        assert g[branch]['swap_shift_px_median'] == g[branch]['swap_shift_px_p90'] == 0.0
        assert g[branch]['heatmap_swap_change'] == 0.0


def test_one_pair_cannot_be_swapped(vigor):
    cfg, split, _, _ = setting(vigor)
    g = ground_dependence(embedding.Embedder(ColourModel()), split, np.arange(1), cfg, branches=BRANCHES[:1])
    assert g['pos']['n_pairs'] == 1 and np.isnan(g['pos']['swap_shift_px_median'])


def test_random_init_e21_through_the_test_command(vigor, tmp_path, monkeypatch):
    """The real network, Embedder and --test path (only the checkpoint is skipped: a random-init model):
    test_results.json holds the measure for both branches, and the log its line."""
    monkeypatch.setattr(train_state, 'latest_checkpoint', lambda d: os.path.join(d, 'ckpt', 'ckpt-1'))
    monkeypatch.setattr(train_state, 'restore_parts', lambda *a: None)
    run_dir = str(tmp_path / 'E_2_1')
    os.makedirs(run_dir)
    argv = TINY + ['--data_root', vigor, '--run_dir', run_dir, '--plots', '0', '--max_queries', '12', '--test']
    assert cli.main([stages.get('E_2_1')], argv) == 0
    with open(os.path.join(run_dir, 'test', 'original_same_north_q12', 'test_results.json')) as f:
        r = json.load(f)
    g = r['ground_dependence']
    assert set(g) == {'pos', 'semi'}
    for s in g.values():
        assert s['n_pairs'] == 12
        values = [s[k] for k in ('swap_shift_px_median', 'swap_shift_px_mean', 'swap_shift_px_p90',
                                 'heatmap_swap_change')]
        assert all(v is not None and np.isfinite(v) and v >= 0 for v in values), s
        assert s['swap_shift_px_median'] <= s['swap_shift_px_p90']
    log = open(os.path.join(run_dir, 'train.log')).read()
    median = f'{g["pos"]["swap_shift_px_median"]:.2f}'
    assert f'ground dependence (each panorama swapped for another query\'s, the tile fixed): heatmap: mu moves a ' \
           f'median {median} px' in log and 'semi-positive heatmap: mu moves a median' in log
    print('random-init E_2_1 ground_dependence:', json.dumps(g))


# ----------------------------------------------------------------------------- the ground trunk runs once

def count_ground_images(model):
    """A counter of the panoramas through model.embed_grd, the ground trunk (every path to it: the Embedder's
    compiled descriptor function, any localiser's), added to inside the compiled functions."""
    count = tf.Variable(0, dtype=tf.int64, trainable=False)
    embed = model.embed_grd

    def counted(grd):
        count.assign_add(tf.shape(grd, out_type=tf.int64)[0])
        return embed(grd)
    model.embed_grd = counted
    return count


def full_images(paths, hw, kind, views=None):
    from geoloc.data import pipeline
    return tf.concat([x for x, _ in pipeline.image_dataset(paths, hw, kind, 64, views=views)], 0)


@pytest.mark.parametrize('localiser', ['unet', 'correlation'])
def test_a_heatmap_test_runs_the_ground_trunk_once_per_panorama(vigor, localiser):
    """E_2_2 (both heatmap branches, covariance heads) under a yaw and field-of-view protocol, with the
    semi-positive branch and the ground dependence: each query's panorama goes through the ground trunk once.
    Every number the localisers give equals model.localise on the full images of each pair (the path that
    embedded the panorama again for every pair); the correlation localiser's point moves with the panorama,
    so a pair given another query's descriptor would be tens of pixels off."""
    stage = stages.get('E_2_2')
    flags = ['--data_root', vigor, '--localiser', localiser, '--yaw', 'random', '--fov', '180']
    cfg = cli.configs([stage], TINY + flags)[0]
    split = input_data.load_vigor(vigor, 'test')
    model = stages.build_model(stage, cfg)
    count = count_ground_images(model)
    queries = np.arange(len(split))
    protocol = protocols.Protocol.from_config(cfg)
    ev = testing.evaluate_model(stage, cfg, model, embedding.Embedder(model), split, queries, protocol=protocol,
                                semi_branch=True, ground=True)
    assert int(count.numpy()) == len(queries)
    assert ev.views is not None and (ev.per_query['top1_is'] != 'positive').sum() >= 5      # the top-1 path ran

    grd = full_images(split.pano_paths, cfg.grd_size, 'panorama', ev.views)
    sat = full_images(split.tile_paths, (cfg.sat_size,) * 2, 'aerial')

    def localise(branch, rows, tiles):
        s, skips = model.embed_sat(tf.gather(sat, tiles))
        out = model.localise(branch, s, model.embed_grd(tf.gather(grd, rows)), skips)
        return out['mu'].numpy().astype(np.float64), out['chol'].numpy(), out['heatmap'].numpy()

    pos, top1 = split.tiles[queries, 0], ev.ranks['top1']
    mu, chol, _ = localise('pos', queries, pos)
    np.testing.assert_allclose(ev.delta_pos, geometry.rc_to_delta(mu), atol=0.02)
    np.testing.assert_allclose(ev.chol, chol, rtol=1e-3, atol=1e-3)
    mu, chol, _ = localise('pos', queries, top1)
    pred = geometry.delta_to_position(split.tile_centres[top1], geometry.rc_to_delta(mu), split.mpp, split.metric)
    np.testing.assert_allclose(ev.per_query['error_m'], geometry.distance_m(pred, split.gt_positions, split.metric),
                               atol=0.01)
    np.testing.assert_allclose(ev.per_query['u_px'], model_lib.uncertainty(tf.constant(chol)).numpy(), rtol=1e-3,
                               atol=1e-3)
    q, k = np.nonzero(split.tiles[:, 1:] >= 0)
    mu, _, _ = localise('semi', q, split.tiles[q, k + 1])
    err = np.linalg.norm(mu - geometry.delta_to_rc(split.deltas[q, k + 1].astype(np.float64)), axis=1) * split.mpp[q]
    for j in range(3):
        np.testing.assert_allclose(ev.per_query[f'error_m_semi{j + 1}'][q[k == j]], err[k == j], atol=0.01)
    with_semi = np.flatnonzero((split.tiles[:, 1:] >= 0).any(1))         # (all queries: fewer than GROUND_PAIRS)
    first_semi = split.tiles[with_semi, np.argmax(split.tiles[with_semi, 1:] >= 0, 1) + 1]
    ground_tiles = {'pos': (queries, pos), 'semi': (with_semi, first_semi)}
    for branch, (rows, tiles) in ground_tiles.items():
        mu, _, heat = localise(branch, rows, tiles)
        mu_s, _, heat_s = localise(branch, np.roll(rows, -1), tiles)
        shift = np.linalg.norm(mu_s - mu, axis=1)
        g = ev.results['ground_dependence'][branch]
        assert g['n_pairs'] == len(rows)
        assert g['swap_shift_px_median'] == pytest.approx(np.median(shift), abs=0.02)
        assert g['swap_shift_px_p90'] == pytest.approx(np.percentile(shift, 90), abs=0.02)
        change = np.abs(heat_s - heat).sum((1, 2)) / np.abs(heat).sum((1, 2))
        assert g['heatmap_swap_change'] == pytest.approx(np.median(change), rel=1e-3, abs=1e-6)
        if localiser == 'correlation':
            assert np.median(shift) > 1.0         # the point moves with the panorama: the rows are told apart
