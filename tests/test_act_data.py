"""act_data.py: CVACT's ACT_data.mat in every shape scipy writes it."""
import numpy as np
import pytest
import scipy.io

from geoloc.data import act_data
from fake_act_data import PANO_IDS, TRAIN_1BASED, write_act_data


def test_load_act_data_maps_1based_indices(tmp_path):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path)
    act = act_data.load_act_data(path)
    assert act['pano_ids'] == PANO_IDS
    assert act['utm'].shape == (9, 2) and act['utm'].dtype == np.float64 and act['utm'][3, 1] == 7.0
    assert [act['pano_ids'][i] for i in act['train_idx']] == [PANO_IDS[i - 1] for i in TRAIN_1BASED]
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1]
    assert act['val_set'] == 'valSetAll' and act['val_idx'].tolist() == [3, 5, 7]
    assert act_data.load_act_data(path, val_set='valSet')['val_idx'].tolist() == [3, 5]


@pytest.mark.parametrize('oned_as', ['column', 'row'])
def test_load_act_data_shapes(tmp_path, oned_as):
    # char-matrix panoIds (equal lengths), 1-D index vectors saved as rows or columns, utm stored 2xN
    ids = [f'id{k:03d}' for k in range(9)]
    path = str(tmp_path / 'ACT_data.mat')
    utm = np.arange(18, dtype=np.float64).reshape(9, 2)
    write_act_data(path, pano_ids=np.array(ids), utm=utm.T, oned_as=oned_as,
               trainSet={'trainInd': np.array(TRAIN_1BASED, dtype=np.float64)},
               valSetAll={'valInd': np.array([9], dtype=np.int32)})
    act = act_data.load_act_data(path)
    assert act['pano_ids'] == ids and np.array_equal(act['utm'], utm)
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1] and act['val_idx'].tolist() == [8]


@pytest.mark.parametrize('kwargs', [{}, {'squeeze_me': True}, {'struct_as_record': False},
                                    {'squeeze_me': True, 'struct_as_record': False}, {'chars_as_strings': False}])
def test_parse_act_data_loadmat_modes(tmp_path, kwargs):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path, valSet={'valInd': np.array([[4.0]])})  # a single index squeezes to a scalar
    act = act_data.parse_act_data(scipy.io.loadmat(path, **kwargs), source=path, val_set='valSet')
    assert act['pano_ids'] == PANO_IDS
    assert act['train_idx'].tolist() == [2, 0, 4, 6, 1] and act['val_idx'].tolist() == [3]


def test_load_act_data_errors(tmp_path):
    path = str(tmp_path / 'ACT_data.mat')
    write_act_data(path, drop=('valSet', 'valSetAll'))
    with pytest.raises(ValueError, match=r"ACT_data\.mat: missing field 'valSet'"):
        act_data.load_act_data(path)
    write_act_data(path, drop=('utm',))
    with pytest.raises(ValueError, match="missing field 'utm'"):
        act_data.load_act_data(path)
    write_act_data(path, trainSet={'trainIdx': np.array([[1.0]])})
    with pytest.raises(ValueError, match=r"missing field 'trainSet\.trainInd'"):
        act_data.load_act_data(path)
    write_act_data(path, trainSet={'trainInd': np.array([[1.0], [99.0]])})
    with pytest.raises(ValueError, match=r'trainSet\.trainInd holds index 99 outside 1\.\.9'):
        act_data.load_act_data(path)
    write_act_data(path, valSetAll={'valInd': np.array([[0.0]])})
    with pytest.raises(ValueError, match=r'valSetAll\.valInd holds index 0'):
        act_data.load_act_data(path)
    write_act_data(path, utm=np.zeros((8, 2)))
    with pytest.raises(ValueError, match=r'utm has shape \(8, 2\), expected \(9, 2\)'):
        act_data.load_act_data(path)
    with pytest.raises(FileNotFoundError, match='nope.mat'):
        act_data.load_act_data(str(tmp_path / 'nope.mat'))
    (tmp_path / 'junk.mat').write_bytes(b'not a mat file')
    with pytest.raises(ValueError, match='junk.mat: not a readable .mat file'):
        act_data.load_act_data(str(tmp_path / 'junk.mat'))
