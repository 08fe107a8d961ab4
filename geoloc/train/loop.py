"""The training loop shared by every stage: the compiled step, epochs, mining rounds, checkpoints,
validation and logging. A stage brings its parts, its loss and its defaults (stages.Stage).

A run resumes from its last checkpoint exactly as if it had not stopped (mining included: Checkpoints);
a finished run given a larger --epochs or --max_steps continues the same way. Ctrl-C finishes the step in
flight, saves a checkpoint and raises Interrupted; a checkpoint that cannot be written (a full disk) leaves
no temporary files and raises TrainError.

Validation also says whether the parts learn at all: a heatmap's dependence on the panorama, and each
trained part's gradient RMS beside Adam's eps (validate).
"""
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

import config
from geoloc.train.checkpoints import Checkpoints, CtrlC, Interrupted, TrainError  # noqa: F401 (train_lib reads loop.*)
from geoloc.train import distribute
from geoloc.nn import embedding
import input_data
from geoloc.train import mining
from geoloc.data import pipeline
from geoloc.eval import results
from geoloc.train import run_lock
from geoloc.eval import testing
from geoloc import runlog
from geoloc.data import splits
from geoloc.train import train_state



# ----------------------------------------------------------------------------- the step

def make_step(state, stage, cfg, strategy):
    """The compiled training step: embeddings -> the stage's loss terms -> one Adam update.

    Replica scaling happens here, once: every term and report the loss returns is a mean over its
    replica's examples, so each is divided by the number of replicas and summed across them; gradients
    are summed. The result equals a single-device step on the global batch (tests/test_distribute.py).
    -> step(batch) = (total, {term}, {report}, ok, {grd, sat, pano, sat_idx} of the global batch).
    """
    opt, mixed = state.optimizer, bool(cfg.mixed_precision)
    tables = dict(state.tables)
    if mixed:
        with strategy.scope():  # finite steps since the loss scale last changed (not checkpointed)
            good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name='loss_scale_good_steps')

    def replica_step(batch):
        total, terms, reports, grads, emb = _loss_and_gradients(state, stage, cfg, tables, batch)
        # every worker gets the global batch's descriptors and ids for mining, in row order
        # (ids as float32, exact below 2^24: collectives of int64 tensors fail across workers)
        ids = {k: distribute.gather(tf.cast(batch[k], tf.float32)) for k in ('pano', 'sat_idx')}
        return total, terms, reports, grads, dict(ids, grd=emb['grd_all'], sat=emb['sat_all'])

    def step_fn(batch):
        total, terms, reports, grads, desc = strategy.run(replica_step, (batch,))
        red = lambda x: strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None)
        total = red(total)
        terms = {k: red(v) for k, v in terms.items()}
        reports = {k: red(v) for k, v in reports.items()}
        grads = [None if g is None else red(g) for g in grads]
        finite_grads = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
        ok = tf.logical_and(tf.math.is_finite(total), finite_grads)
        if mixed:  # dynamic loss scale: an overflow halves it and skips the update; 2000 finite steps double it
            grow = tf.logical_and(finite_grads, good_steps >= 1999)
            state.loss_scale.assign(tf.where(finite_grads, tf.where(grow, 2 * state.loss_scale, state.loss_scale),
                                             state.loss_scale / 2))
            good_steps.assign(tf.where(tf.logical_and(finite_grads, tf.logical_not(grow)), good_steps + 1, 0))
        tf.cond(ok, lambda: (opt.apply(grads), tf.constant(True))[1], lambda: tf.constant(False))
        if mixed:  # a skipped overflow is no reason to stop training, unless the scale has collapsed
            ok = tf.logical_and(tf.math.is_finite(total), tf.logical_or(finite_grads, state.loss_scale >= 1))
        desc = {k: strategy.experimental_local_results(v)[0] for k, v in desc.items()}
        return total, terms, reports, ok, desc

    return tf.function(step_fn, autograph=False)


def _loss_and_gradients(state, stage, cfg, tables, batch):
    """One replica's share of the step: its loss terms (scaled for the replicas) and its gradients of the
    trained variables (opt.vars; None where the loss does not reach a variable), nothing applied.
    -> (total, {term}, {report}, grads, the batch's embeddings)."""
    model, opt, mixed = state.model, state.optimizer, bool(cfg.mixed_precision)
    if mixed:
        batch = dict(batch, **{k: tf.cast(batch[k], tf.float16) for k in ('grd', 'sat', 'semi') if k in batch})
    n_replicas, _ = distribute.replica_info()
    ctx = embedding.LossContext(cfg, tables)
    with tf.GradientTape() as tape:
        emb = embedding.embed_batch(model, batch, stage.uses_semi)
        terms = {k: tf.cast(v, tf.float32) / n_replicas for k, v in stage.loss(model, emb, batch, ctx).items()}
        total = tf.add_n(list(terms.values()))
        scaled = total * state.loss_scale if mixed else total
    grads = tape.gradient(scaled, opt.vars)
    if mixed:  # (in float32 the division by 1 would be a pass over every gradient: 2.5 % of a paper step)
        grads = [None if g is None else tf.cast(g, tf.float32) / state.loss_scale for g in grads]
    reports = {k: v / n_replicas for k, v in ctx.reports.items()}
    return total, terms, reports, grads, emb


# ----------------------------------------------------------------------------- the gradient diagnostic

# A part whose gradient RMS is below this multiple of Adam's eps barely trains. Adam's step for a steady
# gradient g is lr g / (|g| + eps): the full lr where |g| >> eps, lr g / eps (vanishing) where |g| << eps.
# A part's RMS is set by its largest elements, so the margin of 10 counts a part whose typical element
# already sits near or under eps.
BARELY_TRAINS_EPS = 10.0


def make_gradient_probe(state, stage, cfg):
    """A compiled probe(batch) -> {part: RMS of its gradient over all its elements} for each trained part:
    the step's loss and gradients (_loss_and_gradients) on a single-device batch, nothing applied.
    A part the loss does not reach has RMS 0."""
    opt, tables = state.optimizer, dict(state.tables)
    sizes = [int(np.prod(v.shape)) for v in opt.vars]
    owner = [p for p in opt.parts for _ in getattr(state.model, p).trainable_variables]

    def probe(batch):
        grads = _loss_and_gradients(state, stage, cfg, tables, batch)[3]
        sums = {p: tf.constant(0.0, tf.float64) for p in opt.parts}
        for part, g in zip(owner, grads):
            if g is not None:
                sums[part] += tf.reduce_sum(tf.square(tf.cast(g, tf.float64)))
        counts = {p: sum(n for q, n in zip(owner, sizes) if q == p) for p in opt.parts}
        return {p: tf.sqrt(sums[p] / max(counts[p], 1)) for p in opt.parts}
    return tf.function(probe, autograph=False)


def gradient_report(rms, eps):
    """{part: gradient RMS}, Adam's eps -> the log lines: every part's RMS and RMS / eps, and the parts that
    barely train (RMS below BARELY_TRAINS_EPS x eps), if any."""
    lines = ['gradient RMS on the last training batch (not applied): '
             + ', '.join(f'{p} {v:.3g} ({v / eps:.3g} x eps)' for p, v in rms.items())]
    weak = [p for p, v in rms.items() if v < BARELY_TRAINS_EPS * eps]
    if weak:
        lines.append(f'these parts barely train (gradient RMS below {BARELY_TRAINS_EPS:g} x Adam\'s eps {eps:g}): '
                     + ', '.join(weak))
    return lines


# ----------------------------------------------------------------------------- one stage's run

@dataclasses.dataclass
class Run:
    """What a stage's training run holds besides its train state."""
    stage: object
    cfg: config.Config
    run_dir: str
    init_dir: str
    strategy: object
    chief: bool
    write_dir: str
    log: object
    images: object
    split: object = None
    test_split: object = None
    last_batch: object = None      # the last training batch the loop ran (validation's gradient diagnostic)
    gradient_probe: object = None  # make_gradient_probe's function (single-device runs only)
    adam_eps: float = 1e-8         # the optimiser's eps, the diagnostic's yardstick
    lock: object = None            # the run directory's run_lock.RunLock (the chief's)

    def release(self):
        if self.lock is not None:
            self.lock.release()

    def dataset(self, which):
        return splits.dataset_splits(self.cfg, which)


def steps_per_epoch(cfg, n_train):
    """floor(N / epoch_batch) (the released code's epoch: 14 in every stage), or floor(N / batch)."""
    per = cfg.epoch_batch or cfg.batch
    if n_train // per == 0:
        name = 'epoch_batch' if cfg.epoch_batch else 'batch'
        raise config.ConfigError(f'--{name} {per}: {n_train} training panoramas make an epoch of 0 steps '
                                 f'(floor({n_train} / {per})); ' + ('use a smaller --epoch_batch (0: the training '
                                                                    'batch)' if cfg.epoch_batch else
                                                                    'use a smaller --batch'))
    return n_train // per


def start_run(stage, cfg):
    run_dir, init_dir = stage.run_dirs(cfg)
    strategy = distribute.make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch % replicas:
        raise config.ConfigError(f'--batch {cfg.batch} must be a multiple of the {replicas} replicas (global batch)')
    chief = distribute.is_chief(strategy)
    # Under MultiWorkerMirroredStrategy only the chief writes the run directory (and holds its lock); the other
    # workers read it (resume, previous stage) and keep their own checkpoints and log in a temporary directory.
    write_dir = run_dir if chief else tempfile.mkdtemp(prefix=f'geoloc_{stage.name}_worker_')
    lock = train_state.take_lock(run_dir, f'training {stage.name}') if chief else None
    try:
        worker = distribute.worker_name(strategy)
        log = runlog.open_log(write_dir, f'{stage.name} {worker}'.strip())
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None and lock.took_over:
        log(f'run lock: took over {lock.path}, left by {run_lock.describe(lock.took_over)}, a process of this host '
            'that has ended')
    cache = pipeline.ImageCache(cfg.image_cache_mb * 2 ** 20) if cfg.image_cache_mb > 0 else None
    if cfg.strategy != 'default':
        log(f'strategy: {cfg.strategy}, {replicas} replicas')
    return Run(stage, cfg, run_dir, init_dir, strategy, chief, write_dir, log, cache, lock=lock)


def train(stage, cfg):
    """Train one stage in its run directory; -> the run directory's latest checkpoint.

    Nothing is written before the configuration, the run directory's record, the previous stage's
    checkpoint (of its stage and architecture, and finished) and the training split have been checked.
    The run holds its directory's lock (run_lock) from then on. Ctrl-C saves a checkpoint and raises
    Interrupted."""
    run_dir, init_dir = stage.run_dirs(cfg)
    config.check_run_dir(cfg, os.path.join(run_dir, 'config.json'))
    fresh = stage.previous and not train_state.latest_checkpoint(run_dir)    # (reads only)
    if fresh:
        train_state.check_predecessor(stage, cfg, init_dir)
    split = splits.dataset_splits(cfg, 'train')
    spe = steps_per_epoch(cfg, len(split))
    start = train_state.check_finished(stage, cfg, init_dir, split) if fresh else None
    sampler = input_data.BatchSampler(split, cfg.batch, cfg.seed, spe)
    run = start_run(stage, cfg)
    try:
        return _train(run, split, spe, sampler, start)
    finally:
        run.release()


def _train(run, split, spe, sampler, start):
    """train() once the run directory is this process's."""
    stage, cfg, init_dir = run.stage, run.cfg, run.init_dir
    config_path = os.path.join(run.run_dir, 'config.json')
    saved = config.check_run_dir(cfg, config_path)   # again: read under the lock
    unknown = config.unknown_settings(saved)
    if unknown:
        run.log(f'{config_path}: settings this version does not know, ignored: {", ".join(unknown)}')
    run.split = split
    if start is not None and start[1] is not None:
        ckpt, step, total = start
        if total is None:
            run.log(f'init: {stage.previous} checkpoint {ckpt} is at step {step} (its schedule not checked)')
        else:
            run.log(f'init: {stage.previous} checkpoint {ckpt} is at step {step} of the {total} its configuration '
                    'schedules' + (' (unfinished; --allow_unfinished 1)' if step < total else ''))
    prev = config.load(os.path.join(init_dir, 'config.json')) if stage.inherits and init_dir else None
    for k in stage.inherits if prev is not None else ():
        run.log(f'--{k} {getattr(cfg, k)}: {stage.previous}\'s (its config.json in {init_dir}), whose '
                'outputs this stage reads with it')
    with run.strategy.scope():
        state = train_state.TrainState(stage, cfg, len(split), spe)
    how = train_state.initialise(state, stage, cfg, run.run_dir, run.init_dir, run.log)
    total = cfg.epochs * spe
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    step = int(state.step.numpy())
    if run.chief and saved is None:  # the first start's record, once it can start: a refused run changes nothing
        config.save(cfg, config_path)
    elif run.chief and step < total and config.mismatch(saved, cfg, kinds=('extend',)):
        grown = [f'--{k} {saved.get(k)} -> {getattr(cfg, k)}' for k in ('epochs', 'max_steps')
                 if saved.get(k) != getattr(cfg, k)]
        run.log(f'extending the run: {", ".join(grown)} ({step} steps done, {total} now)')
        config.save(cfg, config_path)
    ckpts = Checkpoints(state.checkpoint(), os.path.join(run.write_dir, 'ckpt'))
    resumed_from = train_state.latest_checkpoint(run.run_dir) if how == 'resume' else None
    embedder = embedding.Embedder(state.model)
    with CtrlC() as ctrl_c:
        if stage.prepare and not bool(state.tables_ready.numpy()):
            for name, value in stage.prepare(state.model, split, embedder, cfg, run.log, run.images,
                                             run.write_dir).items():
                state.tables[name].assign(value)
            state.tables_ready.assign(True)
        step_fn = make_step(state, stage, cfg, run.strategy)
        run.adam_eps = state.optimizer.eps
        if cfg.val_every and run.chief and cfg.strategy == 'default':
            run.gradient_probe = make_gradient_probe(state, stage, cfg)
        elif cfg.val_every and run.chief:
            run.log(f'validation: no gradient RMS diagnostic under --strategy {cfg.strategy} (single device only)')
        writer = tf.summary.create_file_writer(os.path.join(run.write_dir, 'tb'))
        run.log(f'{split.name}: {len(split)} panoramas, {len(split.tile_paths)} tiles; batch {cfg.batch}, '
                f'{spe} steps/epoch, {total} steps; parts trained: {", ".join(stage.train_parts)}')
        t0 = time.time()
        if step >= total:
            run.log(f'already trained ({step} steps); nothing to do')
        else:
            carried_from = (train_state.latest_checkpoint(run.init_dir)
                            if how == 'previous' and stage.carry == 'all' else None)
            step = _epochs(run, state, step_fn, ckpts, writer, embedder, sampler, spe, total, resumed_from, ctrl_c,
                           carried_from)
            run.log(f'done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpts.latest}')
        writer.close()
    return finish(run)


def validation_due(cfg, step, spe, total):
    """Whether the loop validates after `step`: at the end of every --val_every-th epoch (1-based epochs, as the
    released `epoch % 10 == 0`) and at the run's last step; never with --val_every 0."""
    if not cfg.val_every:
        return False
    return step == total or (step % spe == 0 and (step // spe) % cfg.val_every == 0)


def _mines_after(cfg, epoch):
    """Whether a mining round runs at the end of (0-based) `epoch`: its successor takes mined batches."""
    return bool(cfg.mining) and epoch + 2 >= cfg.mining_start_epoch


def _mining_round(run, state, buf, embedder, epoch):
    """The round at the end of (0-based) `epoch`: rank its pool with `buf` (filled first with --mining_fill 1)."""
    cfg, split = run.cfg, run.split
    pool = mining.mining_pool(cfg.seed, epoch, len(split.tile_paths), cfg.mining_pool)
    if cfg.mining_fill:
        buf.fill_missing(split, embedder, cfg, run.images)
    zeros = buf.unseen(pool)
    table = buf.rank(pool, cfg.mining_topk)
    state.hard.assign(distribute.broadcast(run.strategy, table))
    state.hard_valid.assign(True)
    buf.pending = -1
    run.log(f'mining: epoch {epoch + 1}: top-{min(cfg.mining_topk, len(pool))} of {len(pool)} tiles for '
            f'{len(split)} panoramas' + ('' if cfg.mining_fill else
                                         f'; {zeros[0]} pool tiles and {zeros[1]} panoramas in no batch yet rank '
                                         'with zero descriptors (as released)'))


def _run_long_table(run, state, ckpts, embedder, plan, spe, resumed_from, carried_from):
    """The released mining table (--mining_fill 0) a run starts with: the one saved beside the checkpoint it
    resumes, else (a fresh start) the predecessor's when the stage carries everything over (E_1 phase b), else
    zeros. A resume whose checkpoint has no table beside it recomputes the descriptors of the batches before it
    in its epoch (logged: not bit-identical); earlier epochs' stay zero."""
    cfg, split = run.cfg, run.split
    n_panos, n_tiles, dim = len(split), len(split.tile_paths), state.model.dim
    everything = np.arange(n_tiles)
    if resumed_from:
        buf = ckpts.load_mining(resumed_from, n_panos, n_tiles, everything, dim)
        if buf is None:
            buf = mining.MiningBuffer.run_long(n_panos, n_tiles, dim)
            step = int(state.step.numpy())
            epoch, offset = divmod(step, spe)
            if offset:
                buf.fill_missing(split, embedder, cfg, run.images, panos=plan(epoch)[0][:offset].ravel())
            redone = (f'those of the {offset} steps of epoch {epoch + 1} before it are computed again with its '
                      'weights, ' if offset else '')
            run.log(f'mining: no descriptors saved with {resumed_from}: {redone}those of earlier epochs\' batches '
                    'are zero (the rounds are not bit-identical to an uninterrupted run)')
        return buf
    if carried_from:
        path = ckpts.mining_path(carried_from)
        kept = None
        if os.path.exists(path):
            with np.load(path) as f:
                kept = len(f['pool'])
        if kept == n_tiles:
            buf = ckpts.load_mining(carried_from, n_panos, n_tiles, everything, dim)
            run.log(f'mining: carried over the descriptor table of {carried_from} ({int(buf.grd_seen.sum())} '
                    f'panoramas and {int(buf.sat_seen.sum())} tiles written by its batches)')
            return buf
        run.log(f'mining: no run-long descriptor table beside {carried_from} (trained with --mining 0 or '
                '--mining_fill 1): the table starts at zero')
    return mining.MiningBuffer.run_long(n_panos, n_tiles, dim)


def _epochs(run, state, step_fn, ckpts, writer, embedder, sampler, spe, total, resumed_from, ctrl_c,
            carried_from=None):
    """Steps from the state's step to `total`, epoch by epoch, with mining rounds, checkpoints and
    validations; -> the last step. Mining gathers the descriptors of the training batches
    (mining.MiningBuffer): for the whole run (--mining_fill 0, saved with every checkpoint) or for each
    epoch that feeds a round (--mining_fill 1, saved with every checkpoint inside such an epoch)."""
    cfg, split = run.cfg, run.split
    step = int(state.step.numpy())
    t_last, s_last = time.time(), step
    run_long = bool(cfg.mining) and not cfg.mining_fill

    def plan(epoch):
        use_hard = cfg.mining and bool(state.hard_valid.numpy()) and epoch + 1 >= cfg.mining_start_epoch
        return sampler.epoch_plan(epoch, state.hard.numpy() if use_hard else None)

    def new_buffer(epoch):
        pool = mining.mining_pool(cfg.seed, epoch, len(split.tile_paths), cfg.mining_pool)
        return mining.MiningBuffer(len(split), len(split.tile_paths), pool, state.model.dim)

    def saved_buffer(epoch):
        pool = mining.mining_pool(cfg.seed, epoch, len(split.tile_paths), cfg.mining_pool)
        return ckpts.load_mining(resumed_from, len(split), len(split.tile_paths), pool, state.model.dim)

    def stop_if_asked(step):
        if ctrl_c.requested:   # the checkpoint of `step` is on disk
            raise Interrupted(f'interrupted at step {step} of {total}: checkpoint {ckpts.latest} saved; run the '
                              'same command to resume')

    buf = None
    if run_long:
        buf = _run_long_table(run, state, ckpts, embedder, plan, spe, resumed_from, carried_from)
        if buf.pending >= 0 and step % spe == 0:   # the round the run (or its predecessor) stopped before
            _mining_round(run, state, buf, embedder, buf.pending)
    elif resumed_from and step % spe == 0:
        if _mines_after(cfg, step // spe - 1):
            pending = saved_buffer(step // spe - 1)
            if pending is not None:   # the run stopped at this epoch end before its round (an extended run)
                _mining_round(run, state, pending, embedder, step // spe - 1)
    elif resumed_from and _mines_after(cfg, step // spe):
        buf = saved_buffer(step // spe)
        if buf is None:
            run.log(f'mining: no descriptors saved with {resumed_from}: those of the steps before it are computed '
                    'again at the epoch end (the round is not bit-identical to an uninterrupted run)')
    while step < total:
        epoch, offset = divmod(step, spe)
        panos, semi = plan(epoch)
        end = min(spe, offset + total - step)
        ds = pipeline.train_dataset(split, panos[offset:end], semi[offset:end], cfg.grd_size, cfg.sat_size,
                                    cfg.batch, cache=run.images, with_semi=run.stage.uses_semi)
        ds = run.strategy.experimental_distribute_dataset(ds)
        if not run_long and _mines_after(cfg, epoch) and buf is None:
            buf = new_buffer(epoch)
        for batch in ds:
            loss, terms, reports, ok, desc = step_fn(batch)
            run.last_batch = batch
            if not bool(ok.numpy()):
                raise TrainError(f'non-finite loss or gradient at step {step + 1} (loss {float(loss)}); stopped; '
                                 f'last good checkpoint: {train_state.latest_checkpoint(run.run_dir) or "none yet"}')
            step += 1
            state.step.assign(step)
            if buf is not None:
                buf.add(desc['pano'].numpy().astype(np.int64), desc['grd'].numpy(),
                        desc['sat_idx'].numpy().astype(np.int64), desc['sat'].numpy())
            if step % cfg.log_every == 0 or step == total:
                now = time.time()
                rate = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                _log_step(run, state, writer, step, total, epoch, loss, terms, reports, rate)
            if step % spe == 0 or step == total:
                break         # the epoch's end (or the run's): saved below
            if step % cfg.ckpt_every == 0 or ctrl_c.requested:
                ckpts.save(step, buf)
            stop_if_asked(step)
        if step % spe == 0 and buf is not None and _mines_after(cfg, epoch):   # the epoch is complete
            if step < total:
                _mining_round(run, state, buf, embedder, epoch)
                if not run_long:
                    buf = None
            elif run_long:
                buf.pending = epoch   # run by an extension of this run, or by the stage it carries over to
        ckpts.save(step, buf)  # an epoch end or the run's last step (with the round's descriptors if it is pending)
        if step % spe == 0 and not run_long:
            buf = None
        stop_if_asked(step)
        if run.chief and validation_due(cfg, step, spe, total):
            validate(run, state.model, embedder, writer, step)
            stop_if_asked(step)   # (Ctrl-C during the validation)
    return step


def _log_step(run, state, writer, step, total, epoch, loss, terms, reports, rate):
    lr = float(state.optimizer.learning_rate())
    with writer.as_default(step=step):
        tf.summary.scalar('loss/total', loss)
        for k, v in terms.items():
            tf.summary.scalar(f'loss/{k}', v)
        for k, v in reports.items():
            tf.summary.scalar(f'diagnostics/{k}', v)
        tf.summary.scalar('learning_rate', lr)
        tf.summary.scalar('steps_per_second', rate)
    writer.flush()  # on disk before the line is printed: a killed run keeps what it showed
    parts = ' '.join(f'{k} {float(v):.4f}' for k, v in terms.items())
    extra = ' '.join(f'{k} {float(v):.3g}' for k, v in reports.items())
    run.log(f'step {step}/{total} epoch {epoch + 1} loss {float(loss):.4f} ({parts}) '
            + (f'[{extra}] ' if extra else '')
            + f'lr {lr:.2e} {rate:.2f} step/s ETA {(total - step) / max(rate, 1e-9) / 60:.1f} min')


def finish(run):
    """Wait for every worker (the chief's last checkpoint is then on disk for the next stage), drop a
    non-chief worker's temporary directory; -> the run directory's latest checkpoint."""
    distribute.barrier(run.strategy)
    if not run.chief:
        run.log.close()
        shutil.rmtree(run.write_dir, ignore_errors=True)
    return train_state.latest_checkpoint(run.run_dir)


def validate(run, model, embedder, writer, step):
    """Evaluate on the first --val_queries test panoramas; metrics and example figures to TensorBoard, with two
    diagnostics of whether the parts learn: a heatmap stage's ground dependence (ground/<branch>_*,
    localisers.ground_dependence) and, on a single device, each trained part's gradient RMS on the last training
    batch beside Adam's eps (grad_rms/<part>, grad_rms_over_eps/<part>; a log line names the parts below
    BARELY_TRAINS_EPS x eps)."""
    cfg = run.cfg
    if run.test_split is None:          # parsed once per run
        run.test_split = run.dataset('test')
    split = run.test_split
    queries = np.arange(min(cfg.val_queries, len(split)))
    ev = testing.evaluate_model(run.stage, cfg, model, embedder, split, queries, cache=run.images, keep_heatmaps=3,
                                ground=True)
    r, figures = ev.results, results.localisation_figures(ev, split, cfg, 3)
    loc = r['localisation']
    lines = results.format_results(r)
    run.log(f'validation at step {step}: ' + lines[0] + f'; median {loc["all"]["median_m"]:.2f} m')
    ground = r.get('ground_dependence') or {}
    if ground:
        run.log(f'validation at step {step}: ' + next(line for line in lines if line.startswith('ground dependence')))
    rms = {}
    if run.gradient_probe is not None and run.last_batch is not None:
        rms = {p: float(v) for p, v in run.gradient_probe(run.last_batch).items()}
        for line in gradient_report(rms, run.adam_eps):
            run.log(f'validation at step {step}: {line}')
    with writer.as_default(step=step):
        for k in ('R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate'):
            tf.summary.scalar(f'val/{k}', r['retrieval'][k])
        for sub in ('all', 'top1_correct'):
            if loc[sub]['median_m'] is not None and np.isfinite(loc[sub]['median_m']):
                tf.summary.scalar(f'val/median_m_{sub}', loc[sub]['median_m'])
        for branch, g in ground.items():
            for key in ('swap_shift_px_median', 'swap_shift_px_mean', 'swap_shift_px_p90', 'heatmap_swap_change'):
                if np.isfinite(g[key]):
                    tf.summary.scalar(f'ground/{branch}_{key.replace("_median", "")}', g[key])
        for part, v in rms.items():
            tf.summary.scalar(f'grad_rms/{part}', v)
            tf.summary.scalar(f'grad_rms_over_eps/{part}', v / run.adam_eps)
        if figures:
            h = min(p.shape[0] for p in figures)
            w = min(p.shape[1] for p in figures)
            tf.summary.image('val/localisation', np.stack([p[:h, :w] for p in figures]), step=step, max_outputs=3)
    writer.flush()
