"""calibration.py: the NLL of a 2-D Gaussian, ENCE and selective prediction on hand-computed cases; the
post-hoc scale of the ellipses (fit, calibration.json)."""
import json

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from geoloc.errors import StateError
from geoloc.eval import calibration as cal


def test_gaussian_nll_hand_values():
    # N(0, I) at its mean: 0 + 0 + log 2pi. diag(4, 9) at (2, 3) from the mean: 0.5 (1 + 1) + 0.5 log 36 + log 2pi.
    mu = np.zeros((2, 2))
    cov = np.array([np.eye(2), np.diag([4.0, 9.0])])
    gt = np.array([[0.0, 0.0], [2.0, 3.0]])
    np.testing.assert_allclose(cal.gaussian_nll(mu, cov, gt), [np.log(2 * np.pi), 1 + np.log(6) + np.log(2 * np.pi)],
                               rtol=1e-12)


def test_gaussian_nll_is_minus_the_log_density_and_scales_with_the_unit():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 2, 2))
    cov = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(2)
    mu, gt = rng.uniform(0, 640, (20, 2)), rng.uniform(0, 640, (20, 2))
    nll = cal.gaussian_nll(mu, cov, gt)
    np.testing.assert_allclose(nll, [-multivariate_normal(m, c).logpdf(g) for m, c, g in zip(mu, cov, gt)],
                               rtol=1e-9)
    # the same Gaussians in metres at 0.114 m/px: a density per m^2, NLL + 2 log 0.114
    np.testing.assert_allclose(cal.gaussian_nll(0.114 * mu, 0.114 ** 2 * cov, 0.114 * gt), nll + 2 * np.log(0.114),
                               rtol=1e-9)
    with pytest.raises(ValueError, match='positive definite'):
        cal.gaussian_nll(mu[:1], -cov[:1], gt[:1])


def test_sigma_is_the_root_of_the_mean_eigenvalue():
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    cov = np.array([np.diag([4.0, 9.0]), rot @ np.diag([4.0, 9.0]) @ rot.T, 25 * np.eye(2)])
    np.testing.assert_allclose(cal.sigma_of(cov), [np.sqrt(6.5), np.sqrt(6.5), 5.0], rtol=1e-12)


def test_ence_hand_cases():
    # Two bins of sigma (given out of order): sigma 1 with errors sqrt 2 (per axis 1: calibrated) and sigma 2
    # with errors 4 (per-axis RMSE sqrt(16 / 2) = 2 sqrt 2, RMV 2): ENCE = (0 + (2 sqrt 2 - 2) / 2) / 2.
    e = cal.ence([2.0, 1.0, 2.0, 1.0], [4.0, np.sqrt(2), 4.0, np.sqrt(2)], n_bins=2)
    assert e['n_bins'] == 2 and e['count'] == [2, 2]
    np.testing.assert_allclose(e['rmv'], [1.0, 2.0])
    np.testing.assert_allclose(e['rmse'], [1.0, 2 * np.sqrt(2)])
    assert e['ence'] == pytest.approx((np.sqrt(2) - 1) / 2)
    # errors 0 and 4 at sigma 2: mean err^2 / 2 = 4, RMSE 2 = RMV: calibrated
    assert cal.ence([1.0, 1.0, 2.0, 2.0], [np.sqrt(2), np.sqrt(2), 0.0, 4.0], n_bins=2)['ence'] == pytest.approx(0.0)
    assert cal.ence(np.arange(1.0, 6.0), np.ones(5), n_bins=2)['count'] == [3, 2]        # np.array_split
    assert cal.ence([1.0, 2.0], [1.0, 1.0], n_bins=10)['n_bins'] == 2                      # no empty bin
    empty = cal.ence([], [])
    assert np.isnan(empty['ence']) and empty['n_bins'] == 0
    with pytest.raises(ValueError, match='positive'):
        cal.ence([1.0, 0.0], [1.0, 1.0])


def test_ence_of_a_calibrated_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    n = 100_000
    sigma = rng.uniform(1, 10, n)
    err = np.linalg.norm(sigma[:, None] * rng.standard_normal((n, 2)), axis=1)
    assert cal.ence(sigma, err)['ence'] < 0.03          # 10 bins of 10,000: RMSE within ~0.5 % of RMV
    assert cal.ence(sigma, 2 * err)['ence'] == pytest.approx(1.0, abs=0.03)      # errors twice the spread


def test_selective_prediction_hand_case():
    # sigma's order puts the errors as 0.5, 2, 6, 12, 0.8, 3, 20, 7, 9, 11
    sigma = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    err = np.array([0.8, 0.5, 12.0, 2.0, 6.0, 3.0, 20.0, 7.0, 9.0, 11.0])
    s = cal.selective_prediction(sigma, err)
    assert s['kept'] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0] and s['count'] == [5, 6, 7, 8, 9, 10]
    assert s['median_m'][:3] == [2.0, 2.5, 3.0] and s['median_m'][-1] == 6.5
    assert s['recall_within_m']['1'][:2] == [2 / 5, 2 / 6] and s['recall_within_m']['1'][-1] == 0.2
    assert s['recall_within_m']['5'][:2] == [3 / 5, 4 / 6] and s['recall_within_m']['5'][-1] == 0.4
    assert s['recall_within_m']['10'][:2] == [4 / 5, 5 / 6] and s['recall_within_m']['10'][-1] == 0.7


def test_selective_prediction_rounds_up_keeps_ties_in_order_and_is_strict():
    s = cal.selective_prediction([1.0, 1.0, 1.0], [5.0, 1.0, 30.0], kept=[0.5])
    assert s['count'] == [2] and s['median_m'] == [3.0]                      # ceil(1.5); the first two on a tie
    assert s['recall_within_m'] == {'1': [0.0], '5': [0.5], '10': [1.0]}     # 5 m is not within 5 m, 1 m not within 1
    assert cal.selective_prediction(np.arange(10.0), np.arange(10.0), kept=[0.7])['count'] == [7]
    assert np.isnan(cal.selective_prediction([], [])['median_m'][0])
    with pytest.raises(ValueError, match='kept'):
        cal.selective_prediction([1.0], [1.0], kept=[0.0])


def test_fit_sigma_scale_recovers_the_scale_of_gaussian_errors():
    # The Mahalanobis distance of a 2-D standard normal is Rayleigh(1): calibrated ellipses need scale 1; the
    # same errors under ellipses 3x too small read 3x farther and need 3.
    maha = np.random.default_rng(0).rayleigh(1.0, 20000)
    assert cal.fit_sigma_scale(maha) == pytest.approx(1.0, abs=0.03)
    assert cal.fit_sigma_scale(3 * maha) == pytest.approx(3.0, rel=0.03)
    after = cal.scaled_coverage(3 * maha, cal.fit_sigma_scale(3 * maha))
    assert after['1sigma'] == pytest.approx(1 - np.exp(-0.5), abs=0.01)
    assert after['2sigma'] == pytest.approx(1 - np.exp(-2), abs=0.01)


def test_fit_sigma_scale_hand_case():
    # Ten distances 1..10: a scale s covers #{d <= s} / 10 at 1 sigma and #{d <= 2 s} / 10 at 2 sigma, against
    # 0.393 and 0.865. s in [4.5, 5): 0.4 and 0.9, the larger error 0.035; [4, 4.5): 0.4 and 0.8, 0.065;
    # [5, 5.5): 0.5 and 1.0, 0.135; [3.5, 4): 0.3 and 0.7, 0.165. The least is [4.5, 5), and the middle point
    # of the geometric grid there, about sqrt(4.5 x 5), is returned.
    s = cal.fit_sigma_scale(np.arange(1.0, 11.0))
    assert 4.5 <= s < 5.0 and s == pytest.approx(np.sqrt(4.5 * 5), rel=0.01)
    assert cal.scaled_coverage(np.arange(1.0, 11.0), s) == {'1sigma': 0.4, '2sigma': 0.9}
    # A heavy tail, 60 near distances (0.1..0.69) and 40 far ones (3..6.9): no scale of a fine grid has a
    # smaller largest coverage error than the fitted one.
    heavy = np.r_[np.linspace(0.1, 0.69, 60), np.linspace(3.0, 6.9, 40)]
    got = cal.scaled_coverage(heavy, cal.fit_sigma_scale(heavy))
    errs = (got['1sigma'] - (1 - np.exp(-0.5)), (1 - np.exp(-2)) - got['2sigma'])
    for s2 in np.geomspace(0.05, 20, 400):                  # no scale does better on the larger of the two
        other = cal.scaled_coverage(heavy, s2)
        assert max(abs(other['1sigma'] - (1 - np.exp(-0.5))), abs(other['2sigma'] - (1 - np.exp(-2)))) >= \
            max(abs(e) for e in errs) - 1e-12
    for bad in ([], [1.0, np.nan], [-1.0], [[1.0]]):
        with pytest.raises(ValueError, match='finite distances'):
            cal.fit_sigma_scale(np.array(bad))


def test_calibration_file_round_trip_and_refusals(tmp_path):
    assert cal.read_scale(str(tmp_path)) == (1.0, None)                    # none: the ellipses as predicted
    record = {'sigma_scale': 1.75, 'checkpoint': 'ckpt-3'}
    path = cal.write_scale(str(tmp_path), record)
    assert json.load(open(path)) == record and cal.read_scale(str(tmp_path)) == (1.75, record)
    for text, why in (('{"sigma_scale": 0}', 'positive'), ('{"sigma_scale": -2}', 'positive'),
                      ('{"scale": 2}', 'KeyError'), ('not json', 'JSONDecodeError')):
        with open(path, 'w') as f:
            f.write(text)
        with pytest.raises(StateError, match=why):
            cal.read_scale(str(tmp_path))
