"""layers.py: the 1x1-map shortcuts equal the TF conv ops, values and gradients."""
import numpy as np
import pytest
import tensorflow as tf

from geoloc.nn import layers


@pytest.mark.parametrize('stride,k', [(2, None), (4, None), (5, None), (5, 3), (1, 3)])
def test_one_position_deconv_and_conv_equal_the_conv_ops(stride, k):
    """The 1x1-map shortcuts (a matmul) give the values and gradients of conv2d / conv2d_transpose."""
    init = layers.Init(3)
    deconv, conv = layers.Deconv(init, 12, 7, stride, k=k, bias='glorot'), layers.Conv(init, 12, 9)
    x = tf.random.stateless_normal([4, 1, 1, 12], seed=(1, stride))
    dy_dc = tf.random.stateless_normal([4, stride, stride, 7], seed=(2, stride))
    dy_c = tf.random.stateless_normal([4, 1, 1, 9], seed=(3, stride))

    def reference(x):
        k = deconv.w
        y = tf.nn.conv2d_transpose(x, k, [4, stride, stride, 7], stride, 'SAME')
        return tf.nn.relu(y + deconv.b), tf.nn.relu(tf.nn.conv2d(x, conv.w, 1, 'SAME') + conv.b)

    results = []
    for fn in (reference, lambda x: (deconv(x), conv(x))):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_dc, y_c = fn(x)
            loss = tf.reduce_sum(y_dc * dy_dc) + tf.reduce_sum(y_c * dy_c)
        results.append([y_dc, y_c] + tape.gradient(loss, [x, deconv.w, conv.w]))
    for got, want in zip(results[1], results[0]):
        assert float(tf.reduce_max(tf.abs(want))) > 0
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
