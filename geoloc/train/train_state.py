"""The train state (everything a resume needs, in one checkpointed object) and the initialisation order.

    TrainState: model, optimiser (global step, Adam's update count and slots per model part), this
    stage's step, the mining table, the loss scale and the stage's run tables (E_3's u table).

`initialise` runs the first that applies, and logs which: 1. resume this run's latest checkpoint;
2. start from the previous stage (its parts, and per Stage.carry its Adam slots, global step and
mining table); 3. ImageNet VGG16 (data/vgg16.npy); 4. random. A restore that matches nothing is an
error, not a warning.
"""
import os

import numpy as np
import tensorflow as tf

import config
import model as model_lib
import stages
from geoloc.errors import StateError  # noqa: F401 (raised here, caught as <module>.<name>)


class Adam(tf.Module):
    """Adam (TF1 defaults, eps 1e-8), lr = base x decay^(global_step / period), staircase or continuous.

    As TF1's AdamOptimizer, the bias correction counts the updates behind the slots (`updates`, TF1's
    beta powers) apart from the schedule's `global_step`: a stage that restores its predecessor's slots
    and resets the global step (E_2_2, E_3) keeps the predecessor's bias correction, as the original did.
    Slots are kept per model part (`slots[part]['m'|'v']`), so a stage restores exactly the slots of the
    parts it restores. The update is TF's fused ResourceApplyAdam kernel, one pass over var, m and v: the
    update is memory-bound, and the same update written as TF ops makes a pass per op and is several times
    slower (benchmarks/bench_adam.py; its figures are in benchmarks/README.md).
    """

    def __init__(self, model, parts, lr, decay=1.0, period=1, staircase=False, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(name='adam')
        self.strategy = tf.distribute.get_strategy()  # built under the run's strategy.scope()
        self.parts = tuple(parts)
        self.lr, self.decay, self.period, self.staircase = lr, decay, max(1, period), staircase
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.global_step = tf.Variable(0, dtype=tf.int64, name='global_step', trainable=False)
        self.updates = tf.Variable(0, dtype=tf.int64, name='updates', trainable=False)
        self.slots = {}
        for part in self.parts:
            variables = getattr(model, part).trainable_variables
            self.slots[part] = {'m': [tf.Variable(tf.zeros_like(v), trainable=False, name='m') for v in variables],
                                'v': [tf.Variable(tf.zeros_like(v), trainable=False, name='v') for v in variables]}
        self._model = model

    # Flat views in training order; properties, so each slot is checkpointed once, under slots/<part>/.
    @property
    def vars(self):
        return [v for p in self.parts for v in getattr(self._model, p).trainable_variables]

    @property
    def m(self):
        return [s for p in self.parts for s in self.slots[p]['m']]

    @property
    def v(self):
        return [s for p in self.parts for s in self.slots[p]['v']]

    def learning_rate(self, step=None):
        step = tf.cast(self.global_step if step is None else step, tf.float32)
        e = step / self.period
        if self.staircase:
            e = tf.floor(e)
        return self.lr * tf.pow(tf.constant(self.decay, tf.float32), e)

    def apply(self, grads):
        """One update from the (cross-replica summed) gradients, in cross-replica context."""
        lr = self.learning_rate()
        t = tf.cast(self.updates + 1, tf.float32)
        b1_power, b2_power = self.beta1 ** t, self.beta2 ** t

        def update(var, g, m, v):
            return tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power,
                                                beta2_power=b2_power, lr=lr, beta1=self.beta1, beta2=self.beta2,
                                                epsilon=self.eps, grad=g)

        for var, g, m, v in zip(self.vars, grads, self.m, self.v):
            if g is not None:
                self.strategy.extended.update(var, update, args=(g, m, v), group=False)
        self.updates.assign_add(1)
        self.global_step.assign_add(1)

    def skip(self):
        """A step that updates nothing (a mixed-precision overflow): the schedule's step advances, the update
        count (Adam's bias correction) does not."""
        self.global_step.assign_add(1)


class LossScale(tf.Module):
    """The dynamic loss scale of --mixed_precision 1: the loss is multiplied by `scale` before the gradients
    and they are divided by it after. An overflow (a non-finite gradient) halves it (the step's update is
    skipped); GROWTH_STEPS finite steps in a row double it. Without mixed precision the scale is 1 and never
    changes. Checkpointed as two variables under the train state: `loss_scale` (the scale; the key every
    checkpoint has) and `loss_scale_good_steps` (the finite steps since it last changed; a checkpoint written
    before it existed restores the scale and counts from 0)."""

    GROWTH_STEPS = 2000
    INITIAL = 2.0 ** 15

    def __init__(self, mixed):
        super().__init__(name='loss_scale')
        self.scale = tf.Variable(self.INITIAL if mixed else 1.0, trainable=False, name='loss_scale')
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name='loss_scale_good_steps')

    def update(self, finite):
        """After a step whose gradients were all finite (`finite`, a bool tensor) or not."""
        grow = tf.logical_and(finite, self.good_steps >= self.GROWTH_STEPS - 1)
        self.scale.assign(tf.where(finite, tf.where(grow, 2 * self.scale, self.scale), self.scale / 2))
        self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)), self.good_steps + 1,
                                        tf.zeros_like(self.good_steps)))


class TrainState(tf.Module):
    """Everything a run checkpoints. Build it under the run's strategy.scope()."""

    def __init__(self, stage, cfg, n_train, steps_per_epoch):
        super().__init__(name='train_state')
        self.model = stages.build_model(stage, cfg)
        period = cfg.lr_decay_steps or steps_per_epoch
        self.optimizer = Adam(self.model, stage.train_parts, cfg.lr, cfg.lr_decay, period, bool(cfg.lr_staircase),
                              eps=cfg.adam_eps)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')   # steps of this stage
        self.hard = tf.Variable(np.zeros((n_train, cfg.mining_topk), np.int32), trainable=False, name='hard')
        self.hard_valid = tf.Variable(False, trainable=False, name='hard_valid')
        self.scaler = LossScale(bool(cfg.mixed_precision))
        self.tables = {name: tf.Variable(np.zeros(shape if isinstance(shape, tuple) else (n_train, shape), np.float32),
                                         trainable=False, name=name)
                       for name, shape in stage.tables.items()}
        self.tables_ready = tf.Variable(False, trainable=False, name='tables_ready')

    @property
    def loss_scale(self):
        return self.scaler.scale

    def checkpoint(self, leave_out=()):
        """Everything above as one tf.train.Checkpoint. leave_out: keys of `optional_keys` to leave out, to read
        a checkpoint written before they existed (absent_keys)."""
        tables = {k: v for k, v in self.tables.items() if f'tables/{k}' not in leave_out}
        extra = {} if 'loss_scale_good_steps' in leave_out else {'loss_scale_good_steps': self.scaler.good_steps}
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step, hard=self.hard,
                                   hard_valid=self.hard_valid, loss_scale=self.scaler.scale, tables=tables,
                                   tables_ready=self.tables_ready, **extra)

    def optional_keys(self):
        """Parts of the state an older checkpoint may lack, which then start as built: the loss scale's step
        count, and run tables a stage added since (E_3's u_a); a stage reads a table of zeros as 'not set'."""
        return ('loss_scale_good_steps',) + tuple(f'tables/{k}' for k in self.tables)


def absent_keys(path, state):
    """The optional keys (TrainState.optional_keys) the checkpoint at `path` does not hold."""
    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError, OSError):
        return ()   # unreadable: reading it says so in one line
    return tuple(k for k in state.optional_keys() if not reader.has_tensor(f'{k}/.ATTRIBUTES/VARIABLE_VALUE'))


def take_lock(run_dir, what):
    """The run directory's lock (run_lock.RunLock), or StateError in one line naming the process holding it."""
    from geoloc.train import run_lock
    try:
        return run_lock.RunLock(run_dir, what).acquire()
    except run_lock.LockError as e:
        raise StateError(str(e)) from None


def latest_checkpoint(run_dir):
    """The run directory's latest checkpoint path, or None; a damaged index is an error, not a fresh start."""
    if not run_dir:
        return None
    index = os.path.join(run_dir, 'ckpt', 'checkpoint')
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel('ERROR')    # a damaged index is reported below, in one line, not in TensorFlow's warnings
    try:
        path = tf.train.latest_checkpoint(os.path.join(run_dir, 'ckpt'))
    except (ValueError, tf.errors.OpError):  # an empty or unparsable index ('Invalid checkpoint state')
        path = None
    finally:
        logger.setLevel(level)
    if path is None and os.path.exists(index):
        raise StateError(f'{index}: damaged checkpoint index (names no checkpoint); restore it, or delete '
                         f'{os.path.dirname(index)} to start this run again')
    return path


def _read(checkpoint, path, what):
    """checkpoint.read(path) with one-line errors for unreadable files and architecture mismatches."""
    try:
        return checkpoint.read(path)
    except ValueError as e:  # a variable of another shape
        raise StateError(f'{path}: checkpoint of another architecture than {what} with these flags '
                         f'({str(e).splitlines()[0][:160]})') from None
    except (tf.errors.OpError, OSError, IndexError) as e:  # IndexError: a truncated data file
        raise StateError(f'{path}: unreadable checkpoint ({type(e).__name__}: '
                         f'{str(e).strip().splitlines()[0][:160]}): a damaged or partly copied file') from None


def _matched(status, path, what):
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise StateError(f'{path}: restoring {what} matched nothing for some of it '
                         f'({str(e).splitlines()[0][:160]})') from None


def restore_parts(model, parts, path, what):
    """Restore exactly `parts` of the model from a checkpoint saved with Checkpoint(model=...)."""
    holder = tf.Module()
    for p in parts:
        setattr(holder, p, getattr(model, p))
    _matched(_read(tf.train.Checkpoint(model=holder), path, what).expect_partial(), path,
             f'{", ".join(parts)} from {what}')


def restore_optimizer(optimizer, parts, path, what, global_step):
    """The predecessor's Adam slots of `parts` and its update count (and global step if asked)."""
    holder = tf.Module()
    holder.slots = {p: optimizer.slots[p] for p in parts}
    holder.updates = optimizer.updates
    if global_step:
        holder.global_step = optimizer.global_step
    _matched(_read(tf.train.Checkpoint(optimizer=holder), path, what).expect_partial(), path,
             f'the Adam slots of {", ".join(parts)} from {what}')


def check_predecessor(stage, cfg, init_dir):
    """The previous stage's latest checkpoint, after checking it is of a stage and an architecture we accept."""
    ckpt = latest_checkpoint(init_dir)
    if not ckpt and cfg.init_from:
        raise StateError(f'--init_from {init_dir}: no checkpoint of {" or ".join(stage.accepts)} there; run '
                         f'`{stage.previous_command()}` first, or name its run directory')
    if not ckpt:
        raise StateError(f'{init_dir}: no checkpoint of {stage.previous}; run `{stage.previous_command()}` first '
                         '(or pass --init_from)')
    prev = config.load(os.path.join(init_dir, 'config.json'))
    if prev is not None:
        if prev.get('stage') not in stage.accepts:
            raise StateError(f'{init_dir}: holds a {prev.get("stage")} checkpoint, {stage.name} starts from '
                             f'{" or ".join(stage.accepts)}')
        # a part's settings matter only when its weights come across (the covariance heads' in E_3 from E_2_2)
        ignore = config.settings_of_other_parts(stage.restore)
        diff = config.mismatch(dict(prev, **{k: getattr(cfg, k) for k in ignore}), cfg, kinds=('model',))
        if diff:
            raise StateError(f'{init_dir}: checkpoint of another architecture ({diff[0]}: {diff[1]} there, '
                             f'{diff[2]} here)')
    return ckpt


# Settings that say which training split a run counted its epochs on.
_DATA = ('dataset', 'data_root', 'cvact_resampled', 'cvact_mpp', 'area', 'labels')


def check_finished(stage, cfg, init_dir, split):
    """-> (checkpoint, its step, the steps its config.json schedules) of the previous stage; the last two None
    when the checkpoint holds no step or there is no config.json. A checkpoint below its schedule (a run that
    was stopped) is refused unless --allow_unfinished 1. `split`: this run's training split, whose size is the
    predecessor's when both read the same data (else the predecessor's split is loaded)."""
    from geoloc.data import splits
    ckpt = latest_checkpoint(init_dir)
    prev = config.load(os.path.join(init_dir, 'config.json'))
    try:
        step = int(tf.train.load_checkpoint(ckpt).get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE'))
    except (tf.errors.OpError, ValueError, KeyError):   # unreadable or foreign: the restore says so in one line
        return ckpt, None, None
    if prev is None:
        return ckpt, step, None
    if all(prev.get(k, config.DEFAULTS[k]) == getattr(cfg, k) for k in _DATA):
        n_train = len(split)
    else:
        import input_data
        known = {k: v for k, v in prev.items() if k in config.KIND}
        try:
            n_train = len(splits.dataset_splits(config.Config(**known), 'train'))
        except (input_data.DataError, config.ConfigError, OSError) as e:
            if cfg.allow_unfinished:
                return ckpt, step, None
            raise StateError(f'{init_dir}: cannot count the steps its config.json schedules: its training split does '
                             f'not load here ({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass '
                             '--allow_unfinished 1 to start from it without that check') from None
    per = prev.get('epoch_batch', config.DEFAULTS['epoch_batch']) or prev.get('batch', config.DEFAULTS['batch'])
    epochs, max_steps = prev.get('epochs', 1), prev.get('max_steps', 0)
    total = epochs * (n_train // per)
    if max_steps:
        total = min(total, max_steps)
    if step < total and not cfg.allow_unfinished:
        limit = f', --max_steps {max_steps}' if max_steps and max_steps < epochs * (n_train // per) else ''
        raise StateError(f'{init_dir}: its checkpoint {os.path.basename(ckpt)} is at step {step} of the {total} its '
                         f'config.json schedules (--epochs {epochs} of {n_train // per} steps{limit}): an unfinished '
                         f'{prev.get("stage") or stage.previous}; finish it (`{stage.previous_command()}` again with '
                         'its flags) or pass --allow_unfinished 1 to start from it anyway')
    return ckpt, step, total


def initialise(state, stage, cfg, run_dir, init_dir, log):
    """Resume > previous stage > ImageNet > random (see the module docstring). -> which one ran."""
    latest = latest_checkpoint(run_dir)
    if latest:
        status = _read(state.checkpoint(leave_out=absent_keys(latest, state)), latest, 'this run')
        _matched(status, latest, 'this run')
        status.expect_partial()   # CheckpointManager's save_counter has no object here (else a stderr warning)
        log(f'init: resumed this run from {latest} (step {int(state.step.numpy())})')
        return 'resume'
    if stage.previous:
        ckpt = check_predecessor(stage, cfg, init_dir)
        restore_parts(state.model, stage.restore, ckpt, stage.previous)
        fresh = [p for p in stage.parts if p not in stage.restore]
        carried = []
        slot_parts = [p for p in stage.restore if p in stage.train_parts]
        if stage.carry != 'none' and cfg.carry_optimizer and slot_parts:
            restore_optimizer(state.optimizer, slot_parts, ckpt, stage.previous, global_step=stage.carry == 'all')
            carried.append(f'Adam slots of {", ".join(slot_parts)} ({int(state.optimizer.updates.numpy())} updates)')
            if stage.carry == 'all':
                carried.append(f'global step {int(state.optimizer.global_step.numpy())}')
        elif stage.carry == 'all':   # --carry_optimizer 0: the schedule starts again
            carried.append('not the Adam slots nor the global step (--carry_optimizer 0: the learning-rate schedule '
                           'starts at step 0)')
        if stage.carry == 'all':
            holder = tf.train.Checkpoint(hard=state.hard, hard_valid=state.hard_valid)
            _matched(_read(holder, ckpt, stage.previous).expect_partial(), ckpt, f'the mining table of {stage.previous}')
            if bool(state.hard_valid.numpy()):
                carried.append('mining table')
        log(f'init: {", ".join(stage.restore)} from {ckpt}' + (f'; fresh: {", ".join(fresh)}' if fresh else '')
            + (f'; carried over: {"; ".join(carried)}' if carried else ''))
        return 'previous'
    return 'imagenet' if load_imagenet(state.model, cfg.vgg_weights, log) else 'random'


def load_imagenet(model, path, log):
    """ImageNet-initialise both trunks from `path` when it exists and fits; say what happened either way."""
    if not path or not os.path.exists(path):
        log(f'init: random VGG16 trunks ({path or "no path"} not found; see data/DATASET.md for the weights)')
        return False
    try:
        weights = model_lib.read_vgg16_npy(path)
    except ValueError as e:
        raise StateError(str(e)) from None
    problem = model.grd_trunk.vgg16_mismatch(weights)
    if problem:
        width, why = model_lib.vgg16_width(weights)
        if width is None:   # not a VGG16 of any width: a wrong or damaged file, not a smaller network
            raise StateError(f'{path}: not ImageNet VGG16 weights of any --width ({why}); expected the classic '
                             'TF-VGG vgg16.npy (see data/DATASET.md)')
        log(f'init: random VGG16 trunks: the ImageNet weights in {path} do not fit this network ({problem}); '
            f'they fit --width {width:g} only')
        return False
    for conv in model.grd_trunk.convs:
        if not all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in weights[conv.name][:2]):
            raise StateError(f'{path}: layer {conv.name} holds non-finite values; expected the classic TF-VGG '
                             'vgg16.npy (see data/DATASET.md)')
    model.grd_trunk.load_weights(weights)
    model.sat_trunk.load_weights(weights)
    log(f'init: ImageNet VGG16 weights from {path}')
    return True
