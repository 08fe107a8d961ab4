"""localisers.py: which localiser a stage gets, a new head's own localiser without touching testing.py, and the
top-1 tiles that reuse the positive's answer. (The heatmap localiser on real networks, its ground dependence and
the ground trunk run once per panorama: tests/test_testing.py.)"""
import dataclasses

import numpy as np
import pytest

from geoloc.eval import localisers
import stages


def test_the_paper_stages_get_their_kinds():
    kinds = {name: localisers.for_stage(stages.get(name)) for name in stages.ORDER}
    assert {name: loc.method for name, loc in kinds.items()} == {
        'E_1a': 'tile centre', 'E_1': 'offset', 'E_2_1': 'heatmap', 'E_2_2': 'heatmap', 'E_3': 'heatmap'}
    for name in ('E_2_1', 'E_2_2', 'E_3'):        # both branches: the semi-positive one for its diagnostics
        assert kinds[name].branch == 'pos' and kinds[name].semi.branch == 'semi'


class Fixed(localisers.Localiser):
    """A toy head: every query 10 px south of the tile centre."""
    method = 'fixed'

    def locate(self, scene, rows, tiles, keep_heatmaps=0):
        return localisers.Located(delta=np.tile([[10.0, 0.0]], (len(rows), 1)))


def test_a_stage_names_a_registered_localiser(monkeypatch):
    stage = dataclasses.replace(stages.get('E_1'), localiser='fixed')
    with pytest.raises(KeyError, match="no localiser 'fixed'; registered: centre, heatmap, offset"):
        localisers.for_stage(stage)
    monkeypatch.setitem(localisers.REGISTRY, 'fixed', lambda s: Fixed())
    assert isinstance(localisers.for_stage(stage), Fixed) and stage.localise == 'offset'   # the override wins
    assert localisers.for_stage(stages.get('E_1')).method == 'offset'


class Echo(localisers.Localiser):
    """delta = (row, tile) of each pair, chol = (row, tile, 1): shows which pairs were localised."""

    def __init__(self):
        self.calls = []

    def locate(self, scene, rows, tiles, keep_heatmaps=0):
        self.calls.append((list(rows), list(tiles)))
        delta = np.stack([rows, tiles], 1).astype(np.float32)
        return localisers.Located(delta=delta, chol=np.concatenate([delta, np.ones((len(rows), 1))], 1),
                                  heatmaps={0: np.ones((2, 2))})


def test_top1_localises_only_the_wrong_queries():
    echo = Echo()
    pos, top1 = np.array([3, 4, 5, 6]), np.array([3, 9, 5, 8])
    at_pos = echo.locate(None, np.arange(4), pos)
    at_top1 = localisers.at_top1(echo, None, at_pos, top1, top1 == pos)
    assert echo.calls[1] == ([1, 3], [9, 8])
    np.testing.assert_array_equal(at_top1.delta, [[0, 3], [1, 9], [2, 5], [3, 8]])
    np.testing.assert_array_equal(at_top1.chol[:, 2], 1)
    assert at_top1.heatmaps == {} and at_pos.delta[1, 1] == 4            # the positive's answer is left as it was
    centre = localisers.Localiser()
    assert localisers.at_top1(centre, None, centre.locate(None, [0], [3]), np.array([9]), np.array([False])).delta \
        is None
