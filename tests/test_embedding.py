"""embedding.py: the one embedding path — compiled once per model, and E_3's u from the heads alone."""
import numpy as np
import tensorflow as tf

from geoloc.nn import embedding
import model


def test_descriptor_functions_trace_once():
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.RETRIEVAL_PARTS)
    e = embedding.Embedder(m)
    for _ in range(3):
        e.grd(tf.zeros([2, 32, 64, 3]))
        e.sat(tf.zeros([2, 64, 64, 3]))
    e.grd(tf.zeros([5, 32, 64, 3]))       # another batch size (the last, short batch of an epoch)
    e.grd(tf.zeros([3, 32, 64, 3]))
    assert e._sat.experimental_get_tracing_count() == 1
    assert e._grd.experimental_get_tracing_count() <= 2      # reduce_retracing: one generic shape after that


def test_u_from_the_heads_equals_the_decoder_path():
    """E_3's table takes the covariance from fusion + Cholesky head on descriptors; the same pairs through the
    whole localisation branch (decoder included) give the same factors."""
    m = model.CrossViewModel((32, 64), 64, 0.0625, model.ALL_PARTS)
    e = embedding.Embedder(m)
    grd = tf.random.stateless_normal([3, 32, 64, 3], seed=(1, 1)) * 60
    sat = tf.random.stateless_normal([3, 64, 64, 3], seed=(1, 2)) * 60
    via_decoder = e.localiser('semi')(sat, e.grd(grd))['chol'].numpy()
    via_heads = e.cholesky_from_descriptors('semi', e.sat(sat), e.grd(grd), batch=2)
    np.testing.assert_allclose(via_heads, via_decoder, rtol=1e-5)
    other = e.cholesky_from_descriptors('pos', e.sat(sat), e.grd(grd))
    assert not np.allclose(other, via_decoder)                 # the branch matters
