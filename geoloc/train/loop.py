"""The training loop shared by every stage: `train(stage, cfg)` checks what it is given, takes the run
directory, builds and initialises the train state and hands the steps to the Trainer (geoloc/train/trainer.py:
epochs, mining rounds, checkpoints, validation, logging; the step itself is geoloc/train/step.py). A stage
brings its parts, its loss and its defaults (stages.Stage).

A run resumes from its last checkpoint exactly as if it had not stopped (mining included: Checkpoints);
a finished run given a larger --epochs or --max_steps continues the same way. Ctrl-C finishes the step in
flight, saves a checkpoint and raises Interrupted; a checkpoint that cannot be written (a full disk) leaves
no temporary files and raises TrainError.

Validation also says whether the parts learn at all: a heatmap's dependence on the panorama, and each
trained part's gradient RMS beside Adam's eps (geoloc/train/validation.py).
"""
import dataclasses
import os
import shutil
import tempfile
import time

import tensorflow as tf

import config
import input_data
from geoloc import runlog
from geoloc.data import pipeline, splits
from geoloc.nn import embedding
from geoloc.train import distribute, run_lock, train_state
from geoloc.train import step as step_lib
from geoloc.train.checkpoints import Checkpoints, CtrlC
# what tests and tools read as loop.*: the step, the diagnostic, the trainer's schedule
from geoloc.train.step import gradient_report, make_gradient_probe, make_step  # noqa: F401
from geoloc.train.trainer import Trainer, validation_due  # noqa: F401


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
    unknown = config.unknown_settings(saved, type(cfg))
    if unknown:
        run.log(f'{config_path}: settings this stage does not read (a newer version\'s, or another stage\'s), '
                f'ignored: {", ".join(unknown)}')
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
        step_fn = step_lib.make_step(state, stage, cfg, run.strategy)
        run.adam_eps = state.optimizer.eps
        if cfg.val_every and run.chief and cfg.strategy == 'default':
            run.gradient_probe = step_lib.make_gradient_probe(state, stage, cfg)
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
            trainer = Trainer(run, state, step_fn, ckpts, writer, embedder, sampler, spe, total, ctrl_c)
            step = trainer.fit(resumed_from, carried_from)
            run.log(f'done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpts.latest}')
        writer.close()
    return finish(run)


def finish(run):
    """Wait for every worker (the chief's last checkpoint is then on disk for the next stage), drop a
    non-chief worker's temporary directory; -> the run directory's latest checkpoint."""
    distribute.barrier(run.strategy)
    if not run.chief:
        run.log.close()
        shutil.rmtree(run.write_dir, ignore_errors=True)
    return train_state.latest_checkpoint(run.run_dir)
