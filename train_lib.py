"""The one training/evaluation loop shared by every stage script.

A stage script describes itself with a `Stage` (which model parts it builds, trains and restores,
its defaults and its loss) and calls `main(stages)`. This module owns the rest: flags and the
resolved config, datasets, initialisation order, the tf.function step, checkpoints, hard-negative
mining, logging/TensorBoard and `--test`.

Initialisation order (logged): 1. resume this run's latest checkpoint; 2. else restore the named
parts of the previous stage's checkpoint (--init_from); 3. else ImageNet VGG16 (data/vgg16.npy);
4. else random.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def _load_tensorflow():
    """Import TensorFlow in this project's environment (a stage script imports this module first).

    TF_CPP_MIN_LOG_LEVEL 2: an error stays one line. TF_ENABLE_ONEDNN_OPTS 1: oneDNN kernels, also on
    CPUs without AVX-512 where TF 2.21 leaves them off (1.4 to 2.3x faster demo-size steps on this project's
    AVX2 machine, 1.4-1.6x slower paper-size ones: benchmarks/README.md). Both can be set otherwise in the shell.
    With oneDNN on, TensorFlow writes a notice to fd 2 before any log level applies, so the import runs
    with fd 2 on a temporary file, whose other lines are passed on.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    if 'tensorflow' in sys.modules:
        return sys.modules['tensorflow']
    notices = ('oneDNN custom operations are on', 'All log messages before absl::InitializeLog()')
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(line for line in lines if not any(n in line for n in notices)))
            sys.stderr.flush()
    return tensorflow


tf = _load_tensorflow()

import evaluation  # noqa: E402  (after TensorFlow's environment is set)
import geometry  # noqa: E402
import input_data  # noqa: E402
import losses  # noqa: E402
import model as model_lib  # noqa: E402
import pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Flags shared by every stage: name -> (default, type, help). Stage defaults override these;
# `--preset demo` overrides both for flags not given on the command line.
FLAGS = {
    'dataset': ('vigor', str, 'vigor or cvact'),
    'data_root': ('', str, 'dataset root; empty = the built-in synthetic city (generated on first use)'),
    'cvact_resampled': ('', str, 'resampled CVACT (samples_on_cvact.py output); default <data_root>/resampled'),
    'cvact_mpp': (0.0, float, 'CVACT metres per pixel of the 1200-px aerial (0 = the synthetic value)'),
    'area': ('same', str, 'same or cross (VIGOR protocol)'),
    'labels': ('original', str, 'original or corrected (SliceMatch) VIGOR labels'),
    'run_dir': ('', str, 'where checkpoints, logs and results go; default runs/<stage>'),
    'init_from': ('', str, "previous stage's run directory; default runs/<previous stage>"),
    'vgg_weights': (os.path.join('data', 'vgg16.npy'), str, 'ImageNet VGG16 weights (classic TF-VGG npy)'),
    'seed': (0, int, 'seed of weights, sampling and mining'),
    'grd_size': ((320, 640), int, 'ground input H W'),
    'sat_size': (320, int, 'aerial input side'),
    'width': (1.0, float, 'channel width multiplier (1 = the paper network; <1 for CPU demos)'),
    'batch': (10, int, 'global batch size'),
    'epochs': (1, int, 'epochs (passes over the training panoramas)'),
    'max_steps': (0, int, 'stop after this many steps in total (0 = epochs x steps per epoch)'),
    'lr': (1e-5, float, 'learning rate'),
    'lr_decay': (1.0, float, 'lr x decay^(step / lr_decay_steps)'),
    'lr_decay_steps': (0, int, 'decay period in steps (0 = one epoch)'),
    'lr_staircase': (1, int, '1 = decay in steps, 0 = continuous'),
    'alpha': (10.0, float, 'triplet loss weight alpha'),
    'mining': (1, int, 'hard-negative mining on/off'),
    'mining_pool': (40000, int, 'tiles ranked per mining round'),
    'mining_topk': (100, int, 'hard tiles kept per panorama'),
    'mining_start_epoch': (2, int, 'first (1-based) epoch whose batches are half mined'),
    'val_every': (1, int, 'validate on the test split every N epochs and at the end (0 = never)'),
    'val_queries': (1000, int, 'panoramas per validation (all reference tiles are ranked)'),
    'ckpt_every': (500, int, 'checkpoint every N steps (and at every epoch end)'),
    'log_every': (10, int, 'progress line and TensorBoard scalars every N steps'),
    'eval_batch': (32, int, 'batch size of descriptor extraction'),
    'image_cache_mb': (1024, int, 'decoded, resized images kept in memory for the next epochs and validations '
                                  '(MiB; 0 = decode every time)'),
    'eval_block': (4096, int, 'queries per block of the streamed similarity matrix'),
    'max_queries': (0, int, '--test on the first N test panoramas only (0 = all)'),
    'plots': (1, int, '--test writes PNG figures (0 = off)'),
    'strategy': ('default', str, 'default, mirrored (several GPUs) or multiworker (several machines)'),
    'mixed_precision': (0, int, '1 = mixed_float16 compute with loss scaling (GPU)'),
}
CHOICES = {'dataset': ('vigor', 'cvact'), 'area': ('same', 'cross'), 'labels': ('original', 'corrected'),
           'strategy': ('default', 'mirrored', 'multiworker')}
# Keys that may change between a run and its resumption or its --test.
VOLATILE = {'run_dir', 'init_from', 'val_every', 'val_queries', 'ckpt_every', 'log_every', 'eval_batch', 'eval_block', 'image_cache_mb', 'max_queries', 'plots', 'test',
            'preset', 'data_root', 'cvact_resampled', 'vgg_weights', 'strategy'}
MODEL_KEYS = ('grd_size', 'sat_size', 'width')
DEMO = {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25, 'batch': 10, 'ckpt_every': 100, 'val_every': 4}


class UserError(Exception):
    """A problem the user must fix; printed as one line, exit status 2."""


@dataclasses.dataclass
class Stage:
    name: str                   # run name, e.g. 'E_2_1'
    parts: tuple                # model parts built (model.ALL_PARTS)
    train_parts: tuple          # parts whose variables the optimiser updates
    loss: callable              # (model, batch, ctx) -> (total, {name: scalar})
    restore: tuple = ()         # parts restored from the previous stage
    previous: str = ''          # previous stage's run name ('' = start from ImageNet)
    previous_cmd: str = ''      # the command that produces it
    accepts: tuple = ()         # stage names whose checkpoints --init_from may hold
    defaults: dict = dataclasses.field(default_factory=dict)
    demo: dict = dataclasses.field(default_factory=dict)   # --preset demo values
    needs_semi: bool = True     # the loss looks at the semi-positive tile
    localise: str = ''          # --test localisation: 'offset', 'heatmap' or '' (none)
    prepare: callable = None    # (run) -> extra constants for the loss (E_3's u table)
    run_name: str = ''          # default run directory runs/<run_name> (default: name)
    subdir: str = ''            # run directory below the script's --run_dir (E_1's phase a)
    init_subdir: str = ''       # the previous stage lives in <run_dir>/<init_subdir> (E_1's phase b)


# ----------------------------------------------------------------------------- config

def parse_config(stages, argv):
    """Flags -> resolved config dict: explicit flag > demo preset > stage defaults > FLAGS."""
    p = argparse.ArgumentParser(description=sys.modules['__main__'].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--test', action='store_true', help="evaluate this stage's checkpoint")
    p.add_argument('--preset', choices=('paper', 'demo'), default='paper',
                   help='demo = small inputs and width for a CPU run on the synthetic city')
    for name, (default, typ, help_) in FLAGS.items():
        nargs = len(default) if isinstance(default, tuple) else None
        p.add_argument('--' + name, type=typ, nargs=nargs, default=None, choices=CHOICES.get(name), help=help_)
    args = vars(p.parse_args(argv))
    configs = []
    for stage in stages:
        cfg = {k: v[0] for k, v in FLAGS.items()}
        cfg.update(stage.defaults)
        if args['preset'] == 'demo':
            cfg.update(DEMO)
            cfg.update(stage.demo)
        cfg.update({k: v for k, v in args.items() if v is not None and k in FLAGS})
        cfg['test'], cfg['preset'], cfg['stage'] = args['test'], args['preset'], stage.name
        cfg['grd_size'] = tuple(cfg['grd_size'])
        configs.append(cfg)
    return configs


def stage_dirs(stage, cfg):
    base = cfg['run_dir'] or os.path.join('runs', stage.run_name or stage.name)
    run_dir = os.path.join(base, stage.subdir) if stage.subdir else base
    if stage.init_subdir:
        return run_dir, os.path.join(base, stage.init_subdir)
    init_from = cfg['init_from'] or (os.path.join('runs', stage.previous) if stage.previous else '')
    return run_dir, init_from


def check_config(run_dir, cfg, write=True):
    """Refuse a run directory that holds another configuration; then (write=True) save ours if it has none.

    The first start's record is kept: a resumed run differs at most in VOLATILE keys, and a run that fails
    later (bad image, non-finite loss) must leave the directory as it found it.
    """
    path = os.path.join(run_dir, 'config.json')
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for k in sorted(set(old) | set(cfg)):
            if k in VOLATILE:
                continue
            a, b = old.get(k), cfg.get(k)
            if isinstance(a, list):
                a = tuple(a)
            if a != b:
                raise UserError(f'{path}: this run directory holds another configuration ({k}: {a} there, '
                                f'{b} now); use another --run_dir or the same flags')
    if not write or os.path.exists(path):
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(cfg, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- data

def dataset_splits(cfg, which):
    """Load the 'train' or 'test' split of the configured dataset (generating the synthetic one)."""
    import synthetic_data
    root = cfg['data_root']
    if cfg['dataset'] == 'vigor':
        if not root:
            root = synthetic_data.ensure_vigor(os.path.join(HERE, 'data', 'synthetic_vigor'))
        return input_data.load_vigor(root, which, cfg['area'], cfg['labels'])
    mpp = cfg['cvact_mpp'] or synthetic_data.CVACT_MPP_1200
    if not root:
        root = synthetic_data.ensure_cvact(os.path.join(HERE, 'data', 'synthetic_cvact'))
    resampled = cfg['cvact_resampled'] or os.path.join(root, 'resampled')
    if not cfg['data_root'] and not os.path.exists(os.path.join(resampled, 'splits', 'test.txt')):
        import samples_on_cvact
        samples_on_cvact.resample(root, resampled, seed=0)
    return input_data.load_cvact(root, resampled, which, mpp)


# ----------------------------------------------------------------------------- logging

class Log:
    """Prints progress and appends it to <run_dir>/train.log."""

    def __init__(self, run_dir, prefix):
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, 'train.log'), 'a')
        self.prefix = prefix

    def __call__(self, msg):
        line = f'[{self.prefix}] {msg}'
        print(line, flush=True)
        self.file.write(time.strftime('%Y-%m-%d %H:%M:%S ') + line + '\n')
        self.file.flush()


# ----------------------------------------------------------------------------- optimiser

class Adam(tf.Module):
    """Adam (TF1 defaults, eps 1e-8) with lr = base x decay^(step / period), staircase or not.

    Slots are created for `variables` in the order given, so a checkpoint restores them by position.
    """

    def __init__(self, variables, lr, decay=1.0, period=1, staircase=True, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(name='adam')
        self.strategy = tf.distribute.get_strategy()  # build under the run's strategy.scope()
        self.vars = list(variables)
        self.lr, self.decay, self.period, self.staircase = lr, decay, max(1, period), staircase
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.iterations = tf.Variable(0, dtype=tf.int64, name='iterations', trainable=False)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name='m') for v in self.vars]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name='v') for v in self.vars]

    def learning_rate(self, step=None):
        step = tf.cast(self.iterations if step is None else step, tf.float32)
        e = step / self.period
        if self.staircase:
            e = tf.floor(e)
        return self.lr * tf.pow(tf.constant(self.decay, tf.float32), e)

    def apply(self, grads):
        """One update from the (cross-replica summed) gradients, in cross-replica context.

        m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; var -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps),
        as TF's fused ResourceApplyAdam kernel: one pass over var, m, v (the update is memory-bound), run by
        strategy.extended.update on every replica's copy of the variable.
        """
        lr = self.learning_rate()
        t = tf.cast(self.iterations + 1, tf.float32)
        b1_power, b2_power = self.beta1 ** t, self.beta2 ** t

        def update(var, g, m, v):
            return tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power,
                                                beta2_power=b2_power, lr=lr, beta1=self.beta1, beta2=self.beta2,
                                                epsilon=self.eps, grad=g)

        for var, g, m, v in zip(self.vars, grads, self.m, self.v):
            if g is not None:
                self.strategy.extended.update(var, update, args=(g, m, v), group=False)
        self.iterations.assign_add(1)


# ----------------------------------------------------------------------------- the run

class LossContext:
    """What a stage's loss needs beyond the batch: the cross-replica gather, constants, config."""

    def __init__(self, cfg, consts):
        self.cfg, self.consts = cfg, consts
        rc = tf.distribute.get_replica_context()
        self.n_replicas = rc.num_replicas_in_sync if rc else 1
        self.replica_id = rc.replica_id_in_sync_group if rc else 0
        self.rc = rc

    def gather(self, x):
        """[b, ...] this replica -> [B, ...] the global batch (replica order)."""
        if self.n_replicas == 1:
            return x
        return self.rc.all_gather(x, axis=0)

    def triplet(self, grd, sat):
        """The triplet loss of this replica's anchors against the whole global batch."""
        b = tf.shape(grd)[0]
        return losses.triplet_loss(grd, sat, self.cfg['alpha'], self.gather(grd), self.gather(sat),
                                   row_offset=self.replica_id * b)

    def mean(self, x):
        """A per-replica batch mean as its share of the global mean (summed over replicas)."""
        return x / self.n_replicas


def embed(model, batch, needs_semi):
    """Forward the batch's three images: normalised and raw descriptors, aerial skips."""
    out = {'grd_raw': model.embed_grd(batch['grd'])}
    out['sat_raw'], out['sat_skips'] = model.embed_sat(batch['sat'])
    if needs_semi:
        out['semi_raw'], out['semi_skips'] = model.embed_sat(batch['semi'])
        out['semi'] = model_lib.l2_normalize(out['semi_raw'])
    out['grd'] = model_lib.l2_normalize(out['grd_raw'])
    out['sat'] = model_lib.l2_normalize(out['sat_raw'])
    return out


def make_strategy(name):
    """default: one device; mirrored: every GPU of this machine (every logical CPU when it has no GPU);
    multiworker: every machine of TF_CONFIG's cluster, each with its GPUs (or its CPU).

    GEOLOC_LOGICAL_CPUS=N first splits the CPU into N logical devices, so a CPU-only machine can rehearse
    a multi-device run (tests, debugging); it must act before TensorFlow's runtime starts.
    """
    n_cpus = int(os.environ.get('GEOLOC_LOGICAL_CPUS') or 1)
    if n_cpus > 1:
        cpu = tf.config.list_physical_devices('CPU')[0]
        if tf.config.get_logical_device_configuration(cpu) is None:  # not yet split (E_1 builds two Runs)
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n_cpus)
            except RuntimeError as e:
                raise UserError(f'GEOLOC_LOGICAL_CPUS={n_cpus}: TensorFlow started before the CPU could be '
                                f'split ({e})') from None
    if name == 'mirrored':
        gpus = tf.config.list_logical_devices('GPU')
        return tf.distribute.MirroredStrategy(None if gpus else [d.name for d in tf.config.list_logical_devices('CPU')])
    if name == 'multiworker':
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def build_model(stage, cfg):
    return model_lib.CrossViewModel(cfg['grd_size'], cfg['sat_size'], cfg['width'], stage.parts, seed=cfg['seed'])


def latest_checkpoint(run_dir):
    return tf.train.latest_checkpoint(os.path.join(run_dir, 'ckpt'))


def restore_parts(model, parts, ckpt_path, what):
    """Restore exactly `parts` of the model from a checkpoint saved with Checkpoint(model=...)."""
    holder = tf.Module()
    for p in parts:
        setattr(holder, p, getattr(model, p))
    try:
        status = tf.train.Checkpoint(model=holder).read(ckpt_path).expect_partial()
    except ValueError as e:  # a variable of another shape
        raise UserError(f'{ckpt_path}: checkpoint of another architecture than {what} with these flags '
                        f'({str(e).splitlines()[0][:160]})') from None
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise UserError(f'{ckpt_path}: restoring {", ".join(parts)} from {what} matched nothing '
                        f'for some of them ({str(e).splitlines()[0][:160]})') from None


def check_init_from(stage, cfg, init_from):
    """The previous stage's checkpoint must exist and be of a compatible stage and architecture."""
    ckpt = latest_checkpoint(init_from) if init_from else None
    if not ckpt:
        raise UserError(f'{init_from}: no checkpoint of {stage.previous}; run `{stage.previous_cmd}` first '
                        '(or pass --init_from)')
    path = os.path.join(init_from, 'config.json')
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        if stage.accepts and prev.get('stage') not in stage.accepts:
            raise UserError(f'{init_from}: holds a {prev.get("stage")} checkpoint, {stage.name} starts from '
                            f'{" or ".join(stage.accepts)}')
        for k in MODEL_KEYS:
            a = tuple(prev[k]) if isinstance(prev.get(k), list) else prev.get(k)
            if a != cfg[k]:
                raise UserError(f'{init_from}: checkpoint of another architecture ({k}: {a} there, {cfg[k]} '
                                'here)')
    return ckpt


class Run:
    """One stage's training run in its run directory."""

    def __init__(self, stage, cfg):
        self.stage, self.cfg = stage, cfg
        self.run_dir, self.init_from = stage_dirs(stage, cfg)
        self.strategy = make_strategy(cfg['strategy'])
        # Under MultiWorkerMirroredStrategy only the chief writes the run directory; the other workers read
        # it (resume, previous stage) and keep their own checkpoints and log in a temporary directory.
        self.chief = self.strategy.extended.should_checkpoint
        self.write_dir = self.run_dir if self.chief else tempfile.mkdtemp(prefix=f'geoloc_{stage.name}_worker_')
        self.log = Log(self.write_dir, stage.name if self.chief else
                       f'{stage.name} worker {self.strategy.cluster_resolver.task_id}')
        self.images = input_data.ImageCache(cfg['image_cache_mb'] * 2 ** 20) if cfg['image_cache_mb'] > 0 else None
        replicas = self.strategy.num_replicas_in_sync
        if cfg['batch'] % replicas:
            raise UserError(f'--batch {cfg["batch"]} must be a multiple of the {replicas} replicas (global batch)')
        if cfg['strategy'] != 'default':
            self.log(f'strategy: {cfg["strategy"]}, {replicas} replicas')

    # --- initialisation ------------------------------------------------------------------
    def build(self, train_split):
        cfg, stage = self.cfg, self.stage
        spe = len(train_split) // cfg['batch']
        with self.strategy.scope():
            self.model = build_model(stage, cfg)
            variables = self.model.part_variables(stage.train_parts)
            period = cfg['lr_decay_steps'] or spe
            self.opt = Adam(variables, cfg['lr'], cfg['lr_decay'], period, bool(cfg['lr_staircase']))
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            k = cfg['mining_topk']
            self.hard = tf.Variable(np.zeros((len(train_split), k), np.int32), trainable=False, name='hard')
            self.hard_valid = tf.Variable(False, trainable=False, name='hard_valid')
            self.loss_scale = tf.Variable(2.0 ** 15 if cfg['mixed_precision'] else 1.0, trainable=False,
                                          name='loss_scale')
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.opt, step=self.step, hard=self.hard,
                                        hard_valid=self.hard_valid, loss_scale=self.loss_scale)
        self.manager = tf.train.CheckpointManager(self.ckpt, os.path.join(self.write_dir, 'ckpt'), max_to_keep=2)

    def initialise(self):
        """Resume, else previous stage, else ImageNet, else random; log which one ran."""
        latest = latest_checkpoint(self.run_dir)
        if latest:
            self.ckpt.read(latest).assert_existing_objects_matched()
            self.log(f'init: resumed this run from {latest} (step {int(self.step.numpy())})')
            return
        if self.stage.previous:
            ckpt = check_init_from(self.stage, self.cfg, self.init_from)
            restore_parts(self.model, self.stage.restore, ckpt, self.stage.previous)
            fresh = [p for p in self.stage.parts if p not in self.stage.restore]
            self.log(f'init: {", ".join(self.stage.restore)} from {ckpt}'
                     + (f'; fresh: {", ".join(fresh)}' if fresh else ''))
            return
        model_lib.load_imagenet(self.model, self.cfg['vgg_weights'], self.log)

    # --- the step ------------------------------------------------------------------------
    def make_step(self, consts):
        model, stage, cfg, opt, strategy = self.model, self.stage, self.cfg, self.opt, self.strategy
        mixed = bool(cfg['mixed_precision'])
        if mixed:
            with strategy.scope():  # finite steps since the loss scale last changed (not checkpointed)
                good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name='loss_scale_good_steps')

        def replica_step(batch):
            if mixed:
                batch = dict(batch, **{k: tf.cast(batch[k], tf.float16) for k in ('grd', 'sat', 'semi')})
            ctx = LossContext(cfg, consts)
            with tf.GradientTape() as tape:
                total, scalars, desc = stage.loss(model, batch, ctx)
                scaled = total * self.loss_scale if mixed else total
            grads = tape.gradient(scaled, opt.vars)
            if mixed:  # (in float32 the division by 1 would be a pass over every gradient: 2.5 % of a paper step)
                grads = [None if g is None else tf.cast(g, tf.float32) / self.loss_scale for g in grads]
            # every worker gets the whole global batch's descriptors and ids for mining, in row order
            # (ids as float32, exact below 2^24: collectives of int64 tensors fail across workers)
            desc = dict(desc, pano=batch['pano'], sat_idx=batch['sat_idx'])
            desc = {k: ctx.gather(tf.cast(v, tf.float32)) for k, v in desc.items()}
            return total, scalars, grads, desc

        def step_fn(batch):
            total, scalars, grads, desc = strategy.run(replica_step, (batch,))
            red = lambda x: strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None)
            total = red(total)
            scalars = {k: red(v) for k, v in scalars.items()}
            grads = [None if g is None else red(g) for g in grads]
            finite_grads = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
            ok = tf.logical_and(tf.math.is_finite(total), finite_grads)
            if mixed:  # dynamic loss scale: an overflow halves it and skips the update; 2000 finite steps double it
                grow = tf.logical_and(finite_grads, good_steps >= 1999)
                self.loss_scale.assign(tf.where(finite_grads, tf.where(grow, 2 * self.loss_scale, self.loss_scale),
                                                self.loss_scale / 2))
                good_steps.assign(tf.where(tf.logical_and(finite_grads, tf.logical_not(grow)), good_steps + 1, 0))
            tf.cond(ok, lambda: (opt.apply(grads), tf.constant(True))[1], lambda: tf.constant(False))
            if mixed:  # a skipped overflow is no reason to stop training, unless the scale has collapsed
                ok = tf.logical_and(tf.math.is_finite(total), tf.logical_or(finite_grads, self.loss_scale >= 1))
            desc = {k: strategy.experimental_local_results(v)[0] for k, v in desc.items()}
            return total, scalars, ok, desc

        return tf.function(step_fn, autograph=False)

    # --- mining --------------------------------------------------------------------------
    def mine(self, epoch, buf, train_split):
        """End of `epoch`: rank the pool against every training panorama with the descriptors gathered
        during the epoch (computing the ones it did not see); the top-k tile ids become the hard table."""
        self.fill_missing(buf, train_split)
        table = hard_negatives(buf.grd, buf.sat, buf.pool, self.cfg['mining_topk'])
        self.hard.assign(self.broadcast(table))
        self.hard_valid.assign(True)
        self.log(f'mining: epoch {epoch + 1}: top-{min(self.cfg["mining_topk"], len(buf.pool))} of '
                 f'{len(buf.pool)} tiles for {len(train_split)} panoramas')

    def broadcast(self, table):
        """The chief's int32 table on every worker (tables computed apart could differ in a float tie)."""
        if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return table

        def first(x):
            ctx = tf.distribute.get_replica_context()
            keep = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x * keep)
        out = self.strategy.run(first, (tf.constant(table, tf.float32),))  # ids < 2^24: exact in float32
        return self.strategy.experimental_local_results(out)[0].numpy().astype(np.int32)

    def fill_missing(self, buf, split):
        """Descriptors the epoch did not gather (panoramas and pool tiles never sampled, or sampled before
        a resume): computed with the current weights."""
        cfg = self.cfg
        for out, seen, ids, paths, kind, hw in (
                (buf.grd, buf.grd_seen, np.arange(len(split)), split.pano_paths, 'panorama', cfg['grd_size']),
                (buf.sat, buf.sat_seen, buf.pool, split.tile_paths, 'aerial', (cfg['sat_size'],) * 2)):
            missing = np.flatnonzero(~seen)
            if len(missing) == 0:
                continue
            ds = pipeline.image_dataset([paths[i] for i in ids[missing]], hw, kind, cfg['eval_batch'],
                                        cache=self.images)
            for images, idx in ds:
                out[missing[idx.numpy()]] = self.describe_fns[kind](images).numpy()
            seen[missing] = True

    @functools.cached_property
    def describe_fns(self):
        """L2-normalised descriptors of a batch of 'panorama' / 'aerial' images, traced once per run."""
        grd = lambda x: model_lib.l2_normalize(self.model.embed_grd(x))
        sat = lambda x: model_lib.l2_normalize(self.model.embed_sat(x)[0])
        return {'panorama': tf.function(grd, autograph=False, reduce_retracing=True),
                'aerial': tf.function(sat, autograph=False, reduce_retracing=True)}

    # --- training ------------------------------------------------------------------------
    def train(self):
        cfg, stage = self.cfg, self.stage
        check_config(self.run_dir, cfg, write=False)
        split = dataset_splits(cfg, 'train')
        sampler = input_data.BatchSampler(split, cfg['batch'], cfg['seed'])
        self.build(split)
        self.initialise()
        check_config(self.run_dir, cfg, write=self.chief)  # only once the run can start: a refused run changes nothing
        spe = sampler.steps_per_epoch
        total = cfg['epochs'] * spe
        if cfg['max_steps']:
            total = min(total, cfg['max_steps'])
        consts = stage.prepare(self) if stage.prepare else {}
        step_fn = self.make_step(consts)
        writer = tf.summary.create_file_writer(os.path.join(self.write_dir, 'tb'))
        self.log(f'{split.name}: {len(split)} panoramas, {len(split.tile_paths)} tiles; batch {cfg["batch"]}, '
                 f'{spe} steps/epoch, {total} steps; parts trained: {", ".join(stage.train_parts)}')
        step = int(self.step.numpy())
        if step >= total:
            self.log(f'already trained ({step} steps); nothing to do')
            return self.finish()
        t0, t_last, s_last = time.time(), time.time(), step
        while step < total:
            epoch, offset = divmod(step, spe)
            use_hard = cfg['mining'] and bool(self.hard_valid.numpy()) and epoch + 1 >= cfg['mining_start_epoch']
            panos, semi = sampler.epoch_plan(epoch, self.hard.numpy() if use_hard else None)
            end = min(spe, offset + total - step)
            ds = pipeline.train_dataset(split, panos[offset:end], semi[offset:end], cfg['grd_size'],
                                        cfg['sat_size'], cfg['batch'], cache=self.images,
                                        with_semi=stage.needs_semi)
            ds = self.strategy.experimental_distribute_dataset(ds)
            # mine at the end of a complete epoch whose successor exists and takes mined batches
            mine_now = (cfg['mining'] and epoch + 2 >= cfg['mining_start_epoch'] and end == spe
                        and (epoch + 1) * spe < total)
            buf = None
            if mine_now:
                pool = mining_pool(cfg['seed'], epoch, len(split.tile_paths), cfg['mining_pool'])
                buf = MiningBuffer(len(split), len(split.tile_paths), pool, self.model.dim)
            for batch in ds:
                loss, scalars, ok, desc = step_fn(batch)
                if not bool(ok.numpy()):
                    raise UserError(f'non-finite loss or gradient at step {step + 1} (loss {float(loss)}); '
                                    f'stopped; last good checkpoint: {latest_checkpoint(self.run_dir) or "none yet"}')
                step += 1
                self.step.assign(step)
                if buf is not None:
                    buf.add(desc['pano'].numpy().astype(np.int64), desc['grd'].numpy(),
                            desc['sat_idx'].numpy().astype(np.int64), desc['sat'].numpy())
                if step % cfg['log_every'] == 0 or step == total:
                    now = time.time()
                    rate = (step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    lr = float(self.opt.learning_rate())
                    with writer.as_default(step=step):
                        tf.summary.scalar('loss/total', loss)
                        for k, v in scalars.items():
                            tf.summary.scalar(f'loss/{k}', v)
                        tf.summary.scalar('learning_rate', lr)
                        tf.summary.scalar('steps_per_second', rate)
                    writer.flush()  # on disk before the line is printed: a killed run keeps what it showed
                    parts = ' '.join(f'{k} {float(v):.4f}' for k, v in scalars.items())
                    self.log(f'step {step}/{total} epoch {epoch + 1} loss {float(loss):.4f} ({parts}) '
                             f'lr {lr:.2e} {rate:.2f} step/s ETA {(total - step) / max(rate, 1e-9) / 60:.1f} min')
                if step % cfg['ckpt_every'] == 0 and step % spe != 0:
                    self.manager.save(checkpoint_number=step)
            if step % spe == 0:  # the epoch is complete
                if buf is not None:
                    self.mine(epoch, buf, split)
                self.manager.save(checkpoint_number=step)
                if cfg['val_every'] and self.chief and ((epoch + 1) % cfg['val_every'] == 0 or step == total):
                    self.validate(writer, step)
        latest = self.manager.latest_checkpoint
        if latest is None or not latest.endswith(f'-{step}'):  # a max_steps stop inside an epoch
            self.manager.save(checkpoint_number=step)
        writer.close()
        self.log(f'done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {self.manager.latest_checkpoint}')
        return self.finish()

    def finish(self):
        """Wait for every worker (the chief's last checkpoint is then on disk for the next stage), drop a
        non-chief worker's temporary directory; -> the run directory's latest checkpoint."""
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.constant(1.0)), axis=None)
        if not self.chief:
            self.log.file.close()
            shutil.rmtree(self.write_dir, ignore_errors=True)
        return latest_checkpoint(self.run_dir)

    def validate(self, writer, step):
        """Evaluate on the first --val_queries test panoramas; metrics and example pictures to TensorBoard."""
        cfg = dict(self.cfg, plots=1)
        split = dataset_splits(cfg, 'test')
        queries = np.arange(min(cfg['val_queries'], len(split)))
        out_dir = os.path.join(self.run_dir, 'val')
        quiet = lambda msg: None
        r = evaluate_model(self.stage, cfg, self.model, split, queries, out_dir, quiet, f'step {step}', self.images)
        ret, loc = r['retrieval'], r['localisation']
        self.log(f'validation at step {step}: ' + format_results(r)[0] + f'; median {loc["all"]["median_m"]:.2f} m')
        with writer.as_default(step=step):
            for k in ('R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate'):
                tf.summary.scalar(f'val/{k}', ret[k])
            for sub in ('all', 'top1_correct'):
                if loc[sub]['median_m'] is not None and np.isfinite(loc[sub]['median_m']):
                    tf.summary.scalar(f'val/median_m_{sub}', loc[sub]['median_m'])
            pictures = [cv2_read_rgb(os.path.join(out_dir, f'query_{i}.png')) for i in range(3)]
            pictures = [p for p in pictures if p is not None]
            if pictures:
                h = min(p.shape[0] for p in pictures)
                w = min(p.shape[1] for p in pictures)
                tf.summary.image('val/localisation', np.stack([p[:h, :w] for p in pictures]), step=step,
                                 max_outputs=3)
        writer.flush()



# ----------------------------------------------------------------------------- mining

def mining_pool(seed, epoch, n_tiles, size):
    """Sorted ids of the tiles ranked by the mining round at the end of `epoch`: `size` of them, all if fewer."""
    rng = np.random.default_rng([seed, epoch, 17])
    return np.sort(rng.choice(n_tiles, min(size, n_tiles), replace=False))


class MiningBuffer:
    """The descriptors an epoch gathers for its mining round: every training panorama and the pool's tiles.

    Memory Q x D x 2 + P x D x 4 bytes (float16 panoramas, float32 pool): 1.1 GB for VIGOR same-area
    (Q ~ 52,600, P = 40,000, D = 4096), whatever the epoch length.
    """

    def __init__(self, n_panos, n_tiles, pool, dim):
        self.pool = pool
        self.slot = np.full(n_tiles, -1, np.int64)       # tile id -> row of `sat`, -1 = not in the pool
        self.slot[pool] = np.arange(len(pool))
        self.grd = np.zeros((n_panos, dim), np.float16)
        self.sat = np.zeros((len(pool), dim), np.float32)
        self.grd_seen = np.zeros(n_panos, bool)
        self.sat_seen = np.zeros(len(pool), bool)

    def add(self, pano, grd, tile, sat):
        """pano [B] panorama ids with grd [B, D]; tile [B] tile ids with sat [B, D] (normalised).
        Non-finite rows (a mixed-precision step skipped for overflow) are left for fill_missing."""
        keep = np.isfinite(grd).all(1)
        self.grd[pano[keep]] = grd[keep]
        self.grd_seen[pano[keep]] = True
        slot = self.slot[tile]
        keep = (slot >= 0) & np.isfinite(sat).all(1)
        self.sat[slot[keep]] = sat[keep]
        self.sat_seen[slot[keep]] = True


def hard_negatives(grd, pool_desc, pool, topk, rows=1024):
    """The `topk` pool tiles most similar (cosine) to each panorama, most similar first.

    grd: [Q, D] normalised panorama descriptors; pool_desc: [P, D] those of the tiles `pool` (ids).
    -> [Q, topk] int32 tile ids; with fewer than topk pool tiles each row repeats its ranking.
    Works on blocks of `rows` panoramas: memory [rows, P] similarities.
    """
    k = min(topk, len(pool))
    pool_desc = tf.constant(pool_desc, tf.float32)
    table = np.zeros((len(grd), topk), np.int32)
    for s in range(0, len(grd), rows):
        sim = tf.matmul(tf.constant(grd[s:s + rows], tf.float32), pool_desc, transpose_b=True)   # (rows, P)
        ids = pool[tf.math.top_k(sim, k).indices.numpy()]                                        # (rows, k)
        table[s:s + rows] = np.pad(ids, ((0, 0), (0, topk - k)), mode='wrap')
    return table


# ----------------------------------------------------------------------------- test

def describe(model, split, queries, cfg, cache=None):
    """Raw and normalised descriptors of the queries' panoramas and of every reference tile."""
    grd_fn = tf.function(model.embed_grd, autograph=False)
    sat_fn = tf.function(lambda x: model.embed_sat(x)[0], autograph=False)
    out = {}
    for key, paths, kind, hw, fn in (
            ('grd', [split.pano_paths[q] for q in queries], 'panorama', cfg['grd_size'], grd_fn),
            ('sat', split.tile_paths, 'aerial', (cfg['sat_size'],) * 2, sat_fn)):
        raw = np.zeros((len(paths), model.dim), np.float32)
        ds = pipeline.image_dataset(paths, hw, kind, cfg['eval_batch'], cache=cache)
        t = time.time()
        for images, idx in ds:
            raw[idx.numpy()] = fn(images).numpy()
        out[key + '_raw'] = raw
        out[key] = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        print(f'  {len(paths)} {kind} descriptors in {time.time() - t:.1f} s', flush=True)
    return out


def localise_pairs(model, split, queries, tiles, cfg, branch='pos', keep_heatmaps=4, cache=None):
    """A heatmap branch on the pairs (panorama queries[i], tile tiles[i]) ->
    mu [n, 2] (row, col), chol [n, 3] or None, {i: heatmap} for the first `keep_heatmaps` pairs."""
    has_chol = f'{branch}_cholesky' in model.parts

    @tf.function(autograph=False)
    def fn(grd, sat):
        g = model.embed_grd(grd)
        s, skips = model.embed_sat(sat)
        return model.localise(branch, s, g, skips)

    n = len(queries)
    mu, chol, heat = np.zeros((n, 2), np.float32), np.zeros((n, 3), np.float32), {}
    ds = pipeline.pair_dataset(split, np.asarray(queries), np.asarray(tiles), cfg['grd_size'], cfg['sat_size'],
                               cfg['eval_batch'], cache)
    done, t = 0, time.time()
    for grd, sat, rows in ds:
        out = fn(grd, sat)
        rows = rows.numpy()
        mu[rows] = out['mu'].numpy()
        if has_chol:
            chol[rows] = out['chol'].numpy()
        for r, h in zip(rows, out['heatmap'].numpy()):
            if r < keep_heatmaps:
                heat[int(r)] = h
        done += len(rows)
        if time.time() - t > 30:
            print(f'  localised {done}/{n} pairs', flush=True)
            t = time.time()
    return mu, (chol if has_chol else None), heat


def evaluate(stage, cfg, run_dir, ckpt_path, log):
    """--test: load the checkpoint and evaluate it on the whole test split (or --max_queries)."""
    split = dataset_splits(cfg, 'test')
    model = build_model(stage, cfg)
    tf.train.Checkpoint(model=model).read(ckpt_path).expect_partial().assert_existing_objects_matched()
    queries = np.arange(len(split)) if not cfg['max_queries'] else np.arange(min(cfg['max_queries'], len(split)))
    log(f'test: {split.name}: {len(queries)} panoramas against {len(split.tile_paths)} tiles; checkpoint {ckpt_path}')
    return evaluate_model(stage, cfg, model, split, queries, os.path.join(run_dir, 'test'), log, ckpt_path)


def evaluate_model(stage, cfg, model, split, queries, out_dir, log, ckpt_path='', cache=None):
    """Retrieval and localisation metrics -> printed, test_results.json, descriptors, plots."""
    d = describe(model, split, queries, cfg, cache)
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, 'grd_descriptors.npy'), d['grd'])
    np.save(os.path.join(out_dir, 'sat_descriptors.npy'), d['sat'])
    pos = split.tiles[queries, 0]
    ranks = evaluation.retrieval_ranks(d['grd'], d['sat'], pos, split.tiles[queries, 1:], block=cfg['eval_block'])
    n_ref = len(split.tile_paths)
    results = {'stage': stage.name, 'checkpoint': ckpt_path, 'dataset': split.name, 'n_query': int(len(queries)),
               'n_ref': n_ref, 'chance_R@1': 1.0 / n_ref,
               'retrieval': evaluation.retrieval_metrics(ranks, n_ref)}
    top1 = ranks['top1']
    correct = top1 == pos
    gt = split.gt_positions[queries]
    mpp = split.mpp[queries]
    # Offsets predicted in the positive tile (every query) and in the top-1 tile (reusing the
    # positive's prediction where the top-1 is right), as VIGOR delta (dy, dx) pixels.
    delta_pos = delta_top1 = mu_pos = chol = None
    heat = {}
    if stage.localise == 'offset':
        delta_pos = model.offset(tf.constant(d['sat_raw'][pos]), tf.constant(d['grd_raw'])).numpy()
        delta_top1 = model.offset(tf.constant(d['sat_raw'][top1]), tf.constant(d['grd_raw'])).numpy()
    elif stage.localise == 'heatmap':
        mu_pos, chol, heat = localise_pairs(model, split, queries, pos, cfg, cache=cache)
        mu_top1 = mu_pos.copy()
        wrong = np.flatnonzero(~correct)
        if len(wrong):
            mu_top1[wrong] = localise_pairs(model, split, queries[wrong], top1[wrong], cfg, keep_heatmaps=0,
                                            cache=cache)[0]
        delta_pos = geometry.rc_to_delta(mu_pos)
        delta_top1 = geometry.rc_to_delta(mu_top1)
    method = stage.localise or 'tile centre'

    def errors(tiles, delta):
        centre = split.tile_centres[tiles]
        err_centre = geometry.distance_m(centre, gt, split.metric)
        if delta is None:
            return err_centre, err_centre
        moved = geometry.delta_to_position(centre, delta, mpp, split.metric)
        return geometry.distance_m(moved, gt, split.metric), err_centre

    results['localisation'] = evaluation.localisation_summary(*errors(top1, delta_top1), correct)
    results['localisation']['method'] = method
    # Over positives: the offset inside the ground-truth tile, for every query (SPEC §6).
    results['localisation_positive'] = evaluation.localisation_summary(*errors(pos, delta_pos),
                                                                       np.ones(len(queries), bool))['all']
    if chol is not None:
        cov = model_lib.cholesky_to_cov(tf.constant(chol)).numpy()
        u = model_lib.uncertainty(tf.constant(chol)).numpy()
        gt_rc = geometry.delta_to_rc(split.deltas[queries, 0])
        pix_err = np.linalg.norm(mu_pos - gt_rc, axis=1)
        cover = evaluation.ellipse_coverage(mu_pos, cov, gt_rc)
        sp = evaluation.sparsification(u, pix_err)
        results['uncertainty'] = {
            'n': int(len(queries)), '1sigma': cover['1sigma'], '2sigma': cover['2sigma'],
            'spearman_u_error': float(evaluation.rank_correlation(u, pix_err)), 'sparsification': sp,
            'mean_u_px': float(u.mean()), 'median_error_px': float(np.median(pix_err))}
    with open(os.path.join(out_dir, 'test_results.json'), 'w') as f:
        json.dump(_jsonable(results), f, indent=1)
    for line in format_results(results):
        log(line)
    if cfg['plots']:
        write_plots(out_dir, split, queries, ranks, n_ref, results, delta_pos, chol, heat, cfg)
    log(f'test: results in {os.path.join(out_dir, "test_results.json")}')
    return results


def write_plots(out_dir, split, queries, ranks, n_ref, results, delta_pos, chol, heat, cfg):
    """Recall@K, accuracy vs metres, sparsification, and the first queries in their positive tile."""
    evaluation.plot_recall_curve(os.path.join(out_dir, 'recall_at_k.png'), ranks['rank'], n_ref)
    evaluation.plot_accuracy_vs_metres(os.path.join(out_dir, 'accuracy_vs_metres.png'), results['localisation'])
    sp = results.get('uncertainty', {}).get('sparsification')
    if sp:
        evaluation.plot_sparsification(os.path.join(out_dir, 'sparsification.png'), sp)
    cov = model_lib.cholesky_to_cov(tf.constant(chol)).numpy() if chol is not None else None
    for i in range(min(4, len(queries))):
        q = queries[i]
        pano = input_data.read_image(split.pano_paths[q], cfg['grd_size'], 'panorama')
        sat = input_data.read_image(split.tile_paths[split.tiles[q, 0]], (cfg['sat_size'],) * 2, 'aerial')
        gt_rc = geometry.delta_to_rc(split.deltas[q, 0])
        pred_rc = None if delta_pos is None else geometry.delta_to_rc(delta_pos[i])
        rank = int(ranks['rank'][i])
        evaluation.plot_localisation(os.path.join(out_dir, f'query_{i}.png'), pano, sat, gt_rc, pred_rc,
                                     heatmap=heat.get(i), cov=None if cov is None else cov[i],
                                     title=f'query {q} in its positive tile (retrieval rank {rank + 1})')


def format_results(r):
    ret = r['retrieval']
    lines = [f'retrieval: R@1 {100 * ret["R@1"]:.2f}%  R@5 {100 * ret["R@5"]:.2f}%  R@10 {100 * ret["R@10"]:.2f}%  '
             f'R@1% {100 * ret["R@1%"]:.2f}%  hit rate {100 * ret["hit_rate"]:.2f}%  '
             f'(chance R@1 {100 * r["chance_R@1"]:.2f}%)']
    loc = r['localisation']
    for sub in ('all', 'top1_correct'):
        s = loc[sub]
        lines.append(f'localisation ({sub}, {s["count"]} queries): {loc["method"]}: mean {s["mean_m"]:.2f} m, '
                     f'median {s["median_m"]:.2f} m; tile centre: mean {s["mean_m_centre"]:.2f} m, '
                     f'median {s["median_m_centre"]:.2f} m')
    s = r['localisation_positive']
    lines.append(f'localisation in the positive tile ({s["count"]} queries): {loc["method"]}: mean {s["mean_m"]:.2f} m, '
                 f'median {s["median_m"]:.2f} m; tile centre: mean {s["mean_m_centre"]:.2f} m, '
                 f'median {s["median_m_centre"]:.2f} m')
    u = r.get('uncertainty')
    if u and u.get('n'):
        lines.append(f'uncertainty: inside 1-sigma {100 * u["1sigma"]:.1f}% (calibrated 39.3%), '
                     f'2-sigma {100 * u["2sigma"]:.1f}% (86.5%), Spearman(u, error) '
                     f'{u["spearman_u_error"]:.3f}, AUSE {u["sparsification"]["ause"]:.2f} px')
    return lines


def cv2_read_rgb(path):
    """A PNG written by the plots, as RGB uint8 (None if absent)."""
    import cv2
    img = cv2.imread(path)
    return None if img is None else img[:, :, ::-1]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def load_run_config(run_dir, cfg):
    """--test: the model keys come from the run's saved config."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.exists(path):
        return cfg
    with open(path) as f:
        saved = json.load(f)
    out = dict(cfg)
    for k in MODEL_KEYS + ('seed',):
        out[k] = tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
    return out


def main(stages, argv=None):
    """Entry point of a stage script: train its stage(s) in order, or --test the last one."""
    try:
        configs = parse_config(stages, argv)
        if configs[-1]['test']:
            stage, cfg = stages[-1], configs[-1]
            run_dir, _ = stage_dirs(stage, cfg)
            ckpt = latest_checkpoint(run_dir)
            if not ckpt:
                raise UserError(f'{run_dir}: no checkpoint to test; train it first with the same --run_dir')
            cfg = load_run_config(run_dir, cfg)
            evaluate(stage, cfg, run_dir, ckpt, Log(run_dir, stage.name + ' test'))
            return 0
        for stage, cfg in zip(stages, configs):
            Run(stage, cfg).train()
        return 0
    except (UserError, input_data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except tf.errors.OpError as e:  # bad input met inside tf.data (training, mining or --test)
        msg = pipeline.unwrap_error(e)
        if not msg:
            raise
        print(f'error: {msg}', file=sys.stderr)
        return 2
