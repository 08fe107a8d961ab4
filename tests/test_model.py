"""Model shapes, soft-argmax, covariance algebra and the VGG16 npy loader."""
import numpy as np
import pytest
import tensorflow as tf

from geoloc.nn import layers
import model

def tiny(parts=model.ALL_PARTS, **kw):
    return model.CrossViewModel((32, 64), 64, width=0.0625, parts=parts, **kw)


def test_descriptor_and_decoder_sizes():
    m = tiny()
    grd = tf.zeros([2, 32, 64, 3])
    sat = tf.zeros([2, 64, 64, 3])
    g = m.embed_grd(grd)
    s, skips = m.embed_sat(sat)
    assert g.shape == (2, m.dim) and s.shape == (2, m.dim)
    assert m.dim == 8 * model.channels(512, 0.0625)
    assert {k: v.shape[1] for k, v in skips.items()} == {'conv1_2': 64, 'conv2_2': 32, 'conv3_3': 16,
                                                         'conv4_3': 8, 'conv5_3': 4}
    out = m.localise('pos', s, g, skips)
    assert out['heatmap'].shape == (2, 128, 128)      # twice the aerial input side
    assert out['mu'].shape == (2, 2) and out['chol'].shape == (2, 3)
    assert np.all(out['chol'].numpy()[:, [0, 2]] > 0)
    assert m.offset(s, g).shape == (2, 2)


def test_decoder_output_is_twice_input_at_128():
    m = model.CrossViewModel((32, 64), 128, width=0.0625, parts=model.RETRIEVAL_PARTS + model.HEATMAP_PARTS)
    s, skips = m.embed_sat(tf.zeros([1, 128, 128, 3]))
    out = m.localise('semi', s, m.embed_grd(tf.zeros([1, 32, 64, 3])), skips)
    assert out['heatmap'].shape == (1, 256, 256)
    assert 'chol' not in out


def test_parts_are_built_only_when_asked():
    m = tiny(parts=model.RETRIEVAL_PARTS)
    assert not hasattr(m, 'offset_head') and not hasattr(m, 'pos_decoder')
    with pytest.raises(ValueError):
        tiny(parts=('nonsense',))
    with pytest.raises(ValueError):
        model.CrossViewModel((32, 64), 96, width=0.0625, parts=model.ALL_PARTS)   # 96 % 64 != 0


def test_same_seed_same_weights():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    wa, wb, wc = (x.trainable_variables[5].numpy() for x in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


def test_soft_argmax_of_one_hot_returns_that_pixel():
    h = np.zeros((1, 128, 128), np.float32)
    h[0, 40, 100] = 1.0
    mu = model.soft_argmax(tf.constant(h)).numpy()[0]
    # pixel centres in the 640 frame: (i + 0.5) * 5
    np.testing.assert_allclose(mu, [40.5 * 5, 100.5 * 5], rtol=1e-5)


def test_soft_argmax_zero_heatmap_is_finite():
    h = tf.Variable(tf.zeros([1, 8, 8]))
    with tf.GradientTape() as tape:
        mu = model.soft_argmax(h)
    assert np.all(np.isfinite(mu.numpy())) and np.all(np.isfinite(tape.gradient(mu, h).numpy()))


def test_cov_and_uncertainty():
    chol = tf.constant([[3.0, 0.0, 2.0], [2.0, 1.0, 1.0]])
    cov = model.cholesky_to_cov(chol).numpy()
    np.testing.assert_allclose(cov[0], [[9, 0], [0, 4]])
    np.testing.assert_allclose(cov[1], [[4, 2], [2, 2]])
    u = model.uncertainty(chol).numpy()
    np.testing.assert_allclose(u[0], 2 * 3 + 2 * 2, rtol=1e-5)
    lam = np.linalg.eigvalsh(cov[1])
    np.testing.assert_allclose(u[1], 2 * np.sqrt(lam).sum(), rtol=1e-5)


def test_vgg16_npy_loader(tmp_path):
    m = model.CrossViewModel((32, 64), 64, width=1.0, parts=model.RETRIEVAL_PARTS)
    rng = np.random.default_rng(0)
    weights = {conv.name: [rng.normal(size=conv.w.shape).astype(np.float32),
                           rng.normal(size=conv.b.shape).astype(np.float32)] for conv in m.grd_trunk.convs}
    weights['fc6'] = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]   # ignored, as in the real file
    path = tmp_path / 'vgg16.npy'
    np.save(path, weights, allow_pickle=True)
    read = model.read_vgg16_npy(str(path))
    assert m.grd_trunk.vgg16_mismatch(read) == ''
    m.sat_trunk.load_weights(read)
    np.testing.assert_array_equal(m.sat_trunk.convs[4].w.numpy(), weights['conv3_1'][0])
    small = tiny(parts=model.RETRIEVAL_PARTS)
    assert small.grd_trunk.vgg16_mismatch(read).startswith('layer conv1_1 has shape (3, 3, 3, 64), this network')
    with pytest.raises(ValueError, match='conv1_1'):
        small.grd_trunk.load_weights(read)
    (tmp_path / 'bad.npy').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='unreadable ImageNet VGG16 weights'):
        model.read_vgg16_npy(str(tmp_path / 'bad.npy'))


def test_deconv0_output_rows_and_columns_3_4_ignore_the_input():
    """The original's first decoder layer: 3x3 kernel, stride 5, SAME, on a 1x1 map -> 5x5, of which only
    the top-left 3x3 depends on the input; rows and columns 3-4 are relu(bias)."""
    dec = model.HeatmapDecoder(model.Init(0), 16, 320, width=1 / 64,
                               trunk_channels={s: 4 for s in model.SKIP_LAYERS})
    assert dec.deconv0.w.shape[:2] == (3, 3) and dec.deconv0.stride == 5
    a = dec.deconv0(tf.random.stateless_normal([2, 1, 1, 16], seed=(0, 1))).numpy()
    b = dec.deconv0(tf.random.stateless_normal([2, 1, 1, 16], seed=(0, 2))).numpy()
    assert a.shape == (2, 5, 5, 32)
    relu_bias = np.maximum(dec.deconv0.b.numpy(), 0)
    for out in (a, b):
        np.testing.assert_array_equal(out[:, 3:, :, :], np.broadcast_to(relu_bias, out[:, 3:, :, :].shape))
        np.testing.assert_array_equal(out[:, :, 3:, :], np.broadcast_to(relu_bias, out[:, :, 3:, :].shape))
    assert not np.allclose(a[:, :3, :3], b[:, :3, :3])


def test_initial_uncertainty_is_the_originals_scale():
    """No x32: at initialisation u is ~4.5 px (Sigma ~ [[1, 1], [1, 2]] for the original's elu+1), at width 1."""
    head = model.CholeskyHead(model.Init(0), 2048, width=1.0)
    original = model.CholeskyHead(model.Init(0), 2048, width=1.0, kind='original')
    bottleneck = tf.random.stateless_normal([256, 2048], seed=(4, 2)) * 3.0
    for h in (head, original):
        u = model.uncertainty(h(bottleneck)).numpy()
        assert 3.0 < np.mean(u) < 6.0, np.mean(u)
    chol = original(bottleneck).numpy()
    assert np.all(chol > 0)                                   # the original forces rho > 0
    assert np.any(head(bottleneck).numpy()[:, 1] < 0)         # the port's off-diagonal is free


def test_initialisations_follow_the_original():
    init = model.Init(0)
    fusion = model.Fusion(init, 64, width=1 / 16)
    assert np.all(fusion.fc1.b.numpy() == 0.1) and abs(fusion.fc1.w.numpy().std() - 0.005 * 0.88) < 5e-4
    head = model.CholeskyHead(init, 64, width=1 / 16)
    assert np.all(head.fc2.b.numpy() == 0)
    limit = np.sqrt(6 / (32 + 3))
    assert np.abs(head.fc2.w.numpy()).max() <= limit and np.abs(head.fc2.w.numpy()).max() > 0.8 * limit
    offset = model.OffsetHead(init, 64, width=1 / 16)
    assert np.all(offset.fc2.b.numpy() == 0.1) and np.any(offset.fc2.w.numpy() != 0)
    assert not np.any(model.OffsetHead(init, 64, 1 / 16, zero_init=True).fc2.w.numpy())
    dec = model.HeatmapDecoder(init, 16, 64, width=1 / 64, trunk_channels={s: 4 for s in model.SKIP_LAYERS})
    b = dec.conv0.b.numpy()                                  # glorot-normal biases: std ~ sqrt(1/n)/0.88
    assert np.any(b != 0) and np.abs(b).max() < 2 * np.sqrt(1 / len(b)) / 0.87962566 + 1e-6


def released_e2_2_parameters():
    """The paper E_2_2 network's parameter count, from the layer list of the released architecture (docs/design.md §3),
    written out independently of model.py: 320x640 ground, 320x320 aerial, width 1."""
    conv = lambda cin, cout, k=3: k * k * cin * cout + cout
    vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    trunk = sum(conv(a, b) for a, b in vgg)                                  # 14,714,688 (VGG16's convs)
    safa = lambda hw: 8 * (hw * hw // 2 + hw // 2) + 8 * (hw // 2 * hw + hw)  # 8 heads: hw -> hw/2 -> hw
    fusion = (8192 * 4096 + 4096) + (4096 * 2048 + 2048)
    decoder = (conv(2048, 2048)                                # deconv0: 3x3, stride 5 on the 1x1 map
               + conv(2048, 2048) + conv(2048, 1024) + conv(1024, 512) + conv(512, 512))
    cin = 512
    for cout, skip in ((256, 512), (128, 512), (64, 256), (32, 128), (16, 64)):
        decoder += conv(cin, cout) + conv(cout + skip, cout) + conv(cout, cout)   # deconv x2, concat, 2 convs
        cin = cout
    decoder += conv(16, 8) + conv(8, 4) + conv(4, 1)             # deconv to 640, conv 4, conv 1
    cholesky = (2048 * 512 + 512) + (512 * 3 + 3)
    return 2 * trunk + safa(200) + safa(100) + 2 * (fusion + decoder + cholesky)


def built_shapes(monkeypatch, build):
    """The shapes of the variables `build()` creates, without drawing or allocating their values: the
    initialisers return zero views and `variable` records each shape instead of making a tf.Variable."""
    shapes = []
    zeros = lambda self, shape, *args: np.broadcast_to(np.float32(0), shape)
    with monkeypatch.context() as m:
        m.setattr(layers.Init, 'truncated_normal', zeros)
        m.setattr(layers.Init, 'glorot_uniform', zeros)
        record = lambda value, name: shapes.append(np.shape(value)) or value
        m.setattr(layers, 'variable', record)
        m.setattr(model, 'variable', record)
        build()
    return shapes


def test_shape_count_equals_the_built_models_variables(monkeypatch):
    """The paper-size count below reads shapes only; at tiny size both ways agree, variable for variable."""
    shapes = built_shapes(monkeypatch, tiny)
    assert sorted(shapes) == sorted(tuple(v.shape) for v in tiny().trainable_variables)


def test_paper_e2_2_parameter_count_matches_the_released_architecture(monkeypatch):
    parts = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS + model.CHOLESKY_PARTS
    shapes = built_shapes(monkeypatch, lambda: model.CrossViewModel((320, 640), 320, 1.0, parts))
    assert sum(int(np.prod(s)) for s in shapes) == released_e2_2_parameters() == 328_961_624


def test_taps_seen_on_small_maps():
    # a 3x3 SAME conv on a 1x1 map sees its centre tap only; on 2x2, 2 taps per axis; on 5x5, (2+3+3+3+2)/5 per axis
    assert model.conv_taps(1) == 1 and model.conv_taps(2) == 4 and model.conv_taps(5) == pytest.approx(2.6 ** 2)
    # the stride-5 first layer on the 1x1 bottleneck: 1 tap at each of the 3x3 positions it reaches;
    # a stride-2 transposed conv on 5x5: per axis 1 tap at even outputs, 2 at odd ones but the last
    assert model.deconv_taps(1, 5) == 1 and model.deconv_taps(5, 2) == pytest.approx((14 / 10) ** 2)


def test_scaled_decoder_init_scales_the_small_map_layers_only():
    parts = model.RETRIEVAL_PARTS + model.HEATMAP_PARTS
    released = model.CrossViewModel((32, 64), 128, 0.0625, parts)
    scaled = model.CrossViewModel((32, 64), 128, 0.0625, parts, decoder_init='scaled')
    a, b = released.pos_decoder, scaled.pos_decoder                       # side 128: s = 2
    np.testing.assert_allclose(b.deconv0.w.numpy(), 3 * a.deconv0.w.numpy(), rtol=1e-6)   # 1 of 9 taps
    np.testing.assert_allclose(b.conv1a.w.numpy(), np.sqrt(9 / model.conv_taps(4)) * a.conv1a.w.numpy(), rtol=1e-6)
    assert not b.conv0.b.numpy().any() and a.conv0.b.numpy().any()
    np.testing.assert_array_equal(b.stages[0][1].w.numpy(), a.stages[0][1].w.numpy())     # after the first skip


def test_correlation_localiser_sees_the_panorama():
    m = tiny(localiser='correlation')
    rng = np.random.default_rng(0)
    grd = tf.constant(rng.normal(0, 60, (4, 32, 64, 3)), tf.float32)
    sat = tf.repeat(tf.constant(rng.normal(0, 60, (1, 64, 64, 3)), tf.float32), 4, 0)     # one tile for all
    g = m.embed_grd(grd)
    s, skips = m.embed_sat(sat)
    out = m.localise('pos', s, g, skips)
    assert out['heatmap'].shape == out['logits'].shape == (4, 16, 16) and out['chol'].shape == (4, 3)
    np.testing.assert_allclose(tf.reduce_sum(out['heatmap'], [1, 2]), 1.0, rtol=1e-5)
    swapped = m.localise('pos', s, tf.roll(g, 1, 0), skips)
    assert np.median(np.linalg.norm(swapped['mu'] - out['mu'], axis=1)) > 1.0     # px of the 640 frame
    with pytest.raises(ValueError):
        tiny(localiser='mlp')
