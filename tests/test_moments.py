"""geoloc/nn/moments.py: the covariance head that reads the heatmap (--cholesky moments, not the paper's)."""
import numpy as np
import pytest
import tensorflow as tf

import model
from geoloc.nn import moments


def gaussian_map(mu, cov, side=64):
    centres = (np.arange(side) + 0.5) * (640 / side)
    d = np.stack(np.meshgrid(centres - mu[0], centres - mu[1], indexing='ij'), -1)
    return np.exp(-0.5 * np.einsum('hwi,ij,hwj->hw', d, np.linalg.inv(cov), d)).astype(np.float32)


def test_a_gaussian_heatmap_gives_back_its_mean_and_covariance():
    cov = np.array([[900.0, 300.0], [300.0, 400.0]])
    mu, got = moments.heatmap_covariance(tf.constant(gaussian_map((300.0, 350.0), cov)[None]))
    np.testing.assert_allclose(mu.numpy()[0], [300, 350], atol=0.01)
    np.testing.assert_allclose(got.numpy()[0], cov, rtol=1e-3)
    # the factor is the model's convention: model.cholesky_to_cov rebuilds Sigma from it
    np.testing.assert_allclose(model.cholesky_to_cov(moments.cov_to_cholesky(got)).numpy()[0], cov, rtol=1e-4)


def test_the_head_scales_the_heatmap_spread_and_adds_its_floor_and_both_learn():
    head = moments.MomentsCholesky()
    narrow, wide = np.diag([100.0, 100.0]), np.diag([2500.0, 2500.0])
    maps = tf.constant(np.stack([gaussian_map((320, 320), narrow), gaussian_map((320, 320), wide)]))
    u = model.uncertainty(head(maps)).numpy()
    floor2 = moments.INITIAL_FLOOR_PX ** 2
    np.testing.assert_allclose(u, 4 * np.sqrt([100 + floor2, 2500 + floor2]), rtol=2e-3)   # 2 sqrt(l) per axis
    head.log_scale.assign(np.log(2.0) / moments.RATE)
    np.testing.assert_allclose(model.uncertainty(head(maps)).numpy(), 4 * np.sqrt([400 + floor2, 10000 + floor2]),
                               rtol=2e-3)
    with tf.GradientTape() as tape:
        nll = model.uncertainty(head(maps))[0]
    grads = tape.gradient(nll, [head.log_scale, head.log_floor])
    assert all(g is not None and abs(float(g)) > 1e-3 for g in grads)


@pytest.mark.parametrize('localiser', ['unet', 'correlation'])
def test_a_heatmap_branch_takes_its_covariance_from_its_heatmap(localiser):
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.ALL_PARTS, cholesky='moments', localiser=localiser)
    rng = np.random.default_rng(0)
    grd, sat = rng.normal(0, 60, (2, 32, 64, 3)).astype(np.float32), rng.normal(0, 60, (2, 64, 64, 3)).astype(
        np.float32)
    s, skips = m.embed_sat(sat)
    out = m.localise('pos', s, m.embed_grd(grd), skips)
    _, cov = moments.heatmap_covariance(out['heatmap'])
    want = cov.numpy() + moments.INITIAL_FLOOR_PX ** 2 * np.eye(2)
    np.testing.assert_allclose(model.cholesky_to_cov(out['chol']).numpy(), want, rtol=1e-3)
    assert not hasattr(m.pos_cholesky, 'fc1')     # no bottleneck head
