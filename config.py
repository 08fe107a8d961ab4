"""The run configuration: one typed object, its command-line flags, its presets and its config.json.

Precedence, written down once (`resolve`): an explicit flag > the preset (`--preset`, the stage's own
preset values over the global ones) > the stage's defaults > the defaults below.

Every field says what kind of setting it is:
  model     the architecture: a checkpoint of other values does not fit (checked against a predecessor)
  run       fixed for a run: resuming or testing a run directory with another value is refused
  extend    may grow when a finished run is resumed (epochs, max_steps)
  volatile  may differ between a run, its resumption and its --test (paths, logging, evaluation)
TensorFlow-free: importing this module changes nothing.
"""
import argparse
import dataclasses
import json
import math
import os

from geoloc.eval import protocols
from geoloc.errors import ConfigError  # noqa: F401 (raised here, caught as <module>.<name>)


# Model parts (model.ALL_PARTS) that some model settings shape; a setting without `parts` shapes every part.
_CHOLESKY = ('pos_cholesky', 'semi_cholesky')
_DECODERS = ('pos_decoder', 'semi_decoder')


def _flag(default, help, kind='run', choices=None, parts=None):
    """A Config field. parts: the model parts whose weights a model setting shapes (None: all of them), so a
    stage that does not restore those parts from its predecessor does not compare the setting."""
    return dataclasses.field(default=default, metadata={'help': help, 'kind': kind, 'choices': choices,
                                                        'parts': parts})


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = _flag('vigor', 'vigor or cvact', choices=('vigor', 'cvact'))
    data_root: str = _flag('', 'dataset root; empty = the built-in synthetic city (generated on first use)', 'volatile')
    cvact_resampled: str = _flag('', 'resampled CVACT (samples_on_cvact.py output); default <data_root>/resampled',
                                 'volatile')
    cvact_mpp: float = _flag(0.0, 'CVACT metres per pixel of the 1200-px aerial (required on a real CVACT tree)')
    area: str = _flag('same', 'same or cross (VIGOR protocol)', choices=('same', 'cross'))
    labels: str = _flag('original', 'original or corrected (SliceMatch) VIGOR labels', choices=('original', 'corrected'))
    # directories
    run_dir: str = _flag('', 'where checkpoints, logs and results go; default runs/<stage>', 'volatile')
    init_from: str = _flag('', "previous stage's run directory; default runs/<previous stage>", 'volatile')
    allow_unfinished: int = _flag(0, "1 = start from a previous stage whose checkpoint is below the steps its "
                                  'config.json schedules (the step it starts from is logged); 0 = refuse it',
                                  'volatile')
    vgg_weights: str = _flag(os.path.join('data', 'vgg16.npy'), 'ImageNet VGG16 weights (classic TF-VGG npy)',
                             'volatile')
    # model
    seed: int = _flag(0, 'seed of weights, sampling and mining')
    grd_size: tuple = _flag((320, 640), 'ground input H W', 'model')
    sat_size: int = _flag(320, 'aerial input side', 'model')
    width: float = _flag(1.0, 'channel width multiplier (1 = the paper network; <1 for CPU demos)', 'model')
    cholesky: str = _flag('port', 'covariance parametrisation: port (positive diagonal + floor, free '
                          'off-diagonal) or original (elu+1 on all three entries, as released: also sets '
                          '--cholesky_floor 0 unless that flag is given)', 'model', ('port', 'original'), _CHOLESKY)
    cholesky_scale: float = _flag(1.0, 'covariance head output scale (pixels of the 640 frame per unit)', 'model',
                                  parts=_CHOLESKY)
    cholesky_floor: float = _flag(0.01, 'floor added to the Cholesky diagonal (pixels); 0 under --cholesky original '
                                  'unless given (the released head has none)', 'model', parts=_CHOLESKY)
    offset_zero_init: int = _flag(0, '1 = the offset head output layer starts at zero (tile centre)')
    localiser: str = _flag('unet', "E_2/E_3's heatmap localiser: unet (the released U-Net decoder) or correlation "
                           '(NOT the paper\'s: the ground descriptor as a query dotted with every aerial cell, trained '
                           'with a cross-entropy to the true cell; it sees the panorama by construction)', 'model',
                           ('unet', 'correlation'), _DECODERS)
    correlation_dim: int = _flag(64, 'query/key size of the correlation localiser', 'model', parts=_DECODERS)
    decoder_init: str = _flag('released', "U-Net decoder initialisation: released, or scaled (a repair, not the "
                              "paper's: the layers before the first skip get kernels scaled for the taps that see "
                              'their small input maps and zero biases)', choices=('released', 'scaled'))
    skip_norm: int = _flag(0, "1 = a repair, not the paper's: both inputs of each U-Net skip concat at unit RMS per "
                           'example', 'model', parts=_DECODERS)
    # optimisation
    batch: int = _flag(10, 'global batch size')
    epochs: int = _flag(1, 'epochs', 'extend')
    epoch_batch: int = _flag(14, 'an epoch is floor(N / epoch_batch) steps (14: the released code, every stage; '
                             '0: the training batch)')
    max_steps: int = _flag(0, 'stop after this many steps of this stage (0 = epochs x steps per epoch)', 'extend')
    lr: float = _flag(1e-5, 'learning rate')
    lr_decay: float = _flag(1.0, 'lr x decay^(global step / lr_decay_steps)')
    lr_decay_steps: int = _flag(0, 'decay period in steps (0 = one epoch)')
    lr_staircase: int = _flag(0, '1 = decay in steps, 0 = continuous')
    carry_optimizer: int = _flag(1, "1 = restore the previous stage's Adam slots of the restored variables (and in E_1 "
                                 "phase b phase a's global step: its learning-rate schedule continues); 0 = fresh "
                                 "slots and bias correction, and phase b's learning-rate schedule restarts at step 0 "
                                 '(the mining table is carried over either way)')
    adam_eps: float = _flag(1e-8, "Adam's epsilon (1e-8: TF1's default, the released code's); gradients far below "
                            'it barely move their weights')
    # losses
    alpha: float = _flag(10.0, 'triplet loss weight alpha')
    nll: str = _flag('corrected', 'Gaussian NLL: corrected (1/2 on the Mahalanobis term) or original (released '
                     'formula)', choices=('corrected', 'original'))
    nll_pos_weight: float = _flag(1e-3, 'E_2_2 weight of the positive branch NLL')
    nll_semi_weight: float = _flag(1e-4, 'E_2_2 weight of the semi-positive branch NLL')
    heatmap_weight: float = _flag(1.0, 'E_2_1 weight of each branch heatmap loss')
    ce_weight: float = _flag(1.0, "E_2_1 weight of each branch's cross-entropy to the true cell (correlation "
                             'localiser only)')
    u_a: float = _flag(0.3, "E_3 W_m = 1 / (1 + c exp(a (b - u))): a (1/px)")
    u_b: float = _flag(75.0, 'E_3 weight threshold b (pixels of the 640 frame, on the original NLL scale)')
    u_c: float = _flag(2.0, 'E_3 weight constant c')
    u_b_quantile: float = _flag(0.0, "E_3: 0 = b is --u_b; q in (0, 1) = b is the q-quantile of E_3's u table (on the "
                                "released NLL's scale), computed when E_3 starts and kept in its state: puts the "
                                "weight's active band inside a u distribution of another scale than VIGOR's (not the "
                                "paper's setting)")
    # hard-negative mining
    mining: int = _flag(1, 'hard-negative mining on/off')
    mining_pool: int = _flag(10000, 'tiles ranked per mining round')
    mining_topk: int = _flag(100, 'hard tiles kept per panorama')
    mining_start_epoch: int = _flag(2, 'first (1-based) epoch whose batches are half mined')
    mining_fill: int = _flag(0, "0 = the released code's mining: one descriptor table for the stage's run, written "
                             'by the training batches only, so a panorama or tile no batch has held yet ranks with '
                             "a zero descriptor; E_1 phase b continues phase a's table; the table is saved beside "
                             'every checkpoint (1.17 GB at same-area VIGOR). 1 = a buffer per mining epoch, of '
                             "the round's pool only, whose panoramas and tiles no batch held are computed with the "
                             'current weights before the round (those forward passes cost time); saved beside the '
                             'checkpoints inside a mining epoch (0.59 GB)')
    # logging, validation, evaluation
    val_every: int = _flag(1, 'validate on the test split every N epochs and at the end (0 = never); the stages '
                           "default to the released cadence: every epoch in E_1 (both phases), every 10th in E_2_1, "
                           'E_2_2 and E_3', 'volatile')
    val_queries: int = _flag(1000, 'panoramas per validation (all reference tiles are ranked)', 'volatile')
    ckpt_every: int = _flag(500, 'checkpoint every N steps (and at every epoch end)', 'volatile')
    log_every: int = _flag(10, 'progress line and TensorBoard scalars every N steps', 'volatile')
    eval_batch: int = _flag(32, 'batch size of descriptor extraction', 'volatile')
    image_cache_mb: int = _flag(1024, 'decoded, resized images kept in memory for later epochs and validations '
                                '(MiB; 0 = decode every time)', 'volatile')
    eval_block: int = _flag(4096, 'queries per block of the streamed similarity matrix', 'volatile')
    max_queries: int = _flag(0, '--test on the first N test panoramas only (0 = all)', 'volatile')
    yaw: str = _flag('north', "--test orientation protocol: north (north-aligned panoramas), random (each panorama "
                     'rotated by a yaw drawn from --eval_seed: unknown orientation) or a yaw in degrees for every '
                     'panorama (protocols.py)', 'volatile')
    fov: float = _flag(360.0, '--test field of view in degrees around a seeded heading; the rest of the panorama '
                       'is masked (360 = all of it)', 'volatile')
    eval_seed: int = _flag(0, "seed of --test's random yaws and field-of-view headings", 'volatile')
    test_dir: str = _flag('', "where --test writes its settings' directories; default <run_dir>/test (for a "
                          'read-only run directory)', 'volatile')
    plots: int = _flag(1, '--test writes PNG figures (0 = off)', 'volatile')
    strategy: str = _flag('default', 'default, mirrored (several GPUs) or multiworker (several machines)', 'volatile',
                          ('default', 'mirrored', 'multiworker'))
    mixed_precision: int = _flag(0, '1 = mixed_float16 compute with loss scaling (GPU)')
    # set by the stage script, not flags
    stage: str = dataclasses.field(default='', metadata={'kind': 'run'})
    preset: str = dataclasses.field(default='paper', metadata={'kind': 'volatile'})
    test: bool = dataclasses.field(default=False, metadata={'kind': 'volatile'})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FLAGS = tuple(f for f in dataclasses.fields(Config) if 'help' in f.metadata)
KIND = {f.name: f.metadata['kind'] for f in dataclasses.fields(Config)}
PARTS = {f.name: f.metadata.get('parts') for f in dataclasses.fields(Config)}


def settings_of_other_parts(parts):
    """The model settings that shape none of `parts` (a checkpoint of those parts does not depend on them)."""
    return tuple(k for k, p in PARTS.items() if p is not None and not set(p) & set(parts))

# The global presets; a stage adds its own values (Stage.presets) on top.
PRESETS = {
    'paper': {},
    'demo': {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25, 'batch': 10, 'epoch_batch': 0,
             'ckpt_every': 100, 'val_every': 4},
    # study.py: the demo's network on the dials city (2,048 training panoramas); an epoch is
    # floor(N / 4) = 512 steps, so a mining round every 512 steps; the exact (corrected) labels; no validation
    # during training (study.py evaluates every stage on the whole test split)
    'study': {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25, 'batch': 10, 'epoch_batch': 4,
              'labels': 'corrected', 'ckpt_every': 1000, 'val_every': 0, 'log_every': 100},
}


def parser(doc, presets=PRESETS, stage_flags=None):
    """The command line: every Config flag, and `stage_flags` {flag: (setting, help)} of the script's stages
    (stages.Stage.flags), typed as their setting."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--test', action='store_true', help="evaluate this stage's checkpoint")
    p.add_argument('--preset', choices=tuple(presets), default='paper',
                   help='demo = small inputs and width for a CPU run on the synthetic city; study = the '
                        'ambiguity study (study.py)')
    for f in FLAGS:
        nargs = len(f.default) if isinstance(f.default, tuple) else None
        typ = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        p.add_argument('--' + f.name, type=typ, nargs=nargs, default=None, choices=f.metadata['choices'],
                       help=f.metadata['help'] + f' (default {f.default})')
    for name, (setting, text) in (stage_flags or {}).items():
        p.add_argument('--' + name, type=type(DEFAULTS[setting]), default=None, help=text)
    return p


def parse_flags(argv, doc=None, presets=PRESETS, stage_flags=None):
    """argv -> (explicit flags {name: value}, preset name, test)."""
    args = vars(parser(doc, presets, stage_flags).parse_args(argv))
    explicit = {k: v for k, v in args.items() if v is not None and k not in ('test', 'preset')}
    return explicit, args['preset'], args['test']


def resolve(stage_name, explicit, preset='paper', stage_defaults=None, stage_presets=None, test=False):
    """The precedence: explicit flag > preset (stage's over global) > stage default > global default."""
    values = {}
    values.update(stage_defaults or {})
    values.update(PRESETS.get(preset, {}))
    values.update((stage_presets or {}).get(preset, {}))
    values.update(explicit)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if values.get('cholesky') == 'original' and 'cholesky_floor' not in explicit:
        values['cholesky_floor'] = 0.0      # the released head: elu+1 on all three entries, nothing added
    unknown = set(values) - set(KIND)
    if unknown:
        raise ConfigError(f'unknown settings {sorted(unknown)}')
    cfg = Config(**values, stage=stage_name, preset=preset, test=test)
    validate(cfg)
    validate_explicit(cfg, explicit)
    return cfg


def validate(cfg):
    """Refuse impossible values before anything is read or written (one line each)."""
    def need(ok, name, what):
        if not ok:
            raise ConfigError(f'--{name} {_show(getattr(cfg, name))}: {what}')
    for name in ('log_every', 'ckpt_every', 'eval_batch', 'eval_block', 'epochs', 'mining_topk',
                 'mining_pool', 'mining_start_epoch', 'val_queries', 'correlation_dim'):
        need(getattr(cfg, name) >= 1, name, 'must be at least 1')
    need(cfg.batch >= 2, 'batch', 'must be at least 2 (the triplet loss needs a negative in the batch)')
    for name in ('seed', 'eval_seed', 'max_steps', 'max_queries', 'val_every', 'image_cache_mb', 'epoch_batch',
                 'lr_decay_steps'):
        need(getattr(cfg, name) >= 0, name, 'must be 0 or more')
    need(len(cfg.grd_size) == 2 and all(s >= 32 and s % 32 == 0 for s in cfg.grd_size), 'grd_size',
         'both sides must be positive multiples of 32 (the trunk downsamples 32x)')
    need(cfg.grd_size[1] == 2 * cfg.grd_size[0], 'grd_size',
         'the width must be twice the height (a 360-degree panorama is read without distortion, H W = 320 640)')
    need(cfg.sat_size >= 64 and cfg.sat_size % 64 == 0, 'sat_size',
         'must be a positive multiple of 64 (the heatmap decoder of E_2 and E_3 upsamples the 1x1 bottleneck by '
         'side / 64, and every stage uses one size)')
    need(cfg.mining_topk <= cfg.mining_pool, 'mining_topk', f'must not exceed --mining_pool {cfg.mining_pool} '
         '(the hard tiles are the top of the pool)')
    for name in ('width', 'lr', 'lr_decay', 'alpha', 'cholesky_scale', 'adam_eps'):
        need(math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0, name, 'must be a positive number')
    for name in ('cholesky_floor', 'cvact_mpp', 'nll_pos_weight', 'nll_semi_weight', 'heatmap_weight', 'ce_weight',
                 'u_a', 'u_c'):
        need(math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, 'must be 0 or a positive number')
    need(math.isfinite(cfg.u_b), 'u_b', 'must be a number')
    need(0 <= cfg.u_b_quantile < 1, 'u_b_quantile', 'must be 0 (off) or a quantile in (0, 1)')
    need(math.isfinite(cfg.fov) and 0 < cfg.fov <= 360, 'fov', 'must be a number of degrees in (0, 360]')
    try:
        protocols.parse_yaw(cfg.yaw)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ('mining', 'mining_fill', 'allow_unfinished', 'plots', 'mixed_precision', 'lr_staircase',
                 'carry_optimizer', 'offset_zero_init', 'skip_norm'):
        need(getattr(cfg, name) in (0, 1), name, 'must be 0 or 1')
    for name in ('run_dir', 'init_from', 'test_dir', 'data_root', 'cvact_resampled'):
        path = getattr(cfg, name)
        need(not path or not os.path.exists(path) or os.path.isdir(path), name, 'names a file, not a directory')
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


# ----------------------------------------------------------------------------- config.json

def save(cfg, path):
    """Write cfg as JSON, atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:  # a full disk leaves no half-written temporary file
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """A saved config.json -> dict (lists as tuples), or None when there is none; ConfigError if unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'{path}: unreadable run configuration ({type(e).__name__}: {str(e).splitlines()[0]}); '
                          'restore it or use another --run_dir') from None
    if not isinstance(saved, dict):
        raise ConfigError(f'{path}: unreadable run configuration (not a JSON object)')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
# Run settings whose behaviour before they became flags differs from their default: a config.json without the
# key was trained that way, so it is compared as this value (a resume must ask for it explicitly).
BEFORE_FLAG = {'mining_fill': 1}


def mismatch(saved, cfg, kinds=('model', 'run')):
    """The first (key, saved value, value now) whose kind is in `kinds` and differs, else None. A setting the
    saved file lacks (written before the setting existed) counts as the behaviour of that time (BEFORE_FLAG,
    else its default); one the code does not know (written by a newer version) is not compared."""
    now = cfg.to_dict()
    for k in sorted(now):
        was = saved.get(k, BEFORE_FLAG.get(k, DEFAULTS[k]))
        if KIND[k] in kinds and was != now[k]:
            return k, was, now[k]
    return None


def unknown_settings(saved):
    """The keys of a saved config.json that this version's Config lacks (a newer version wrote them)."""
    return sorted(set(saved or {}) - set(KIND))


def check_run_dir(cfg, path):
    """A run directory holds one configuration: refuse ours if it differs in a model or run setting."""
    saved = load(path)
    if saved is None:
        return None
    diff = mismatch(saved, cfg)
    if diff:
        k, a, b = diff
        raise ConfigError(f'{path}: this run directory holds another configuration ({k}: {a} there, {b} now); '
                          'use another --run_dir or the same flags')
    return saved


def inherit(cfg, explicit, names, own_path, prev_path, prev_stage):
    """cfg with the settings `names` a stage reads its predecessor's outputs with (E_3: --nll, the scale of E_2_2's
    u): from the run's own config.json (a resume), else from the predecessor's config.json (`prev_path`), else as
    resolved. One given on the command line that differs from the predecessor's is refused (one line)."""
    prev = load(prev_path) if prev_path else None
    own = load(own_path)
    changes = {}
    for k in names:
        theirs = prev.get(k, BEFORE_FLAG.get(k, DEFAULTS[k])) if prev is not None else None
        if k in explicit:
            if theirs is not None and explicit[k] != theirs:
                raise ConfigError(f'--{k} {_show(explicit[k])}: {prev_stage} in {os.path.dirname(prev_path)} was '
                                  f'trained with --{k} {_show(theirs)} (its config.json), and {cfg.stage} reads its '
                                  f'outputs with that setting; leave --{k} out or pass --{k} {_show(theirs)}')
        elif own is not None and k in own:
            changes[k] = own[k]
        elif theirs is not None:
            changes[k] = theirs
    return cfg.replace(**changes) if changes else cfg


def model_settings(saved, cfg):
    """cfg with the model settings (and seed) of a saved run configuration, for --test."""
    keep = {k: saved.get(k, DEFAULTS[k]) for k in KIND if KIND[k] == 'model' or k in ('seed', 'nll')}
    return cfg.replace(**keep)
