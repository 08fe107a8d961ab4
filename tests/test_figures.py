"""figures.py: every figure is written, readable and shows what it claims."""
import numpy as np

from geoloc.eval import calibration
from geoloc.eval import evaluation as ev
from geoloc.eval import figures


def _check_png(path, min_side=200):
    from matplotlib.image import imread
    img = imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    assert img[..., :3].reshape(-1, 3).std(axis=0).max() > 0.01          # not a single colour


def test_plots(tmp_path):
    rng = np.random.default_rng(0)
    pano = rng.uniform(-100, 100, (320, 640, 3)).astype(np.float32)      # mean-subtracted float
    sat = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:640, :640]
    heatmap = np.exp(-((yy - 300) ** 2 + (xx - 350) ** 2) / 800.0)
    _check_png(figures.plot_localisation(str(tmp_path / 'loc.png'), pano, sat, (320, 320), (300, 350),
                                    heatmap=heatmap, cov=[[400.0, 100.0], [100.0, 200.0]], title='q0'))
    _check_png(figures.plot_localisation(str(tmp_path / 'sub' / 'plain.png'), pano, sat, (100, 500), (120, 480)))
    _check_png(figures.plot_localisation(str(tmp_path / 'miss.png'), pano, sat, None, None))   # top-1 wrong
    ranks = rng.integers(0, 2000, 500)
    _check_png(figures.plot_recall_curve(str(tmp_path / 'recall.png'), ranks, 20000))
    err = rng.exponential(10, 300)
    summary = ev.localisation_summary(err, err + 5, rng.random(300) < 0.6)
    _check_png(figures.plot_accuracy_vs_metres(str(tmp_path / 'acc.png'), summary))
    summary = ev.localisation_summary(err, err + 5, rng.random(300) < 0.6, top1_hit=rng.random(300) < 0.8)
    _check_png(figures.plot_vigor_accuracy(str(tmp_path / 'vigor.png'), summary, summary['all'], 'yaw180'))
    _check_png(figures.plot_sparsification(str(tmp_path / 'sp.png'), ev.sparsification(err + rng.normal(0, 5, 300), err)))
    sigma = rng.uniform(1, 10, 300)
    err = np.linalg.norm(sigma[:, None] * rng.standard_normal((300, 2)), axis=1)
    _check_png(figures.plot_reliability(str(tmp_path / 'rel.png'), calibration.ence(sigma, err)))
    selective = calibration.selective_prediction(sigma, err)
    _check_png(figures.plot_selective_prediction(str(tmp_path / 'sel.png'), selective))
    _check_png(figures.plot_stage_metrics(str(tmp_path / 'own.png'), {'a': 0.5, 'b': -2.0}, 'E_x'), min_side=100)
