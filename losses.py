"""Losses of the four stages (docs/design.md §4), as pure functions of tensors.

Descriptors passed to the retrieval losses are L2-normalised. Deltas are (dy, dx) pixels of the
640-px tile in VIGOR's convention; points (mu, gt) are (row, col) of that frame.
"""
import math

import tensorflow as tf

from geoloc.data.geometry import TILE_PX


def triplet_loss(grd, sat, alpha=10.0, grd_all=None, sat_all=None, row0=0):
    """Weighted soft-margin triplet loss over all in-batch negatives, both directions averaged.

    d = 2 - 2 sat.grd^T; an anchor i's loss is sum_{j != i} log(1 + exp(alpha (d_ii - d_ij))) / (B - 1),
    averaged over its two directions; the loss of a batch is the mean over anchors, i.e.
    sum_{i != j} ... / (B (B - 1)) as in VIGOR. grd, sat: [b, D] this replica's anchors (normalised);
    grd_all, sat_all: [B, D] the global batch (every replica's rows; default: this batch) whose rows
    row0 .. row0 + b - 1 are this replica's. Returns the mean over this replica's b anchors, so the
    replicas' values averaged give the single-device loss of the global batch exactly.
    """
    grd_all = grd if grd_all is None else grd_all
    sat_all = sat if sat_all is None else sat_all
    b = tf.shape(grd)[0]
    n = tf.cast(tf.shape(grd_all)[0], tf.float32)
    d_pos = 2.0 - 2.0 * tf.reduce_sum(grd * sat, -1)                       # (b,)
    d_g2s = 2.0 - 2.0 * tf.matmul(grd, sat_all, transpose_b=True)          # (b, B) ground anchor
    d_s2g = 2.0 - 2.0 * tf.matmul(sat, grd_all, transpose_b=True)          # (b, B) aerial anchor
    not_self = 1.0 - tf.one_hot(tf.range(b) + row0, tf.shape(grd_all)[0])
    g2s = tf.reduce_sum(tf.nn.softplus(alpha * (d_pos[:, None] - d_g2s)) * not_self)
    s2g = tf.reduce_sum(tf.nn.softplus(alpha * (d_pos[:, None] - d_s2g)) * not_self)
    return (g2s + s2g) / 2.0 / (tf.cast(b, tf.float32) * (n - 1.0))


def batch_triplet_loss(emb, alpha):
    """triplet_loss of a training step's embeddings (embedding.embed_batch): this replica's anchors against
    the global batch."""
    return triplet_loss(emb['grd'], emb['sat'], alpha, emb['grd_all'], emb['sat_all'], emb['row0'])


def iou(delta):
    """VIGOR's IoU proxy of a tile with a 640-px window centred on the point: [B, 2] -> [B]."""
    overlap = (1.0 - tf.abs(delta[:, 0]) / TILE_PX) * (1.0 - tf.abs(delta[:, 1]) / TILE_PX)
    return 1.0 / (1.0 - overlap / 2.0) - 1.0


def iou_ratio(delta_pos, delta_semi):
    return iou(delta_semi) / iou(delta_pos)


def iou_ratio_loss(grd, sat_pos, sat_semi, delta_pos, delta_semi):
    """VIGOR's IoU-aware loss: mean((s2/s1 - IoU(semi)/IoU(pos))^2) / 10 with cosine s1, s2."""
    s1 = tf.reduce_sum(grd * sat_pos, -1)
    s2 = tf.reduce_sum(grd * sat_semi, -1)
    return tf.reduce_mean((s2 / s1 - iou_ratio(delta_pos, delta_semi)) ** 2) / 10.0


def offset_loss(pred, delta):
    """VIGOR offset loss: mean(sum (pred - delta/320)^2) / 100; pred = raw head output [B, 2] (float16 under
    mixed precision: the loss is computed in float32)."""
    pred = tf.cast(pred, tf.float32)
    return tf.reduce_mean(tf.reduce_sum((pred - delta / (TILE_PX / 2)) ** 2, -1)) / 100.0


def heatmap_loss(mu, gt):
    """E_2_1: mean Euclidean distance (pixels of the 640 frame) / 10000.

    The distance's gradient at mu == gt is taken as 0 (tf.norm's would be 0/0 = NaN there).
    """
    sq = tf.reduce_sum((gt - mu) ** 2, -1)
    dist = tf.where(sq > 0, tf.sqrt(tf.where(sq > 0, sq, 1.0)), 0.0)
    return tf.reduce_mean(dist) / 10000.0


def cell_cross_entropy(logits, gt):
    """Cross-entropy of a [B, h, w] map of logits over the tile's cells to the cell holding gt [B, 2] (row, col
    of the 640 frame); a pair whose gt lies outside the tile (a corrected semi-positive label) counts 0.
    Mean over B."""
    logits = tf.cast(logits, tf.float32)
    h, w = logits.shape[1], logits.shape[2]
    row = tf.cast(tf.floor(gt[:, 0] / (TILE_PX / h)), tf.int32)
    col = tf.cast(tf.floor(gt[:, 1] / (TILE_PX / w)), tf.int32)
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    cell = tf.clip_by_value(row, 0, h - 1) * w + tf.clip_by_value(col, 0, w - 1)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=cell, logits=tf.reshape(logits, [-1, h * w]))
    return tf.reduce_mean(tf.where(inside, ce, 0.0))


def gaussian_nll(mu, chol, gt, form='corrected', eps=1e-6):
    """Bivariate Gaussian NLL of gt under N(mu, Sigma), Sigma = L L^T, L = [[l0, 0], [l1, l2]]; mean over B.

    'corrected': 1/2 log(det Sigma + eps) + 1/2 r^T Sigma^-1 r + log 2 pi (optimum: the calibrated
    Sigma = E[r r^T]). 'original' (the released formula): mean(1/2 log det Sigma) + mean(r^T Sigma^-1 r),
    no 1/2 on the Mahalanobis term, no eps, no constant (optimum: Sigma = 2 E[r r^T], so its u is sqrt 2
    times a calibrated model's). The Mahalanobis term is solved through L (z = L^-1 r), never by
    inverting Sigma.
    """
    l0, l1, l2 = chol[:, 0], chol[:, 1], chol[:, 2]
    r = gt - mu
    z0 = r[:, 0] / l0
    z1 = (r[:, 1] - l1 * z0) / l2
    maha = z0 * z0 + z1 * z1
    if form == 'original':
        return tf.reduce_mean(0.5 * tf.math.log((l0 * l2) ** 2)) + tf.reduce_mean(maha)
    if form != 'corrected':
        raise ValueError(f"form must be 'corrected' or 'original', got {form!r}")
    log_det = tf.math.log((l0 * l2) ** 2 + eps)
    return tf.reduce_mean(0.5 * log_det + 0.5 * maha + math.log(2.0 * math.pi))


def uncertainty_weight(u, a=0.3, b=75.0, c=2.0):
    """E_3's W_m = 1 / (1 + c exp(a (b - u))): near 0 for confident (small u) pairs, near 1 for vague."""
    return 1.0 / (1.0 + c * tf.exp(a * (b - u)))


def uncertainty_ratio_loss(grd, sat_pos, sat_semi, delta_pos, delta_semi, u_semi, a=0.3, b=75.0, c=2.0):
    """E_3: W = 1 + W_m (ratio s1/s2 - 1) under stop-gradient; mean((W s2/s1 - ratio)^2).

    With W_m = 1 the target is met exactly (no push); with W_m = 0 it is VIGOR's ratio loss x 10.
    """
    s1 = tf.reduce_sum(grd * sat_pos, -1)
    s2 = tf.reduce_sum(grd * sat_semi, -1)
    ratio = iou_ratio(delta_pos, delta_semi)
    w_m = uncertainty_weight(u_semi, a, b, c)
    weight = tf.stop_gradient(1.0 + w_m * (ratio * s1 / s2 - 1.0))
    return tf.reduce_mean((weight * s2 / s1 - ratio) ** 2)


def u_on_original_scale(u, nll_form):
    """E_3's constants (b = 75 px) were tuned on u of the released NLL, whose optimum Sigma is twice the
    calibrated one: u of a model trained with the corrected NLL is put back on that scale (x sqrt 2)."""
    return u * math.sqrt(2.0) if nll_form == 'corrected' else u
