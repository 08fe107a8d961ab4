"""The run configuration: one typed object, its command-line flags, its presets and its config.json.

Precedence, written down once (`resolve`): an explicit flag > a --settings file (the stage's section over
"all") > the preset (`--preset`, the stage's own preset values over the global ones) > the stage's defaults >
the defaults below. A stage's own settings (stages.Stage.settings) are fields of its Config only
(config_class).

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
import os

from geoloc.config_rules import RULES, _show, validate, validate_explicit  # noqa: F401 (config.validate ...)
from geoloc.errors import ConfigError  # noqa: F401 (raised here, caught as <module>.<name>)

# Model parts (model.ALL_PARTS) that some model settings shape; a setting without `parts` shapes every part.
_CHOLESKY = ('pos_cholesky', 'semi_cholesky')
_DECODERS = ('pos_decoder', 'semi_decoder')


def setting(default, help, kind='run', choices=None, parts=None, rule=None):
    """A setting: a Config field, or one of a stage's own (stages.Stage.settings). kind: see above. parts: the
    model parts whose weights a model setting shapes (None: all of them), so a stage that does not restore those
    parts from its predecessor does not compare the setting. rule: the values it takes (RULES), checked by
    `validate` before anything is read or written."""
    return dataclasses.field(default=default, metadata={'help': help, 'kind': kind, 'choices': choices,
                                                        'parts': parts, 'rule': rule})


_flag = setting


def _checked(rule, default, help, kind='run', choices=None, parts=None):
    return setting(default, help, kind, choices, parts, rule)


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = _flag('vigor', 'vigor or cvact', choices=('vigor', 'cvact'))
    data_root: str = _checked('dir', '', 'dataset root; empty = the built-in synthetic city (tools/synthetic_data.py '
                              'writes it)', 'volatile')
    cvact_resampled: str = _checked('dir', '',
                                    'resampled CVACT (samples_on_cvact.py output); default <data_root>/resampled',
                                    'volatile')
    cvact_mpp: float = _checked('>=0.', 0.0,
                                'CVACT metres per pixel of the 1200-px aerial (required on a real CVACT tree)')
    area: str = _flag('same', 'same or cross (VIGOR protocol)', choices=('same', 'cross'))
    labels: str = _flag('original', 'original or corrected (SliceMatch) VIGOR labels', choices=('original', 'corrected'))
    # directories
    run_dir: str = _checked('dir', '', 'where checkpoints, logs and results go; default runs/<stage>', 'volatile')
    init_from: str = _checked('dir', '', "previous stage's run directory; default runs/<previous stage>", 'volatile')
    allow_unfinished: int = _checked('bit', 0,
                                     "1 = start from a previous stage whose checkpoint is below the steps its "
                                     'config.json schedules (the step it starts from is logged); 0 = refuse it',
                                     'volatile')
    vgg_weights: str = _flag(os.path.join('data', 'vgg16.npy'), 'ImageNet VGG16 weights (classic TF-VGG npy)',
                             'volatile')
    # model
    seed: int = _checked('>=0', 0, 'seed of weights, sampling and mining')
    grd_size: tuple = _flag((320, 640), 'ground input H W', 'model')
    sat_size: int = _flag(320, 'aerial input side', 'model')
    width: float = _checked('>0', 1.0, 'channel width multiplier (1 = the paper network; <1 for CPU demos)', 'model')
    cholesky: str = _flag('port', 'covariance head: port (the bottleneck to a positive diagonal + floor, free '
                          'off-diagonal), original (elu+1 on all three entries, as released: also sets '
                          '--cholesky_floor 0 unless that flag is given) or moments (NOT the paper\'s: the heatmap\'s '
                          'own covariance times a learnt scale, plus a learnt floor; geoloc/nn/moments.py)', 'model',
                          ('port', 'original', 'moments'), _CHOLESKY)
    cholesky_scale: float = _checked('>0', 1.0,
                                     'covariance head output scale (pixels of the 640 frame per unit)', 'model',
                                     parts=_CHOLESKY)
    cholesky_floor: float = _checked('>=0.', 0.01,
                                     'floor added to the Cholesky diagonal (pixels); 0 under --cholesky original '
                                     'unless given (the released head has none)', 'model', parts=_CHOLESKY)
    offset_zero_init: int = _checked('bit', 0, '1 = the offset head output layer starts at zero (tile centre)')
    localiser: str = _flag('unet', "E_2/E_3's heatmap localiser: unet (the released U-Net decoder) or correlation "
                           '(NOT the paper\'s: the ground descriptor as a query dotted with every aerial cell, trained '
                           'with a cross-entropy to the true cell; it sees the panorama by construction)', 'model',
                           ('unet', 'correlation'), _DECODERS)
    correlation_dim: int = _checked('>=1', 64, 'query/key size of the correlation localiser', 'model', parts=_DECODERS)
    decoder_init: str = _flag('released', "U-Net decoder initialisation: released, or scaled (a repair, not the "
                              "paper's: the layers before the first skip get kernels scaled for the taps that see "
                              'their small input maps and zero biases)', choices=('released', 'scaled'))
    skip_norm: int = _checked('bit', 0,
                              "1 = a repair, not the paper's: both inputs of each U-Net skip concat at unit RMS per "
                              'example', 'model', parts=_DECODERS)
    # optimisation
    batch: int = _flag(10, 'global batch size')
    epochs: int = _checked('>=1', 1, 'epochs', 'extend')
    epoch_batch: int = _checked('>=0', 14,
                                'an epoch is floor(N / epoch_batch) steps (14: the released code, every stage; '
                                '0: the training batch)')
    max_steps: int = _checked('>=0', 0,
                              'stop after this many steps of this stage (0 = epochs x steps per epoch)', 'extend')
    lr: float = _checked('>0', 1e-5, 'learning rate')
    lr_decay: float = _checked('>0', 1.0, 'lr x decay^(global step / lr_decay_steps)')
    lr_decay_steps: int = _checked('>=0', 0, 'decay period in steps (0 = one epoch)')
    lr_staircase: int = _checked('bit', 0, '1 = decay in steps, 0 = continuous')
    carry_optimizer: int = _checked('bit', 1,
                                    "1 = restore the previous stage's Adam slots of the restored variables (and in E_1 "
                                    "phase b phase a's global step: its learning-rate schedule continues); 0 = fresh "
                                    "slots and bias correction, and phase b's learning-rate schedule restarts at step 0 "
                                    '(the mining table is carried over either way)')
    adam_eps: float = _checked('>0', 1e-8,
                               "Adam's epsilon (1e-8: TF1's default, the released code's); gradients far below "
                               'it barely move their weights')
    # losses
    alpha: float = _checked('>0', 10.0, 'triplet loss weight alpha')
    nll: str = _flag('corrected', 'Gaussian NLL: corrected (1/2 on the Mahalanobis term) or original (released '
                     'formula)', choices=('corrected', 'original'))
    # hard-negative mining
    mining: int = _checked('bit', 1, 'hard-negative mining on/off')
    mining_pool: int = _checked('>=1', 10000, 'tiles ranked per mining round')
    mining_topk: int = _checked('>=1', 100, 'hard tiles kept per panorama')
    mining_start_epoch: int = _checked('>=1', 2, 'first (1-based) epoch whose batches are half mined')
    mining_fill: int = _checked('bit', 0,
                                "0 = the released code's mining: one descriptor table for the stage's run, written "
                                'by the training batches only, so a panorama or tile no batch has held yet ranks with '
                                "a zero descriptor; E_1 phase b continues phase a's table; the table is saved beside "
                                'every checkpoint (1.17 GB at same-area VIGOR). 1 = a buffer per mining epoch, of '
                                "the round's pool only, whose panoramas and tiles no batch held are computed with the "
                                'current weights before the round (those forward passes cost time); saved beside the '
                                'checkpoints inside a mining epoch (0.59 GB)')
    # logging, validation, evaluation
    val_every: int = _checked('>=0', 1,
                              'validate on the test split every N epochs and at the end (0 = never); the stages '
                              "default to the released cadence: every epoch in E_1 (both phases), every 10th in E_2_1, "
                              'E_2_2 and E_3', 'volatile')
    val_queries: int = _checked('>=1', 1000, 'panoramas per validation (all reference tiles are ranked unless '
                                '--val_refs)', 'volatile')
    val_refs: int = _checked('>=0', 0, 'validation ranks its queries against N reference tiles: their positives and '
                             'semi-positives plus seeded distractors, chosen once per run (0 = every reference '
                             'tile, as --test)', 'volatile')
    ckpt_every: int = _checked('>=1', 500, 'checkpoint every N steps (and at every epoch end)', 'volatile')
    log_every: int = _checked('>=1', 10, 'progress line and TensorBoard scalars every N steps', 'volatile')
    eval_batch: int = _checked('>=1', 32, 'batch size of descriptor extraction', 'volatile')
    image_cache_mb: int = _checked('>=0', 1024,
                                   'decoded, resized images kept in memory for later epochs and validations '
                                   '(MiB; 0 = decode every time)', 'volatile')
    eval_block: int = _checked('>=1', 4096, 'queries per block of the streamed similarity matrix', 'volatile')
    max_queries: int = _checked('>=0', 0, '--test on the first N test panoramas only (0 = all)', 'volatile')
    yaw: str = _flag('north', "--test orientation protocol: north (north-aligned panoramas), random (each panorama "
                     'rotated by a yaw drawn from --eval_seed: unknown orientation) or a yaw in degrees for every '
                     'panorama (protocols.py)', 'volatile')
    fov: float = _flag(360.0, '--test field of view in degrees around a seeded heading; the rest of the panorama '
                       'is masked (360 = all of it)', 'volatile')
    eval_seed: int = _checked('>=0', 0, "seed of --test's random yaws and field-of-view headings", 'volatile')
    test_dir: str = _checked('dir', '', "where --test writes its settings' directories; default <run_dir>/test (for a "
                             'read-only run directory)', 'volatile')
    plots: int = _checked('bit', 1, '--test writes PNG figures (0 = off)', 'volatile')
    calibrate: int = _checked('bit', 0, "with --test: fit the ellipses' scale on this --data_root's test split, held-out "
                              'panoramas, into <run_dir>/calibration.json (docs/evaluation.md)', 'volatile')
    strategy: str = _flag('default', 'default, mirrored (several GPUs) or multiworker (several machines)', 'volatile',
                          ('default', 'mirrored', 'multiworker'))
    mixed_precision: int = _checked('bit', 0, '1 = mixed_float16 compute with loss scaling (GPU)')
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
_CLASSES = {}


def config_class(own=()):
    """The Config of a stage with its own settings (stages.Stage.settings: ((name, setting(...)), ...)) added as
    fields: their flags, defaults, kinds, parts and rules are read as the shared ones' are. No own settings:
    Config itself."""
    if not own:
        return Config
    key = tuple((name, field.default, tuple(field.metadata.items())) for name, field in own)
    if key not in _CLASSES:
        clash = [name for name, _ in own if name in KIND]
        if clash:
            raise ConfigError(f'stage settings {clash} are already shared settings (config.Config)')
        _CLASSES[key] = dataclasses.make_dataclass(
            'StageConfig', [(name, type(field.default), field) for name, field in own], bases=(Config,), frozen=True)
    return _CLASSES[key]


def kinds_of(cls):
    return {f.name: f.metadata['kind'] for f in dataclasses.fields(cls)}


def defaults_of(cls):
    return {f.name: f.default for f in dataclasses.fields(cls)}


def settings_of_other_parts(parts):
    """The model settings that shape none of `parts` (a checkpoint of those parts does not depend on them)."""
    return tuple(k for k, p in PARTS.items() if p is not None and not set(p) & set(parts))

# The global presets; a stage adds its own values (Stage.presets) on top.
PRESETS = {
    'paper': {},
    # demo: not the paper's localiser and covariance, which do not work at this size (the released U-Net ignores
    # the panorama: benchmarks/README.md); --preset paper keeps the released ones
    'demo': {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25, 'batch': 10, 'epoch_batch': 0,
             'ckpt_every': 100, 'val_every': 4, 'localiser': 'correlation', 'cholesky': 'moments'},
}


def parser(doc, presets=PRESETS, stage_flags=None, own=(), defaults_text=None):
    """The command line: every Config flag, the stages' own settings `own` ((name, setting), ...), and
    `stage_flags` {flag: (setting, help)} of the script's stages (stages.Stage.flags), typed as their setting.
    defaults_text: {setting: what --help says its default is} where the script's stages set their own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--test', action='store_true', help="evaluate this stage's checkpoint")
    p.add_argument('--preset', choices=tuple(presets), default='paper',
                   help='demo = small inputs and width for a CPU run on the synthetic city, with the correlation '
                        "localiser and the moments covariance (not the paper's); paper = the paper's values")
    p.add_argument('--settings', default='', metavar='FILE',
                   help='a JSON file of settings: {"all": {setting: value}, "<stage>": {...}}; below the flags, '
                        'above the preset (an experiment keeps its settings in its own file)')
    seen = set()
    for name, f in tuple((f.name, f) for f in FLAGS) + tuple(own):
        if name in seen:
            continue
        seen.add(name)
        nargs = len(f.default) if isinstance(f.default, tuple) else None
        typ = type(f.default[0]) if isinstance(f.default, tuple) else type(f.default)
        default = (defaults_text or {}).get(name, _show(f.default))
        p.add_argument('--' + name, type=typ, nargs=nargs, default=None, choices=f.metadata['choices'],
                       help=f.metadata['help'] + f' (default {default})')
    for name, (setting_, text) in (stage_flags or {}).items():
        typ = type(DEFAULTS[setting_] if setting_ in DEFAULTS else dict(own)[setting_].default)
        p.add_argument('--' + name, type=typ, default=None, help=text)
    return p


def parse_args(argv, doc=None, presets=PRESETS, stage_flags=None, own=(), defaults_text=None):
    """argv -> (explicit flags {name: value}, preset name, test, settings file path or ''); defaults_text: see
    parser."""
    args = vars(parser(doc, presets, stage_flags, own, defaults_text).parse_args(argv))
    explicit = {k: v for k, v in args.items() if v is not None and k not in ('test', 'preset', 'settings')}
    return explicit, args['preset'], args['test'], args['settings']


def parse_flags(argv, doc=None, presets=PRESETS, stage_flags=None):
    """argv -> (explicit flags {name: value}, preset name, test)."""
    return parse_args(argv, doc, presets, stage_flags)[:3]


def read_settings(path):
    """A --settings file -> {section: {setting: value}}; ConfigError in one line if it is not such a file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'--settings {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})') from None
    if isinstance(data, dict):   # keys starting with '_' are comments
        data = {k: v for k, v in data.items() if not k.startswith('_')}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f'--settings {path}: expected a JSON object of sections, each an object of settings '
                          '({"all": {...}, "<stage>": {...}})')
    return data


def stage_settings(data, stage_name, path, known):
    """The values a --settings file gives one stage: its "all" section, then its own section over it; a key
    the stage does not know is refused (one line)."""
    values = dict(data.get('all', {}), **data.get(stage_name, {}))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f'--settings {path}: {stage_name} has no setting {unknown[0]!r}')
    return values


def resolve(stage_name, explicit, preset='paper', stage_defaults=None, stage_presets=None, test=False, own=(),
            file_values=None):
    """The precedence: explicit flag > --settings file > preset (stage's over global) > stage default > global
    default. own: the stage's own settings (stages.Stage.settings)."""
    cls = config_class(own)
    values = {}
    values.update(stage_defaults or {})
    values.update(PRESETS.get(preset, {}))
    values.update((stage_presets or {}).get(preset, {}))
    values.update(file_values or {})
    values.update(explicit)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if values.get('cholesky') == 'original' and 'cholesky_floor' not in explicit:
        values['cholesky_floor'] = 0.0      # the released head: elu+1 on all three entries, nothing added
    unknown = set(values) - set(kinds_of(cls))
    if unknown:
        raise ConfigError(f'unknown settings {sorted(unknown)}')
    cfg = cls(**values, stage=stage_name, preset=preset, test=test)
    validate(cfg)
    validate_explicit(cfg, explicit)
    return cfg


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
    now, kind, default = cfg.to_dict(), kinds_of(type(cfg)), defaults_of(type(cfg))
    for k in sorted(now):
        was = saved.get(k, BEFORE_FLAG.get(k, default[k]))
        if kind[k] in kinds and was != now[k]:
            return k, was, now[k]
    return None


def unknown_settings(saved, cls=Config):
    """The keys of a saved config.json that the stage's Config (`cls`, config_class) lacks: a newer version
    wrote them, or a version that kept the setting elsewhere."""
    return sorted(set(saved or {}) - set(kinds_of(cls)))


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
        theirs = prev.get(k, BEFORE_FLAG.get(k, defaults_of(type(cfg))[k])) if prev is not None else None
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
    kind, default = kinds_of(type(cfg)), defaults_of(type(cfg))
    keep = {k: saved.get(k, default[k]) for k in kind if kind[k] == 'model' or k in ('seed', 'nll')}
    return cfg.replace(**keep)
