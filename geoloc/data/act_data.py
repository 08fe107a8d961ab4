"""CVACT's ACT_data.mat: panorama ids, UTM positions and the train / validation indices (docs/design.md §7).

TensorFlow-free; read by input_data.load_cvact and by samples_on_cvact.py.
"""
import os

import numpy as np
import scipy.io


def _as_strings(value):
    """Flatten whatever loadmat made of a MATLAB char matrix / cell array of strings into a list of str."""
    if isinstance(value, bytes):
        return [value.decode()]
    if isinstance(value, str):
        return [value]
    arr = np.asarray(value)
    if arr.dtype.kind in 'US':
        if arr.dtype.itemsize == np.dtype(arr.dtype.kind + '1').itemsize and arr.ndim >= 2:
            arr = np.array([''.join(row) for row in arr.reshape(-1, arr.shape[-1])])  # chars_as_strings=False
        return [s.decode() if isinstance(s, bytes) else str(s) for s in arr.ravel()]
    if arr.dtype == object:
        out = []
        for element in arr.ravel():  # a cell array: one (possibly wrapped) string per cell
            strings = _as_strings(element)
            if len(strings) > 1:
                raise TypeError('a cell holds several strings')
            out.append(strings[0] if strings else '')
        return out
    raise TypeError(f'not strings: dtype {arr.dtype}')


def _unwrap(value):
    """Strip the 1x1 object arrays loadmat wraps around struct fields and cells."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]
    return value


def _struct_field(struct, name):
    """struct.name for every shape loadmat gives a MATLAB struct (record array, 0-d, mat_struct, dict)."""
    struct = _unwrap(struct)
    if isinstance(struct, dict):
        return struct.get(name)
    if isinstance(struct, (np.ndarray, np.void)) and struct.dtype.names is not None:
        if name not in struct.dtype.names:
            return None
        if struct.size != 1:
            raise TypeError(f'a {struct.shape} struct array, expected a single struct')
        return struct[name] if isinstance(struct, np.void) else struct.reshape(-1)[0][name]
    if hasattr(struct, '_fieldnames'):  # struct_as_record=False
        return getattr(struct, name, None)
    return None


def parse_act_data(mat, source='ACT_data.mat', val_set=None):
    """The dict of load_act_data from an already loaded .mat (any loadmat squeeze_me / struct_as_record mode).

    source: the file name used in error messages. val_set: 'valSetAll', 'valSet' or None (valSetAll if present).
    """
    def fail(what):
        raise ValueError(f'{source}: {what}')

    for key in ('panoIds', 'utm', 'trainSet'):
        if key not in mat:
            fail(f"missing field '{key}'")
    try:
        pano_ids = [s.strip().strip('\x00') for s in _as_strings(mat['panoIds'])]
    except TypeError as e:
        fail(f'panoIds is not a list of strings ({e})')
    n = len(pano_ids)
    for i, pid in enumerate(pano_ids):
        if not pid or any(c.isspace() for c in pid) or '/' in pid:
            fail(f'panoIds entry {i + 1} = {pid!r} is empty or holds whitespace or "/"')

    utm = np.asarray(_unwrap(mat['utm']), dtype=np.float64)
    if utm.shape == (2, n) and n != 2:
        utm = utm.T  # stored as 2xN
    if utm.shape != (n, 2):
        fail(f'utm has shape {utm.shape}, expected ({n}, 2) for {n} panoIds')

    def indices(struct_name, field):
        if struct_name not in mat:
            fail(f"missing field '{struct_name}'")
        try:
            value = _struct_field(mat[struct_name], field)
        except TypeError as e:
            fail(f'{struct_name} is not a struct ({e})')
        if value is None:
            fail(f"missing field '{struct_name}.{field}'")
        idx = np.atleast_1d(np.asarray(_unwrap(value), dtype=np.float64)).ravel()
        if idx.size == 0:
            fail(f'{struct_name}.{field} is empty')
        bad = idx[(idx != np.round(idx)) | (idx < 1) | (idx > n)]
        if bad.size:
            fail(f'{struct_name}.{field} holds index {bad[0]:g} outside 1..{n} (1-based MATLAB indices)')
        return idx.astype(np.int64) - 1

    if val_set is None:
        val_set = 'valSetAll' if 'valSetAll' in mat else 'valSet'
    if val_set not in ('valSetAll', 'valSet'):
        raise ValueError(f"val_set must be 'valSetAll' or 'valSet', got {val_set!r}")
    return {'pano_ids': pano_ids, 'utm': utm, 'train_idx': indices('trainSet', 'trainInd'),
            'val_idx': indices(val_set, 'valInd'), 'val_set': val_set}


def load_act_data(mat_path, val_set=None):
    """Read CVACT's ACT_data.mat.

    Returns {'pano_ids': list[str] (N), 'utm': (N, 2) float64 easting/northing metres, 'train_idx': int64 0-based
    indices of trainSet.trainInd, 'val_idx': 0-based indices of valSetAll.valInd if present else valSet.valInd
    (or of the set named by val_set), 'val_set': the set used}. Raises ValueError naming the file and the field.
    """
    if not os.path.isfile(mat_path):
        raise FileNotFoundError(f'{mat_path}: no such file')
    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as e:  # scipy raises several types for a corrupt file
        raise ValueError(f'{mat_path}: not a readable .mat file ({e})') from None
    return parse_act_data(mat, source=mat_path, val_set=val_set)
