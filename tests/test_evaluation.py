"""Tests for evaluation.py. Run from the repository root: python -m pytest tests/test_evaluation.py

Retrieval is checked against a brute-force full similarity matrix written here independently.
Ties are only real when scores are exact: BLAS rounds one dot product differently at different
places of a matrix, so two equal float rows need not score equally. The tie tests therefore use
descriptors on a grid of multiples of 1/8, whose dot products are exact in float32 whatever the
summation order.
"""
import warnings

import numpy as np
import pytest

from geoloc.eval import evaluation as ev

def brute_force(grd, sat, pos, semi):
    """docs/design.md §6 read literally on the full (Q, N) float64 similarity matrix."""
    sim = grd.astype(np.float64) @ sat.astype(np.float64).T              # (Q, N)
    q = np.arange(len(grd))
    above = sim > sim[q, pos][:, None]
    allowed = np.zeros_like(above)                                       # positive + semi-positives
    allowed[q, pos] = True
    for j in range(semi.shape[1]):
        ok = semi[:, j] >= 0
        allowed[q[ok], semi[ok, j]] = True
    return {'rank': above.sum(axis=1), 'top1': sim.argmax(axis=1),
            'hit': ~(above & ~allowed).any(axis=1)}


def grid_descriptors(rng, n, d):
    """Entries in {-3/8, ..., 3/8}: every dot product of two rows is exact in float32."""
    return (rng.integers(-3, 4, (n, d)) / 8).astype(np.float32)


@pytest.mark.parametrize('n_query, n_ref, dim, block, ref_block', [
    (37, 23, 8, 5, None),        # fewer than 100 references, block does not divide Q
    (200, 150, 16, 64, 7),       # reference tiles that do not divide N
    (501, 357, 24, 128, 100),
    (9, 4, 8, 4, 3),             # fewer references than queries, a short last reference tile
    (1, 50, 8, 1, 1),            # one query, one reference per tile
])
def test_streamed_ranks_match_brute_force_with_ties(n_query, n_ref, dim, block, ref_block):
    rng = np.random.default_rng(n_query * 1000 + n_ref)
    sat = grid_descriptors(rng, n_ref, dim)
    grd = grid_descriptors(rng, n_query, dim)
    pos = rng.integers(0, n_ref, n_query)
    # Deliberate ties: copies of some positives' rows elsewhere (before and after them).
    for i in range(0, n_query, 3):
        sat[rng.integers(0, n_ref)] = sat[pos[i]]
    semi = rng.integers(-1, n_ref, (n_query, 3))
    semi[::4, 1] = pos[::4]                          # a semi equal to the positive is ignored
    semi[::5, 2] = semi[::5, 0]                      # a repeated semi is counted once
    want = brute_force(grd, sat, pos, semi)
    if n_query > 30:                                 # the case exercises what it claims to
        scores = grd.astype(np.float64) @ sat.T.astype(np.float64)
        ties = (scores == scores[np.arange(n_query), pos][:, None]).sum(axis=1) - 1
        assert (ties > 0).mean() > 0.2 and want['hit'].any() and not want['hit'].all()

    got = ev.retrieval_ranks(grd, sat, pos, semi, block=block, ref_block=ref_block)
    np.testing.assert_array_equal(got['rank'], want['rank'])
    np.testing.assert_array_equal(got['top1'], want['top1'])
    np.testing.assert_array_equal(got['hit'], want['hit'])
    assert got['rank'].dtype == np.int64 and got['hit'].dtype == np.bool_


def test_float_descriptors_agree_up_to_rounding():
    # Real-valued unit descriptors: any disagreement with float64 must be a near-tie (< 1e-5).
    rng = np.random.default_rng(0)
    sat = rng.standard_normal((2000, 64)).astype(np.float32)
    grd = rng.standard_normal((300, 64)).astype(np.float32)
    sat /= np.linalg.norm(sat, axis=1, keepdims=True)
    grd /= np.linalg.norm(grd, axis=1, keepdims=True)
    pos = rng.integers(0, 2000, 300)
    semi = rng.integers(-1, 2000, (300, 3))
    want = brute_force(grd, sat, pos, semi)
    got = ev.retrieval_ranks(grd, sat, pos, semi, block=128, ref_block=500)
    sim = grd.astype(np.float64) @ sat.astype(np.float64).T
    near = (np.abs(sim - sim[np.arange(300), pos][:, None]) < 1e-5).sum(axis=1) - 1
    assert np.all(np.abs(got['rank'] - want['rank']) <= near)
    assert np.mean(got['rank'] == want['rank']) > 0.99
    assert ev.retrieval_metrics(got, 2000)['R@10'] == pytest.approx(np.mean(want['rank'] < 10), abs=0.01)


def test_default_tiles_and_no_semis():
    rng = np.random.default_rng(1)
    sat, grd = grid_descriptors(rng, 60, 8), grid_descriptors(rng, 10, 8)
    pos = rng.integers(0, 60, 10)
    got = ev.retrieval_ranks(grd, sat, pos)
    assert set(got) == {'rank', 'top1'}
    np.testing.assert_array_equal(got['rank'], brute_force(grd, sat, pos, np.full((10, 0), -1))['rank'])
    assert np.isnan(ev.retrieval_metrics(got, 60)['hit_rate'])


# Hand-made: one query grd = e0; reference scores are their first coordinate.
GRD = np.array([[1.0, 0.0]], np.float32)
SAT = np.array([[0.5, 0.5], [0.75, 0.25], [0.25, 0.75], [0.5, -0.5]], np.float32)  # scores .5 .75 .25 .5


def test_semi_positive_above_positive_keeps_hit():
    r = ev.retrieval_ranks(GRD, SAT, [0], [[1, -1, -1]])
    assert r['rank'][0] == 1 and r['top1'][0] == 1 and r['hit'][0]      # rank 1: not R@1, still a hit
    m = ev.retrieval_metrics(r, 4)
    assert m['R@1'] == 0.0 and m['R@5'] == 1.0 and m['hit_rate'] == 1.0


def test_other_reference_above_positive_is_a_miss():
    r = ev.retrieval_ranks(GRD, SAT, [0], [[2, 3, -1]])
    assert r['rank'][0] == 1 and not r['hit'][0]


def test_ties_with_the_positive_do_not_count():
    # References 0 and 3 both score 0.5; the positive is 3, so 0 ties it and 1 is above.
    r = ev.retrieval_ranks(GRD, SAT, [3], [[1, -1, -1]])
    assert r['rank'][0] == 1 and r['top1'][0] == 1 and r['hit'][0]
    sat = SAT.copy()
    sat[1] = [0.5, 0.25]                                                 # now 0, 1, 3 tie at the top
    r = ev.retrieval_ranks(GRD, sat, [3], [[-1, -1, -1]])
    assert r['rank'][0] == 0 and r['top1'][0] == 0 and r['hit'][0]
    assert ev.retrieval_metrics(r, 4)['R@1'] == 1.0


def test_recall_at_one_percent_threshold():
    ranks = {'rank': np.array([0, 1, 2, 3]), 'hit': np.array([True, True, False, False])}
    # N_ref = 50: int(0.5) + 1 = 1, only rank 0 counts; N_ref = 250: int(2.5) + 1 = 3.
    assert ev.retrieval_metrics(ranks, 50)['R@1%'] == 0.25
    assert ev.retrieval_metrics(ranks, 250)['R@1%'] == 0.75
    m = ev.retrieval_metrics(ranks, 250)
    assert (m['R@1'], m['R@5'], m['R@10'], m['hit_rate']) == (0.25, 1.0, 1.0, 0.5)
    assert (m['n_query'], m['n_ref']) == (4, 250)
    assert np.isnan(ev.retrieval_metrics({'rank': np.zeros(0, int)}, 10)['R@1'])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match='pos_idx'):
        ev.retrieval_ranks(GRD, SAT, [4])
    with pytest.raises(ValueError, match='semi_idx'):
        ev.retrieval_ranks(GRD, SAT, [0], [[-2, 0, 0]])
    with pytest.raises(ValueError, match='dimension'):
        ev.retrieval_ranks(GRD, SAT[:, :1], [0])
    sat = SAT.copy()
    sat[2, 0] = np.nan
    with pytest.raises(ValueError, match='non-finite'):
        ev.retrieval_ranks(GRD, sat, [0])


def test_localisation_summary_hand_values():
    s = ev.localisation_summary([1.0, 5.0, 50.0], [10.0, 10.0, 100.0], np.array([True, True, False]),
                                thresholds=[1, 5, 10])
    assert s['thresholds_m'] == [1.0, 5.0, 10.0]
    assert s['all']['count'] == 3 and s['top1_correct']['count'] == 2
    assert s['all']['mean_m'] == pytest.approx(56 / 3) and s['all']['median_m'] == 5.0
    assert s['top1_correct']['mean_m'] == 3.0 and s['top1_correct']['median_m_centre'] == 10.0
    assert s['all']['accuracy'] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert s['all']['accuracy_centre'] == pytest.approx([0, 0, 2 / 3])
    assert s['top1_correct']['accuracy'] == [0.5, 1.0, 1.0]


def test_localisation_summary_empty_subset_is_nan():
    s = ev.localisation_summary([3.0, 4.0], [5.0, 6.0], np.array([False, False]))
    assert s['top1_correct']['count'] == 0 and np.isnan(s['top1_correct']['mean_m'])
    assert len(s['top1_correct']['accuracy']) == 40 and np.isnan(s['top1_correct']['accuracy']).all()
    assert s['all']['accuracy'][2] == 0.5                                 # 3 m <= t = 3 m


def test_vigor_curve_is_log_spaced_and_strict():
    t = ev.VIGOR_THRESHOLDS_M
    assert len(t) == 499 and t[0] == pytest.approx(1.1 ** 0.2) and t[-1] == pytest.approx(1.1 ** 99.8)
    assert t[-1] == pytest.approx(13520.4, rel=1e-5)                    # 1.1^99.8 m = 13.5 km, the right end
    # errors exactly on a threshold do not count (strict <, as VIGOR); 1.1^(5/5) = 1.1 m is threshold i = 5
    s = ev.localisation_summary([1.1, 1.1 ** 0.2, 0.5, 20.0], [0.0] * 4, np.ones(4, bool))
    acc = s['all']['vigor_accuracy']
    assert acc[0] == 0.25 and acc[4] == 0.5 and acc[5] == 0.75         # 0.5 m; + 1.1^0.2 m; + 1.1 m
    assert s['all']['recall_within_m'] == {'1': 0.25, '5': 0.75, '10': 0.75}


def test_vigor_curve_equals_brute_force_count():
    rng = np.random.default_rng(3)
    err = np.concatenate([rng.lognormal(2.0, 2.0, 997), ev.VIGOR_THRESHOLDS_M[[10, 200, 498]]])  # 3 exact ties
    correct = rng.random(err.size) < 0.3
    hit = correct | (rng.random(err.size) < 0.3)
    s = ev.localisation_summary(err, err + 1, correct, top1_hit=hit)
    assert s['vigor_thresholds_m'] == ev.VIGOR_THRESHOLDS_M.tolist()
    for subset, keep in (('all', np.ones(err.size, bool)), ('top1_correct', correct), ('top1_hit', hit)):
        assert s[subset]['count'] == keep.sum()
        for i in (0, 10, 57, 200, 498):
            brute = sum(1 for e in err[keep] if e < 1.1 ** ((i + 1) / 5)) / keep.sum()
            assert s[subset]['vigor_accuracy'][i] == pytest.approx(brute, abs=1e-12), (subset, i)
        for m in (1, 5, 10):
            assert s[subset]['recall_within_m'][str(m)] == pytest.approx(np.mean(err[keep] < m), abs=1e-12)
    assert 'top1_hit' not in ev.localisation_summary(err, err, correct)


def test_ellipse_coverage_of_calibrated_gaussian():
    rng = np.random.default_rng(0)
    n = 200_000
    chol = np.zeros((n, 2, 2))
    chol[:, 0, 0] = rng.uniform(1, 20, n)
    chol[:, 1, 1] = rng.uniform(1, 20, n)
    chol[:, 1, 0] = rng.uniform(-10, 10, n)
    cov = chol @ chol.transpose(0, 2, 1)
    mu = rng.uniform(0, 640, (n, 2))
    gt = mu + np.einsum('nij,nj->ni', chol, rng.standard_normal((n, 2)))
    c = ev.ellipse_coverage(mu, cov, gt)
    # 1 - exp(-1/2) = 0.3935, 1 - exp(-2) = 0.8647; the binomial s.d. at n = 2e5 is ~0.001.
    assert c['1sigma'] == pytest.approx(0.3935, abs=0.005)
    assert c['2sigma'] == pytest.approx(0.8647, abs=0.005)
    assert c['expected_1sigma'] == pytest.approx(0.3935, abs=1e-4) and c['n'] == n
    with pytest.raises(ValueError, match='positive definite'):
        ev.ellipse_coverage(mu[:1], -cov[:1], gt[:1])


def test_rank_correlation():
    x = np.linspace(0, 1, 50)
    assert ev.rank_correlation(x, np.exp(5 * x)) == pytest.approx(1.0)
    assert ev.rank_correlation(x, -x) == pytest.approx(-1.0)
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    u, err = rng.integers(0, 5, 100), rng.integers(0, 5, 100)            # many ties
    assert ev.rank_correlation(u, err) == pytest.approx(spearmanr(u, err)[0])
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                   # NaN without a warning
        assert np.isnan(ev.rank_correlation(np.ones(5), x[:5]))
        assert np.isnan(ev.rank_correlation(x[:5], np.ones(5)))
        assert np.isnan(ev.rank_correlation([1.0], [2.0])) and np.isnan(ev.rank_correlation([], []))
    assert ev.rank_correlation([1.0, 2.0], [5.0, 3.0]) == pytest.approx(-1.0)


def test_sparsification_hand_case_and_oracle_bound():
    # err 1..4 with the most uncertainty on the smallest error: removing half by u keeps 3, 4.
    sp = ev.sparsification([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], steps=2)
    assert sp['fractions'] == [0.0, 0.5]
    assert sp['curve'] == [2.5, 3.5] and sp['oracle'] == [2.5, 1.5]
    assert sp['ause'] == pytest.approx(0.5) and sp['auc'] == pytest.approx(1.5)   # (0+2)/2·0.5, (2.5+3.5)/2·0.5
    rng = np.random.default_rng(0)
    err = rng.exponential(5.0, 1000)
    sp = ev.sparsification(err + rng.normal(0, 3, 1000), err)
    assert len(sp['curve']) == 20 and sp['curve'][0] == pytest.approx(err.mean())
    assert np.all(np.asarray(sp['oracle']) <= np.asarray(sp['curve']) + 1e-12) and sp['ause'] > 0
    assert ev.sparsification(err, err)['ause'] == pytest.approx(0.0)


def test_coverage_curve_hand_values():
    # Identity covariance: the k-sigma ellipse is the disc of radius k. Ground truths 0.4, 1.5 and 2.5 from mu:
    # k = 0.5 holds the first (1/3), k = 1.5 the first two (the boundary counts: <=), k = 2.5 all three.
    mu = np.zeros((3, 2))
    gt = np.array([[0.4, 0.0], [0.0, 1.5], [-1.5, 2.0]])
    cov = np.repeat(np.eye(2)[None], 3, 0)
    c = ev.coverage_curve(mu, cov, gt, ks=[0.5, 1.0, 1.5, 2.5])
    assert c['inside'] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    assert c['calibrated'][1] == pytest.approx(1 - np.exp(-0.5))    # 39.3 %
    # a covariance of 4 I (sigma 2 px) halves every radius in sigma units
    assert ev.coverage_curve(mu, 4 * cov, gt, ks=[0.75])['inside'] == pytest.approx([2 / 3])


def test_paired_bootstrap_hand_cases():
    ones, zeros = np.ones(50), np.zeros(50)
    r = ev.paired_bootstrap(np.mean, zeros, ones, n_boot=200)
    assert (r['diff'], r['low'], r['high'], r['excludes_zero']) == (1.0, 1.0, 1.0, True)
    same = np.arange(50.0)
    r = ev.paired_bootstrap(np.median, same, same, n_boot=200)
    assert (r['diff'], r['low'], r['high'], r['excludes_zero']) == (0.0, 0.0, 0.0, False)
    # one query of 50 changes by +1: the mean rises by 0.02; a draw holds that query k times (k ~ Binomial(50, 1/50)),
    # so the interval runs from 0 (not drawn, ~36 % of draws) to a few times 0.02 and does not exclude 0
    after = zeros.copy()
    after[7] = 1
    r = ev.paired_bootstrap(np.mean, zeros, after, n_boot=2000, seed=1)
    assert r['diff'] == pytest.approx(0.02) and r['low'] == 0.0 and 0.02 <= r['high'] <= 0.1
    assert not r['excludes_zero']
    with pytest.raises(ValueError):
        ev.paired_bootstrap(np.mean, zeros, ones[:3])
