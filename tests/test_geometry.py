"""geometry.py: the 640-px frame, deltas <-> (row, col), deltas <-> positions, metres. Expected values by hand."""
import numpy as np
import pytest
import tensorflow as tf

from geoloc.data import geometry


def test_delta_rc_convention_and_round_trip():
    # 100 px south, 50 px east of the centre: row 320 + 100 = 420, col 320 - (-50) = 370.
    delta = np.array([[100.0, -50.0], [0.0, 0.0], [-320.0, 320.0]], np.float32)
    rc = geometry.delta_to_rc(delta)
    np.testing.assert_array_equal(rc, [[420.0, 370.0], [320.0, 320.0], [0.0, 0.0]])
    assert rc.dtype == np.float32
    np.testing.assert_array_equal(geometry.rc_to_delta(rc), delta)
    # float64 stays float64; a single (2,) point works too
    assert geometry.delta_to_rc(np.array([1.5, 2.5])).dtype == np.float64
    np.testing.assert_array_equal(geometry.rc_to_delta(np.array([420.0, 370.0])), [100.0, -50.0])


def test_delta_rc_tensorflow_matches_numpy():
    rng = np.random.default_rng(0)
    delta = rng.uniform(-400, 400, (6, 2)).astype(np.float32)
    rc = rng.uniform(0, 640, (6, 2)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)] * 2)
    def both(d, p):
        return geometry.delta_to_rc(d), geometry.rc_to_delta(p)

    tf_rc, tf_delta = both(tf.constant(delta), tf.constant(rc))
    assert tf_rc.dtype == tf.float32 and tf_delta.dtype == tf.float32
    np.testing.assert_array_equal(tf_rc.numpy(), geometry.delta_to_rc(delta))          # bit for bit
    np.testing.assert_array_equal(tf_delta.numpy(), geometry.rc_to_delta(rc))
    np.testing.assert_array_equal(geometry.delta_to_rc(tf.constant(delta)).numpy(), geometry.delta_to_rc(delta))


def test_delta_to_position_directions():
    # dy = +100 px at 0.1 m/px: 10 m south; dx = +50 px: 5 m west.
    got = geometry.delta_to_position([0.0, 0.0], [[100.0, 0.0], [0.0, 50.0]], 0.1, 'euclidean')
    np.testing.assert_allclose(got, [[-10.0, 0.0], [0.0, -5.0]])
    # 10 m south in degrees: 10 / 6371004 rad = 8.99321e-5 deg.
    got = geometry.delta_to_position([[41.0, -87.0]], [[100.0, 0.0]], np.array([0.1]), 'haversine')
    np.testing.assert_allclose(got, [[41.0 - 8.993210e-5, -87.0]], rtol=0, atol=1e-10)
    assert geometry.distance_m(got, [[41.0, -87.0]], 'haversine')[0] == pytest.approx(10.0, abs=1e-6)


def test_delta_of_10_and_minus_20_px_at_original_resolution():
    # delta (10, -20) px at 0.114 m/px: 1.14 m south and 2.28 m east of (41.88, -87.63).
    # lat: 1.14 / 6371004 = 1.789357e-7 rad = 1.025226e-5 deg.
    # lon: 2.28 / (6371004 * cos 41.88 deg = 0.744545) = 4.806564e-7 rad = 2.753968e-5 deg.
    # distance: sqrt(1.14^2 + 2.28^2) = 1.14 * sqrt(5) = 2.549117 m.
    centre = np.array([[41.88, -87.63]])
    got = geometry.delta_to_position(centre, [[10.0, -20.0]], geometry.ORIGINAL_MPP, 'haversine')
    np.testing.assert_allclose(got, [[41.88 - 1.025226e-5, -87.63 + 2.753968e-5]], rtol=0, atol=1e-11)
    assert geometry.distance_m(got, centre, 'haversine')[0] == pytest.approx(2.549117, abs=1e-5)
    # latlon_offset is the same step, in metres; gps_delta_px takes it back to pixels.
    lat, lon = geometry.latlon_offset(41.88, -87.63, -1.14, 2.28)
    np.testing.assert_array_equal([[lat, lon]], got)
    dy, dx = geometry.gps_delta_px(41.88, -87.63, lat, lon, geometry.ORIGINAL_MPP)   # (float64 degrees: ~1e-8 px)
    assert (dy, dx) == (pytest.approx(10.0, abs=1e-6), pytest.approx(-20.0, abs=1e-6))


def test_gps_delta_px_hand_values():
    # 0.001 deg of latitude = 0.001 * pi/180 * 6371004 m = 111.1950 m; / 0.114 m/px = 975.395 px.
    dy, dx = geometry.gps_delta_px(40.001, -73.0, 40.0, -73.0, 0.114)
    assert dy == pytest.approx(975.395, abs=1e-3) and dx == 0.0          # panorama south: dy > 0
    # 0.001 deg of longitude at 60 deg N = 111.1950 m * cos(60 deg) = 55.5975 m; / 0.1 = 555.975 px.
    dy, dx = geometry.gps_delta_px(60.0, 10.0, 60.0, 10.001, 0.1)
    assert dy == 0.0 and dx == pytest.approx(-555.975, abs=1e-3)         # panorama east: dx < 0
    # latlon_offset is its inverse: a point 30 m north and 20 m west of the tile centre.
    lat, lon = geometry.latlon_offset(41.88, -87.63, 30.0, -20.0)
    dy, dx = geometry.gps_delta_px(41.88, -87.63, lat, lon, 1.0)
    assert (dy, dx) == (pytest.approx(-30.0, abs=1e-9), pytest.approx(20.0, abs=1e-9))


def test_haversine_of_one_ten_thousandth_degree():
    # R · 1e-4 · π / 180 = 6371004 · 1.745329e-6 = 11.1195 m.
    err = geometry.distance_m([[40.0001, -74.0]], [[40.0, -74.0]], 'haversine')
    assert err[0] == pytest.approx(11.1195, abs=1e-3)
    assert geometry.distance_m([[3.0, 4.0]], [[0.0, 0.0]], 'euclidean')[0] == 5.0


def test_delta_round_trip_on_a_vigor_pair():
    # Chicago pair from docs/design.md §1: tile centre (41.877971796211014, -87.68943505304125), panorama
    # (41.877949, -87.689396). By hand: 2.53482 m south, 3.23329 m east of the centre; at
    # 0.114 m/px that is dy = +22.2353 px, dx = -28.3622 px.
    centre = [[41.877971796211014, -87.68943505304125]]
    pano = np.array([[41.877949, -87.689396]])
    got = geometry.delta_to_position(centre, [[22.2353, -28.3622]], 0.114, 'haversine')
    assert geometry.distance_m(got, pano, 'haversine')[0] < 1e-3
    assert geometry.distance_m(pano, centre, 'haversine')[0] == pytest.approx(np.hypot(2.53482, 3.23329), abs=1e-4)
    dy, dx = geometry.gps_delta_px(*centre[0], *pano[0], 0.114)
    assert (dy, dx) == (pytest.approx(22.2353, abs=1e-4), pytest.approx(-28.3622, abs=1e-4))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match='metric'):
        geometry.distance_m([[0.0, 0.0]], [[1.0, 1.0]], 'manhattan')
    with pytest.raises(ValueError, match='metric'):
        geometry.delta_to_position([0.0, 0.0], [[1.0, 1.0]], 0.1, 'manhattan')
    with pytest.raises(ValueError, match='centre'):
        geometry.delta_to_position([[0.0, 0.0, 0.0]], [[1.0, 1.0]], 0.1, 'euclidean')
    with pytest.raises(ValueError, match='differ in shape'):
        geometry.distance_m([[0.0, 0.0]], [[1.0, 1.0], [2.0, 2.0]], 'euclidean')


def test_constants():
    assert geometry.TILE_PX == 640 and geometry.EARTH_RADIUS_M == 6371004.0
    assert set(geometry.CORRECTED_MPP) == set(geometry.VIGOR_CITIES)
    assert set(geometry.CROSS_AREA['train']) | set(geometry.CROSS_AREA['test']) == set(geometry.VIGOR_CITIES)
    assert not set(geometry.CROSS_AREA['train']) & set(geometry.CROSS_AREA['test'])
