"""The rules a setting's value must follow (a field's `rule` metadata, config.setting) and the checks between
settings: `validate` refuses an impossible configuration in one line before anything is read or written."""
import dataclasses
import math
import os

from geoloc.errors import ConfigError
from geoloc.eval import protocols


# rule -> (test of a value, what the one-line error says it must be)
RULES = {
    '>=1': (lambda v: v >= 1, 'must be at least 1'),
    '>=0': (lambda v: v >= 0, 'must be 0 or more'),
    '>0': (lambda v: math.isfinite(v) and v > 0, 'must be a positive number'),
    '>=0.': (lambda v: math.isfinite(v) and v >= 0, 'must be 0 or a positive number'),
    'finite': (lambda v: math.isfinite(v), 'must be a number'),
    'bit': (lambda v: v in (0, 1), 'must be 0 or 1'),
    'quantile': (lambda v: 0 <= v < 1, 'must be 0 (off) or a quantile in (0, 1)'),
    'dir': (lambda v: not v or not os.path.exists(v) or os.path.isdir(v), 'names a file, not a directory'),
}


def validate(cfg):
    """Refuse impossible values before anything is read or written (one line each): every setting's rule
    (its field's metadata, RULES), then the conditions between settings."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f'--{name} {_show(getattr(cfg, name))}: {what}')
    for f in dataclasses.fields(cfg):
        rule = f.metadata.get('rule')
        if rule:
            test, what = RULES[rule]
            need(test(getattr(cfg, f.name)), f.name, what)
    need(cfg.batch >= 2, 'batch', 'must be at least 2 (the triplet loss needs a negative in the batch)')
    need(len(cfg.grd_size) == 2 and all(s >= 32 and s % 32 == 0 for s in cfg.grd_size), 'grd_size',
         'both sides must be positive multiples of 32 (the trunk downsamples 32x)')
    need(cfg.grd_size[1] == 2 * cfg.grd_size[0], 'grd_size',
         'the width must be twice the height (a 360-degree panorama is read without distortion, H W = 320 640)')
    need(cfg.sat_size >= 64 and cfg.sat_size % 64 == 0, 'sat_size',
         'must be a positive multiple of 64 (the heatmap decoder of E_2 and E_3 upsamples the 1x1 bottleneck by '
         'side / 64, and every stage uses one size)')
    need(cfg.mining_topk <= cfg.mining_pool, 'mining_topk', f'must not exceed --mining_pool {cfg.mining_pool} '
         '(the hard tiles are the top of the pool)')
    need(math.isfinite(cfg.fov) and 0 < cfg.fov <= 360, 'fov', 'must be a number of degrees in (0, 360]')
    try:
        protocols.parse_yaw(cfg.yaw)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(not os.path.isdir(cfg.vgg_weights), 'vgg_weights', 'names a directory, not the vgg16.npy file')


def validate_explicit(cfg, explicit):
    """Flags given on the command line that would be ignored, or that name nothing: refused (one line each)."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f'--{name} {_show(explicit[name])}: {what}')
    for name in ('area', 'labels'):
        if name in explicit:
            need(cfg.dataset == 'vigor', name, f'applies to VIGOR only, not to --dataset {cfg.dataset}')
    for name in ('cvact_mpp', 'cvact_resampled'):
        if name in explicit:
            need(cfg.dataset == 'cvact', name, f'applies to CVACT only, not to --dataset {cfg.dataset}')
    if 'vgg_weights' in explicit:
        need(os.path.isfile(cfg.vgg_weights), 'vgg_weights', 'not found (the default path may be missing; a path '
             'given on the command line must exist)')


def _show(v):
    return ' '.join(map(str, v)) if isinstance(v, tuple) else str(v)



