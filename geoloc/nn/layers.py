"""The layers of the model as plain tf.Modules, and their seeded initialisers.

Init draws every initial value with numpy from one seed, so the same seed builds bit-identical weights on
any device; the kinds are the original's (VGG: He normal; decoder: glorot-normal kernels and biases; SAFA,
fusion and offset head: VIGOR's fc_layer, truncated normal std 0.005 with bias 0.1; covariance head:
Keras's Dense defaults, glorot-uniform with zero bias).
"""
import math

import numpy as np
import tensorflow as tf


class Init:
    """Seeded numpy initialisers: the same seed builds bit-identical weights on any device."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def truncated_normal(self, shape, std):
        x = self.rng.standard_normal(shape, dtype=np.float32)
        bad = np.abs(x) > 2
        while bad.any():  # resample outside 2 sigma, as tf.truncated_normal does
            x[bad] = self.rng.standard_normal(int(bad.sum()), dtype=np.float32)
            bad = np.abs(x) > 2
        return x * np.float32(std)

    def glorot_normal(self, shape, fan_in, fan_out):
        return self.truncated_normal(shape, math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566)

    def he_normal(self, shape, fan_in):
        return self.truncated_normal(shape, math.sqrt(2.0 / fan_in) / 0.87962566)

    def glorot_uniform(self, shape, fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-limit, limit, shape).astype(np.float32)


def variable(value, name):
    return tf.Variable(value, name=name)


class Conv(tf.Module):
    """3x3 (or kxk) stride-1 SAME convolution, NHWC.

    bias: a number (constant bias) or 'glorot' (glorot-normal on the bias's own 1-D shape, as Keras's
    glorot_normal initialiser does when the original passes it for the biases of the decoder).
    """

    def __init__(self, init, cin, cout, k=3, he=False, bias=0.0, name=None):
        super().__init__(name=name)
        fan_in, fan_out = k * k * cin, k * k * cout
        w = init.he_normal((k, k, cin, cout), fan_in) if he else init.glorot_normal((k, k, cin, cout), fan_in, fan_out)
        self.w = variable(w, 'w')
        self.b = variable(_bias(init, cout, bias), 'b')

    def __call__(self, x, relu=True):
        w = tf.cast(self.w, x.dtype)
        if x.shape[1] == 1 and x.shape[2] == 1:
            # Fires only on a 1x1 map: the decoder's conv0 when the aerial side is 64 (the demo size).
            # Every tap but the centre reads SAME padding, so the conv is the centre tap's matmul (oneDNN
            # ran this conv's weight gradient at 1-2 GFLOP/s: bench_train.py --profile 1). All k*k taps go
            # through one batched matmul, because slicing out the centre tap has a slow gradient.
            taps = tf.matmul(tf.reshape(x, [1, -1, x.shape[3]]), tf.reshape(w, [-1, w.shape[2], w.shape[3]]))
            y = taps[w.shape[0] * w.shape[1] // 2][:, None, None, :]
        else:
            y = tf.nn.conv2d(x, w, 1, 'SAME')
        y = y + tf.cast(self.b, x.dtype)
        return tf.nn.relu(y) if relu else y


def _bias(init, n, bias):
    if bias == 'glorot':
        return init.glorot_normal((n,), n, n)
    return np.full((n,), bias, np.float32)


class Deconv(tf.Module):
    """Stride-s SAME transposed convolution with a k x k kernel (default k = max(3, s)), NHWC, output s x input."""

    def __init__(self, init, cin, cout, stride, k=None, bias=0.0, name=None):
        super().__init__(name=name)
        k = k or max(3, stride)
        self.stride = stride
        self.w = variable(init.glorot_normal((k, k, cout, cin), k * k * cin, k * k * cout), 'w')
        self.b = variable(_bias(init, cout, bias), 'b')

    def __call__(self, x):
        b, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
        s, k, cout, cin = self.stride, self.w.shape[0], self.w.shape[2], self.w.shape[3]
        kernel = tf.cast(self.w, x.dtype)
        if h == 1 and w == 1:
            # One input position (the decoder's first layer, at every size): output (r, c) is that position
            # times tap (o + r, o + c), o = the SAME padding before it, and zero where that tap does not
            # exist (k < s: with k = 3, s = 5 only the top-left 3x3 of the 5x5 output sees the input).
            # One batched matmul instead of a transposed conv whose CPU weight gradient is slow here.
            o = max(k - s, 0) // 2
            taps = tf.matmul(tf.reshape(x, [1, -1, cin]), tf.reshape(kernel, [k * k, cout, cin]), transpose_b=True)
            taps = tf.concat([taps, tf.zeros_like(taps[:1])], 0)                      # row k*k: no tap
            index = [(o + r) * k + o + c if o + r < k and o + c < k else k * k for r in range(s) for c in range(s)]
            y = tf.transpose(tf.reshape(tf.gather(taps, index), [s, s, -1, cout]), [2, 0, 1, 3])
        else:
            out_shape = tf.stack([b, h * s, w * s, cout])
            y = tf.nn.conv2d_transpose(x, kernel, out_shape, s, 'SAME')
            y = tf.ensure_shape(y, [None, h * s, w * s, cout])
        return tf.nn.relu(y + tf.cast(self.b, x.dtype))


class Dense(tf.Module):
    """x W + b. init: 'fc' = VIGOR's fc_layer (truncated normal std 0.005, bias 0.1), 'glorot_uniform'
    (Keras Dense defaults, zero bias) or 'zero' (zero weights and bias)."""

    def __init__(self, init, cin, cout, kind='fc', name=None):
        super().__init__(name=name)
        if kind == 'fc':
            w, b = init.truncated_normal((cin, cout), 0.005), np.full((cout,), 0.1, np.float32)
        elif kind == 'glorot_uniform':
            w, b = init.glorot_uniform((cin, cout), cin, cout), np.zeros((cout,), np.float32)
        elif kind == 'zero':
            w, b = np.zeros((cin, cout), np.float32), np.zeros((cout,), np.float32)
        else:
            raise ValueError(f'unknown Dense initialisation {kind!r}')
        self.w = variable(w, 'w')
        self.b = variable(b, 'b')

    def __call__(self, x):
        return tf.matmul(x, tf.cast(self.w, x.dtype)) + tf.cast(self.b, x.dtype)


def channels(c, width):
    """Channel count of a layer that has `c` channels in the paper's network."""
    return max(4, int(round(c * width)))


def conv_taps(n, k=3):
    """Mean number of a k x k SAME convolution's taps that fall inside an n x n map, per output position."""
    per_axis = np.mean([sum(0 <= i + t - k // 2 < n for t in range(k)) for i in range(n)])
    return float(per_axis ** 2)


def deconv_taps(n, s, k=3):
    """Mean number of taps that reach an output position of a stride-s, k x k SAME transposed convolution on an
    n x n map, over the positions that some tap reaches (on a 1x1 map with k < s the rest is bias alone)."""
    o = max(k - s, 0) // 2
    counts = np.zeros(n * s)
    for i in range(n):
        for t in range(k):
            r = i * s + t - o                      # (o: the SAME padding before the first output)
            if 0 <= r < n * s:
                counts[r] += 1
    per_axis = counts[counts > 0].mean()
    return float(per_axis ** 2)


def unit_rms(x, eps=1e-6):
    """x / its root mean square over every axis but the batch's."""
    axes = list(range(1, len(x.shape)))
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axes, keepdims=True) + eps)


class LayerNorm(tf.Module):
    """Normalisation over the last axis with a learnt gain and bias (1 and 0 at initialisation)."""

    def __init__(self, dim, eps=1e-5, name=None):
        super().__init__(name=name)
        self.gain = variable(np.ones((dim,), np.float32), 'gain')
        self.bias = variable(np.zeros((dim,), np.float32), 'bias')
        self.eps = eps

    def __call__(self, x):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + self.eps) * tf.cast(self.gain, x.dtype) + tf.cast(self.bias, x.dtype)
