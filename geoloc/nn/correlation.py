"""The correlation localiser (--localiser correlation; not the paper's U-Net): a heatmap that sees the
panorama by construction. Why the U-Net's does not: docs/faithfulness.md, "Does the released U-Net see the
panorama?"."""
import numpy as np
import tensorflow as tf

from geoloc.nn.layers import Dense, LayerNorm


class CorrelationLocaliser(tf.Module):
    """A localiser that sees the panorama by construction (--localiser correlation; NOT the paper's U-Net).

    The ground descriptor, layer-normalised and projected to `dim`, is a query; the aerial trunk's conv3_3
    map with conv4_3 upsampled beside it, layer-normalised per cell and projected to `dim`, gives one key
    per cell (side S/4 for an S-px tile); the heatmap is the softmax over cells of query . key / sqrt(dim).
    Every cell's score is linear in the query, so the heatmap moves with the panorama from the first step,
    and the gradient of a cross-entropy to the true cell reaches both trunks through two layers.
    """

    def __init__(self, init, grd_dim, trunk_channels, dim=64, name=None):
        super().__init__(name=name)
        cells = trunk_channels['conv3_3'] + trunk_channels['conv4_3']
        self.grd_norm = LayerNorm(grd_dim, name='grd_norm')
        self.query = Dense(init, grd_dim, dim, kind='glorot_uniform', name='query')
        self.sat_norm = LayerNorm(cells, name='sat_norm')
        self.key = Dense(init, cells, dim, kind='glorot_uniform', name='key')
        self.dim = dim

    def __call__(self, grd_desc, skips):
        """grd_desc [B, D] (raw), skips of the aerial trunk -> logits [B, S/4, S/4] over the tile's cells."""
        fine, coarse = skips['conv3_3'], skips['conv4_3']
        coarse = tf.repeat(tf.repeat(coarse, 2, axis=1), 2, axis=2)                 # nearest x2 to conv3_3's side
        feat = self.sat_norm(tf.concat([fine, tf.cast(coarse, fine.dtype)], -1))   # (B, h, w, C3 + C4)
        keys = tf.einsum('bhwc,cd->bhwd', feat, tf.cast(self.key.w, feat.dtype)) + tf.cast(self.key.b, feat.dtype)
        query = self.query(self.grd_norm(tf.cast(grd_desc, feat.dtype)))             # (B, dim)
        return tf.einsum('bhwd,bd->bhw', keys, query) / np.sqrt(self.dim).astype(np.float32)


def softmax_map(logits):
    """[B, h, w] logits -> probabilities over the h x w cells (each map sums to 1), float32."""
    logits = tf.cast(logits, tf.float32)
    shape = tf.shape(logits)
    return tf.reshape(tf.nn.softmax(tf.reshape(logits, [shape[0], -1]), -1), shape)
