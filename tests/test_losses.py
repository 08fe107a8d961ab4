"""Losses against hand-computed numpy values (docs/design.md §4)."""
import math

import numpy as np
import pytest
import tensorflow as tf

import losses
import model


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_triplet_matches_numpy():
    rng = np.random.default_rng(0)
    grd, sat = _unit(rng.normal(size=(5, 7))), _unit(rng.normal(size=(5, 7)))
    d = 2 - 2 * sat @ grd.T            # d[i, j] = aerial i vs ground j
    b, alpha = 5, 10.0
    g2s = s2g = 0.0
    for i in range(b):
        for j in range(b):
            if i != j:
                g2s += math.log1p(math.exp(alpha * (d[i, i] - d[j, i])))  # ground i against aerial j
                s2g += math.log1p(math.exp(alpha * (d[i, i] - d[i, j])))  # aerial i against ground j
    expected = (g2s + s2g) / 2 / (b * (b - 1))
    got = losses.triplet_loss(tf.constant(grd, tf.float32), tf.constant(sat, tf.float32), alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_triplet_two_by_two_by_hand():
    # grd = sat = identity rows: d_pos = 0, d_neg = 2 -> log(1 + e^-20) per pair.
    eye = tf.eye(2)
    np.testing.assert_allclose(losses.triplet_loss(eye, eye, 10.0).numpy(), math.log1p(math.exp(-20)), rtol=1e-4)


def test_triplet_replica_means_average_to_global():
    # two replicas of 3 anchors each, every negative from the global batch of 6: each returns the mean over
    # its own anchors, so the two values averaged are the single-device loss
    rng = np.random.default_rng(1)
    grd = tf.constant(_unit(rng.normal(size=(6, 4))), tf.float32)
    sat = tf.constant(_unit(rng.normal(size=(6, 4))), tf.float32)
    full = losses.triplet_loss(grd, sat)
    parts = [losses.triplet_loss(grd[r:r + 3], sat[r:r + 3], 10.0, grd, sat, row0=r) for r in (0, 3)]
    np.testing.assert_allclose(float(parts[0] + parts[1]) / 2, float(full), rtol=1e-6)
    assert abs(float(parts[0]) - float(parts[1])) > 1e-4      # (the two halves differ: the test can fail)


def test_iou_and_ratio_loss():
    # delta (0, 0): overlap 1 -> IoU = 1/(1 - 1/2) - 1 = 1.
    # delta (320, 0): overlap 0.5 -> IoU = 1/(1 - 0.25) - 1 = 1/3.
    d0, d1 = tf.constant([[0.0, 0.0]]), tf.constant([[320.0, 0.0]])
    np.testing.assert_allclose(losses.iou(d0).numpy(), [1.0], rtol=1e-6)
    np.testing.assert_allclose(losses.iou(d1).numpy(), [1 / 3], rtol=1e-6)
    grd = tf.constant([[1.0, 0.0]])
    pos = tf.constant([[0.8, 0.6]])     # s1 = 0.8
    semi = tf.constant([[0.6, 0.8]])    # s2 = 0.6
    # ((0.6 / 0.8) - (1/3) / 1)^2 / 10
    expected = (0.75 - 1 / 3) ** 2 / 10
    got = losses.iou_ratio_loss(grd, pos, semi, d0, d1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_offset_loss():
    pred = tf.constant([[0.5, -0.25], [0.0, 0.0]])
    delta = tf.constant([[160.0, -80.0], [32.0, 64.0]])   # /320 -> (0.5,-0.25), (0.1, 0.2)
    expected = (0.0 + (0.01 + 0.04)) / 2 / 100
    np.testing.assert_allclose(losses.offset_loss(pred, delta).numpy(), expected, rtol=1e-5)


def test_heatmap_loss():
    mu = tf.constant([[0.0, 0.0], [10.0, 10.0]])
    gt = tf.constant([[3.0, 4.0], [10.0, 10.0]])
    np.testing.assert_allclose(losses.heatmap_loss(mu, gt).numpy(), (5.0 + 0.0) / 2 / 10000, rtol=1e-6)


def _nll_numpy(mu, cov, gt, eps):
    r = gt - mu
    return 0.5 * math.log(np.linalg.det(cov) + eps) + 0.5 * r @ np.linalg.inv(cov) @ r + math.log(2 * math.pi)


def _chol(l0, l1, l2):
    return np.array([[l0, 0.0], [l1, l2]])


def test_nll_identity_diagonal_correlated():
    cases = [(1.0, 0.0, 1.0), (3.0, 0.0, 0.5), (2.0, -1.5, 1.2)]
    mu, gt = np.array([10.0, 20.0]), np.array([12.0, 17.0])
    for l0, l1, l2 in cases:
        L = _chol(l0, l1, l2)
        expected = _nll_numpy(mu, L @ L.T, gt, 1e-6)
        got = losses.gaussian_nll(tf.constant([mu], tf.float32), tf.constant([[l0, l1, l2]], tf.float32),
                                  tf.constant([gt], tf.float32), eps=1e-6)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # identity covariance by hand: 1/2 log(1) + 1/2 (4 + 9) + log 2 pi
    got = losses.gaussian_nll(tf.constant([mu], tf.float32), tf.constant([[1.0, 0.0, 1.0]]), tf.constant([gt], tf.float32), eps=0.0)
    np.testing.assert_allclose(got.numpy(), 6.5 + math.log(2 * math.pi), rtol=1e-6)


def test_nll_near_singular_is_finite_with_finite_gradients():
    mu = tf.Variable([[5.0, 5.0]])
    chol = tf.Variable([[1e-4, 50.0, 1e-4]])    # Sigma nearly rank one
    gt = tf.constant([[5.5, 4.0]])
    with tf.GradientTape() as tape:
        nll = losses.gaussian_nll(mu, chol, gt)
    grads = tape.gradient(nll, [mu, chol])
    assert np.isfinite(nll.numpy())
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_released_nll_formula():
    # mean(1/2 log det Sigma) + mean(r^T Sigma^-1 r): no 1/2 on the Mahalanobis term, no eps, no constant.
    # Sigma = diag(4, 1) (l0 = 2, l2 = 1), r = (2, -3): 1/2 log 4 + (4/4 + 9/1) = log 2 + 10
    got = losses.gaussian_nll(tf.constant([[10.0, 20.0]]), tf.constant([[2.0, 0.0, 1.0]]),
                              tf.constant([[12.0, 17.0]]), form='original')
    np.testing.assert_allclose(got.numpy(), math.log(2.0) + 10.0, rtol=1e-6)


def test_nll_optima_differ_by_two():
    # For residuals of covariance C, the corrected NLL is lowest at Sigma = C, the released one at Sigma = 2 C:
    # scan Sigma = s C and find the minimising s.
    rng = np.random.default_rng(0)
    r = rng.multivariate_normal([0, 0], [[9.0, 2.0], [2.0, 4.0]], size=4000).astype(np.float32)
    c = np.cov(r.T, bias=True)
    best = {}
    for form in ('corrected', 'original'):
        scores = []
        for s in np.linspace(0.5, 3.0, 51):
            L = np.linalg.cholesky(s * c)
            chol = np.tile([[L[0, 0], L[1, 0], L[1, 1]]], (len(r), 1)).astype(np.float32)
            scores.append(float(losses.gaussian_nll(tf.zeros_like(r), chol, r, form)))
        best[form] = np.linspace(0.5, 3.0, 51)[int(np.argmin(scores))]
    assert best['corrected'] == pytest.approx(1.0, abs=0.05) and best['original'] == pytest.approx(2.0, abs=0.05)


def test_e3_weight_under_corrected_nll_equals_released_for_twice_sigma():
    # A model trained with the corrected NLL predicts Sigma; the released NLL would predict 2 Sigma. E_3 scales
    # u by sqrt 2 under the corrected NLL, so both select the same pairs: u(2 Sigma) = sqrt 2 u(Sigma).
    import model
    rng = np.random.default_rng(2)
    for _ in range(5):
        A = rng.normal(size=(2, 2)) * rng.uniform(1, 60)
        sigma = A @ A.T + np.eye(2)
        L, L2 = np.linalg.cholesky(sigma), np.linalg.cholesky(2 * sigma)
        u = model.uncertainty(tf.constant([[L[0, 0], L[1, 0], L[1, 1]]], tf.float32))
        u2 = model.uncertainty(tf.constant([[L2[0, 0], L2[1, 0], L2[1, 1]]], tf.float32))
        w_corrected = losses.uncertainty_weight(losses.u_on_original_scale(u, 'corrected'))
        w_released = losses.uncertainty_weight(losses.u_on_original_scale(u2, 'original'))
        np.testing.assert_allclose(w_corrected.numpy(), w_released.numpy(), rtol=1e-4, atol=1e-7)


def test_uncertainty_weight_and_e3_loss():
    # W_m = 1 / (1 + c exp(a (b - u))): u = b -> 1 / (1 + c) = 1/3.
    np.testing.assert_allclose(losses.uncertainty_weight(tf.constant([75.0])).numpy(), [1 / 3], rtol=1e-6)
    grd = tf.constant([[1.0, 0.0]])
    pos = tf.constant([[0.8, 0.6]])     # s1 = 0.8
    semi = tf.constant([[0.6, 0.8]])    # s2 = 0.6
    dp, ds = tf.constant([[0.0, 0.0]]), tf.constant([[320.0, 0.0]])   # ratio = 1/3
    ratio, s1, s2 = 1 / 3, 0.8, 0.6
    for u in (10.0, 75.0, 200.0):
        w_m = 1 / (1 + 2 * math.exp(0.3 * (75 - u)))
        w = 1 + w_m * (ratio * s1 / s2 - 1)
        expected = (w * s2 / s1 - ratio) ** 2
        got = losses.uncertainty_ratio_loss(grd, pos, semi, dp, ds, tf.constant([u]))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    # a confident pair (small u) is pushed like VIGOR's ratio loss x 10; a vague one hardly at all
    vague = losses.uncertainty_ratio_loss(grd, pos, semi, dp, ds, tf.constant([200.0]))
    sure = losses.uncertainty_ratio_loss(grd, pos, semi, dp, ds, tf.constant([0.0]))
    assert float(vague) < 1e-6 < float(sure)


def test_e3_weight_is_stop_gradient():
    # With W under stop-gradient, d/ds2 of (W s2/s1 - r)^2 = 2 (W s2/s1 - r) W / s1.
    grd = tf.constant([[1.0, 0.0]])
    semi = tf.Variable([[0.6, 0.8]])
    pos = tf.constant([[0.8, 0.6]])
    u = tf.constant([75.0])
    with tf.GradientTape() as tape:
        loss = losses.uncertainty_ratio_loss(grd, pos, semi, tf.constant([[0.0, 0.0]]), tf.constant([[320.0, 0.0]]), u)
    g = tape.gradient(loss, semi).numpy()[0, 0]      # d s2 / d semi[0] = grd[0] = 1
    ratio, s1, s2, w_m = 1 / 3, 0.8, 0.6, 1 / 3
    w = 1 + w_m * (ratio * s1 / s2 - 1)
    np.testing.assert_allclose(g, 2 * (w * s2 / s1 - ratio) * w / s1, rtol=1e-5)


def test_losses_finite_gradients_on_degenerate_inputs():
    same = tf.Variable(tf.math.l2_normalize(tf.ones([4, 8]), -1))   # identical descriptors
    with tf.GradientTape() as tape:
        loss = losses.triplet_loss(same, same) + losses.iou_ratio_loss(same, same, same, tf.zeros([4, 2]),
                                                                        tf.fill([4, 2], 300.0))
    g = tape.gradient(loss, same)
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(g.numpy()))


# ----------------------------------------------------------------------------- degenerate inputs

def finite(*tensors):
    return all(np.all(np.isfinite(t.numpy())) for t in tensors)


def gradients(loss_fn, *variables):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    return loss, tape.gradient(loss, list(variables))


def test_identical_descriptors_give_finite_gradients():
    same = tf.Variable(tf.math.l2_normalize(tf.ones([4, 8]), -1))     # every grd = every sat = every semi
    d_pos, d_semi, u = tf.zeros([4, 2]), tf.fill([4, 2], 300.0), tf.constant([0.0, 10.0, 75.0, 500.0])
    for fn in (lambda: losses.triplet_loss(same, same),
               lambda: losses.iou_ratio_loss(same, same, same, d_pos, d_semi),
               lambda: losses.uncertainty_ratio_loss(same, same, same, d_pos, d_semi, u)):
        loss, (g,) = gradients(fn, same)
        assert finite(loss, g)


def test_zero_heatmap_gives_finite_gradients():
    heat = tf.Variable(tf.zeros([2, 16, 16]))
    gt = tf.constant([[100.0, 200.0], [320.0, 320.0]])
    loss, (g,) = gradients(lambda: losses.heatmap_loss(model.soft_argmax(heat), gt), heat)
    assert finite(loss, g)
    # through the decoder: a dead last layer (relu of negative logits) gives a zero heatmap
    init = model.Init(0)
    trunk = model.VGG16(init, 0.0625)
    dec = model.HeatmapDecoder(init, 8, 64, 0.0625, {c.name: c.w.shape[-1] for c in trunk.convs})
    dec.logits.b.assign(tf.fill(dec.logits.b.shape, -1e3))
    _, skips = trunk(tf.zeros([2, 64, 64, 3]))
    bottleneck = tf.Variable(tf.ones([2, 8]))
    loss, grads = gradients(lambda: losses.heatmap_loss(model.soft_argmax(dec(bottleneck, skips)), gt),
                            bottleneck, *dec.trainable_variables)
    assert float(tf.reduce_max(dec(bottleneck, skips))) == 0.0
    assert finite(loss, *[g for g in grads if g is not None])


def test_heatmap_loss_at_the_ground_truth_has_zero_gradient():
    # a uniform heatmap puts mu at the tile centre (320, 320); a panorama exactly there: distance 0
    heat = tf.Variable(tf.ones([1, 8, 8]))
    loss, (g,) = gradients(lambda: losses.heatmap_loss(model.soft_argmax(heat), tf.constant([[320.0, 320.0]])), heat)
    assert float(loss) == 0.0 and finite(g)
    mu = tf.Variable([[3.0, 4.0]])
    loss, (g,) = gradients(lambda: losses.heatmap_loss(mu, tf.zeros([1, 2])), mu)
    np.testing.assert_allclose(g.numpy(), [[0.6e-4, 0.8e-4]], rtol=1e-5)   # d|mu|/dmu / 10000 away from 0


def test_near_singular_sigma_gives_finite_gradients():
    mu, gt = tf.Variable([[300.0, 300.0], [10.0, 600.0]]), tf.constant([[320.0, 310.0], [600.0, 10.0]])
    for chol in ([[1e-4, 50.0, 1e-4], [1e-4, 0.0, 1e-4]],       # raw factors: Sigma ~ rank one / ~ 0
                 [[1.0, 1e4, 1.0], [1.0, -1e4, 1.0]]):          # the head's floor with a huge correlation
        chol = tf.Variable(chol)
        loss, grads = gradients(lambda: losses.gaussian_nll(mu, chol, gt), mu, chol)
        assert finite(loss, *grads)
    # through the covariance head: saturated inputs
    head = model.CholeskyHead(model.Init(0), 8, 0.0625)
    x = tf.Variable(tf.constant([[1e4] * 8, [-1e4] * 8, [0.0] * 8]))
    loss, grads = gradients(lambda: losses.gaussian_nll(tf.zeros([3, 2]), head(x), tf.fill([3, 2], 640.0)),
                            x, *head.trainable_variables)
    assert finite(loss, *grads)


def test_cell_cross_entropy_known_answer():
    # uniform logits over 4x4 cells: log 16 for every pair whose truth lies in the tile; one outside counts 0
    logits = tf.zeros([3, 4, 4])
    gt = tf.constant([[10.0, 10.0], [639.0, 0.0], [700.0, 100.0]])
    assert float(losses.cell_cross_entropy(logits, gt)) == pytest.approx(2 * np.log(16) / 3, rel=1e-6)
    # all the mass on the true cell (row 3, col 0 for (639, 0): cells are 160 px): no loss
    sure = np.zeros([1, 4, 4], np.float32)
    sure[0, 3, 0] = 50.0
    assert float(losses.cell_cross_entropy(tf.constant(sure), gt[1:2])) < 1e-12


def test_e3_threshold_from_its_table():
    """--u_b_quantile q: b is the q-quantile of the table's u on the released NLL's scale (x sqrt 2 under the
    corrected NLL), so half the pairs lie on each side of b at q = 0.5; 0 keeps the paper's --u_b."""
    import config
    import train_third_E_3 as e3
    from geoloc.train import u_table
    u = np.array([10.0, 20.0, 30.0, 40.0, 1000.0], np.float32)
    cfg = config.resolve('E_3', {'u_b_quantile': 0.5}, own=e3.SETTINGS)
    assert u_table.weight_threshold(u, cfg) == pytest.approx(30 * math.sqrt(2))
    assert u_table.weight_threshold(u, cfg.replace(nll='original')) == pytest.approx(30)
    assert u_table.weight_threshold(u, cfg.replace(u_b_quantile=0.0)) == 75.0
    w, share = u_table.active_share(u, 30 * math.sqrt(2), cfg)
    assert w[2] == pytest.approx(1 / 3) and share == pytest.approx(0.2)     # W_m = 1 / (1 + c) at u = b


def test_e3_slope_from_its_table_puts_the_asked_share_in_the_active_band():
    """--u_a_band q: a is set so the active band 0.1 < W_m < 0.9 is as wide as the central q of the table's u;
    with b at the median of a uniform u table the band then holds q of the pairs (it is not centred on b:
    ln(9 / c) / a below it, ln(9 c) / a above). 0 keeps the paper's --u_a."""
    import config
    import train_third_E_3 as e3
    from geoloc.train import u_table
    u = np.random.default_rng(0).uniform(100.0, 500.0, 20000).astype(np.float32)
    cfg = config.resolve('E_3', {'u_b_quantile': 0.5, 'u_a_band': 0.4, 'nll': 'original'}, own=e3.SETTINGS)
    a, b = u_table.weight_slope(u, cfg), u_table.weight_threshold(u, cfg)
    assert a == pytest.approx(2 * np.log(9) / (0.4 * 400), rel=0.03)
    _, share = u_table.active_share(u, b, cfg, a)
    assert share == pytest.approx(0.4, abs=0.02)      # (uniform u: any window as wide holds that share)
    _, paper_share = u_table.active_share(u, b, cfg)         # the paper's a = 0.3: a band ~15 px wide
    assert paper_share < 0.05
    assert u_table.weight_slope(u, cfg.replace(u_a_band=0.0)) == 0.3
