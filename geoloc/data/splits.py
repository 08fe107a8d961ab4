"""The configured dataset's splits: the VIGOR or CVACT tree a Config names, checked, then parsed. Read-only:
without --data_root the built-in synthetic dataset must already be there (geoloc/data/builtin.py)."""
import os

import input_data
from geoloc.data import builtin
from geoloc.errors import ConfigError


def dataset_splits(cfg, which):
    """The 'train' or 'test' split of the configured dataset."""
    root = cfg.data_root
    if cfg.dataset == 'vigor':
        root = root or builtin.check('vigor')
        input_data.check_prepared(root, cfg.grd_size, cfg.sat_size)   # a copy from tools/prepare_data.py
        return input_data.load_vigor(root, which, cfg.area, cfg.labels)
    root = root or builtin.check('cvact')
    input_data.check_cvact_root(root)
    mpp = cfg.cvact_mpp
    if not mpp and builtin.synthetic_kind(root) == 'cvact':
        mpp = builtin.CVACT_MPP_1200      # the synthetic CVACT's own resolution
    if not mpp:
        raise ConfigError(f'{root}: --cvact_mpp is required on a CVACT tree: the metres per pixel of its '
                          '1200-px aerial images, which turn localisation errors from pixels into metres')
    resampled = cfg.cvact_resampled or os.path.join(root, builtin.RESAMPLED)
    for folder in (root, resampled):
        input_data.check_prepared(folder, cfg.grd_size, cfg.sat_size)
    return input_data.load_cvact(root, resampled, which, mpp)
