"""A tiny CVACT ACT_data.mat for the tests of input_data's reader and of samples_on_cvact.py."""
import numpy as np
import scipy.io

# Ids with the characters real Google pano ids use ('-', '_'); the last one is in no split and has no images.
PANO_IDS = [f'p{k}-Xy_{"z" * k}' for k in range(8)] + ['unlisted-id']
TRAIN_1BASED = [3, 1, 5, 7, 2]       # deliberately unsorted
VAL_1BASED = [4, 6]
VAL_ALL_1BASED = [4, 6, 8]           # pano 8 is only in valSetAll


def write_act_data(path, pano_ids=PANO_IDS, utm=None, oned_as='column', drop=(), **structs):
    """Write an ACT_data.mat for pano_ids (default PANO_IDS) with the split indices above; structs replace
    fields (e.g. trainSet={...}), drop removes them."""
    fields = {'panoIds': np.array(pano_ids, dtype=object),
              'utm': utm if utm is not None else np.arange(2 * len(pano_ids), dtype=np.float64).reshape(-1, 2),
              'trainSet': {'trainInd': np.array(TRAIN_1BASED, dtype=np.float64).reshape(-1, 1)},
              'valSet': {'valInd': np.array(VAL_1BASED, dtype=np.float64).reshape(-1, 1)},
              'valSetAll': {'valInd': np.array(VAL_ALL_1BASED, dtype=np.float64).reshape(-1, 1)}}
    fields.update(structs)
    for key in drop:
        fields.pop(key)
    scipy.io.savemat(path, fields, oned_as=oned_as)
