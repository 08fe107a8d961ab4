"""A covariance head that reads the heatmap (--cholesky moments; NOT the paper's head, which maps the fusion
bottleneck to a Cholesky factor). Sigma = s^2 Sigma_h + f^2 I: Sigma_h is the heatmap's own covariance (its
second moments about its mass centre, the soft-argmax point), s and f are learnt (log s starts at 0, f at
INITIAL_FLOOR_PX). Each is held as log value / RATE: Adam moves a variable by about the learning rate per step
whatever its gradient, and a log scale must be able to move by ~1 within a thousand steps at 1e-4. A heatmap spread over several places (an ambiguous panorama) gives a wide Sigma, one
peak a narrow one; the NLL that trains it reaches the localiser too. Units: pixels of the 640-px frame."""
import math

import numpy as np
import tensorflow as tf

from geoloc.data.geometry import TILE_PX
from geoloc.nn.layers import variable

INITIAL_FLOOR_PX = 4.0
RATE = 100.0


def heatmap_covariance(heatmap, eps=1e-6):
    """heatmap [B, h, w] >= 0 -> (mu [B, 2] (row, col), Sigma_h [B, 2, 2]) of its mass in the 640-px frame."""
    heatmap = tf.cast(heatmap, tf.float32)
    h, w = heatmap.shape[1], heatmap.shape[2]
    p = heatmap / (tf.reduce_sum(heatmap, [1, 2], keepdims=True) + eps)
    rows = (tf.range(h, dtype=tf.float32) + 0.5) * (TILE_PX / h)
    cols = (tf.range(w, dtype=tf.float32) + 0.5) * (TILE_PX / w)
    pr, pc = tf.reduce_sum(p, 2), tf.reduce_sum(p, 1)                     # marginals [B, h], [B, w]
    mr, mc = tf.reduce_sum(pr * rows, 1), tf.reduce_sum(pc * cols, 1)
    dr, dc = rows[None] - mr[:, None], cols[None] - mc[:, None]           # [B, h], [B, w]
    vr, vc = tf.reduce_sum(pr * dr * dr, 1), tf.reduce_sum(pc * dc * dc, 1)
    crc = tf.reduce_sum(p * dr[:, :, None] * dc[:, None, :], [1, 2])
    cov = tf.stack([tf.stack([vr, crc], -1), tf.stack([crc, vc], -1)], -2)
    return tf.stack([mr, mc], -1), cov


def cov_to_cholesky(cov):
    """Sigma [B, 2, 2] (positive definite) -> (l0, l1, l2) with Sigma = L L^T, L = [[l0, 0], [l1, l2]]."""
    l0 = tf.sqrt(cov[:, 0, 0])
    l1 = cov[:, 1, 0] / l0
    l2 = tf.sqrt(tf.maximum(cov[:, 1, 1] - l1 * l1, 1e-12))
    return tf.stack([l0, l1, l2], -1)


class MomentsCholesky(tf.Module):
    """heatmap [B, h, w] -> Cholesky factor [B, 3] of s^2 Sigma_h + f^2 I (see the module docstring)."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.log_scale = variable(np.zeros((), np.float32), 'log_scale')                   # x RATE: log s
        self.log_floor = variable(np.float32(math.log(INITIAL_FLOOR_PX) / RATE), 'log_floor')  # x RATE: log f

    def __call__(self, heatmap):
        _, cov = heatmap_covariance(heatmap)
        s2, f2 = tf.exp(2.0 * RATE * self.log_scale), tf.exp(2.0 * RATE * self.log_floor)
        return cov_to_cholesky(s2 * cov + f2 * tf.eye(2, batch_shape=[1]))
