"""One stage's training run once it holds its run directory: epochs, mining rounds, checkpoints, validation.

The one step counter is `state.step`, the steps this stage has run (a skipped mixed-precision step counts).
Everything else is derived from it: the epoch and the offset inside it are divmod(state.step, steps per
epoch); the learning-rate schedule's `optimizer.global_step` is the predecessor's global step where the stage
carries it over (E_1 phase b), else 0, plus state.step; Adam's `optimizer.updates` counts the updates applied
(its bias correction, carried with the slots), which a skipped step does not advance.

Mining gathers the descriptors of the training batches (mining.MiningBuffer): for the whole run (--mining_fill
0, the release's table, saved with every checkpoint) or for each epoch that feeds a round (--mining_fill 1,
saved with every checkpoint inside such an epoch). A resumed run continues exactly as if it had not stopped.
"""
import time

import numpy as np
import tensorflow as tf

from geoloc.data import pipeline
from geoloc.errors import Interrupted, TrainError
from geoloc.train import distribute, mining, train_state, validation


def validation_due(cfg, step, spe, total):
    """Whether the loop validates after `step`: at the end of every --val_every-th epoch (1-based epochs, as the
    released `epoch % 10 == 0`) and at the run's last step; never with --val_every 0."""
    if not cfg.val_every:
        return False
    return step == total or (step % spe == 0 and (step // spe) % cfg.val_every == 0)


def mines_after(cfg, epoch):
    """Whether a mining round runs at the end of (0-based) `epoch`: its successor takes mined batches."""
    return bool(cfg.mining) and epoch + 2 >= cfg.mining_start_epoch


class Trainer:
    """Runs the steps from state.step to `total` (fit); run: the loop's Run (stage, cfg, split, log, strategy)."""

    def __init__(self, run, state, step_fn, ckpts, writer, embedder, sampler, spe, total, ctrl_c):
        self.run, self.state, self.step_fn, self.ckpts, self.writer = run, state, step_fn, ckpts, writer
        self.embedder, self.sampler, self.spe, self.total, self.ctrl_c = embedder, sampler, spe, total, ctrl_c
        self.cfg, self.split = run.cfg, run.split
        self.run_long = bool(self.cfg.mining) and not self.cfg.mining_fill
        self.buf = None                 # the mining descriptors gathered for the next round, if one is due

    @property
    def step(self):
        return int(self.state.step.numpy())

    def fit(self, resumed_from=None, carried_from=None):
        """-> the last step. resumed_from: this run's checkpoint it resumed; carried_from: the predecessor's
        checkpoint whose mining table it carries over (Stage.carry 'all')."""
        self.resume_mining(resumed_from, carried_from)
        while self.step < self.total:
            self.run_epoch()
            self.end_epoch()
        return self.step

    # ------------------------------------------------------------------------------------------- mining
    def plan(self, epoch):
        """(panorama ids [steps, batch], semi-positive choices) of `epoch`: mined once a table is valid."""
        cfg = self.cfg
        use_hard = cfg.mining and bool(self.state.hard_valid.numpy()) and epoch + 1 >= cfg.mining_start_epoch
        return self.sampler.epoch_plan(epoch, self.state.hard.numpy() if use_hard else None)

    def pool(self, epoch):
        return mining.mining_pool(self.cfg.seed, epoch, len(self.split.tile_paths), self.cfg.mining_pool)

    def resume_mining(self, resumed_from, carried_from):
        """The mining state a (re)start begins with, and the round a stopped run still owes."""
        epoch, offset = divmod(self.step, self.spe)
        if self.run_long:
            self.buf = self.run_long_table(resumed_from, carried_from)
            if self.buf.pending >= 0 and not offset:   # the round the run (or its predecessor) stopped before
                self.mining_round(self.buf.pending)
        elif resumed_from and not offset:
            pending = self.saved_buffer(resumed_from, epoch - 1) if mines_after(self.cfg, epoch - 1) else None
            if pending is not None:   # the run stopped at this epoch end before its round (an extended run)
                self.buf = pending
                self.mining_round(epoch - 1)
                self.buf = None
        elif resumed_from and mines_after(self.cfg, epoch):
            self.buf = self.saved_buffer(resumed_from, epoch)
            if self.buf is None:
                self.run.log(f'mining: no descriptors saved with {resumed_from}: those of the steps before it are '
                             'computed again at the epoch end (the round is not bit-identical to an uninterrupted '
                             'run)')

    def saved_buffer(self, ckpt, epoch):
        return self.ckpts.load_mining(ckpt, len(self.split), len(self.split.tile_paths), self.pool(epoch),
                                      self.state.model.dim)

    def run_long_table(self, resumed_from, carried_from):
        """The released mining table (--mining_fill 0) a run starts with: the one saved beside the checkpoint it
        resumes, else (a fresh start) the predecessor's when the stage carries everything over (E_1 phase b),
        else zeros. A resume whose checkpoint has no table beside it recomputes the descriptors of the batches
        before it in its epoch (logged: not bit-identical); earlier epochs' stay zero."""
        run, split = self.run, self.split
        n_panos, n_tiles, dim = len(split), len(split.tile_paths), self.state.model.dim
        everything = np.arange(n_tiles)
        if resumed_from:
            buf = self.ckpts.load_mining(resumed_from, n_panos, n_tiles, everything, dim)
            if buf is None:
                buf = mining.MiningBuffer.run_long(n_panos, n_tiles, dim)
                epoch, offset = divmod(self.step, self.spe)
                if offset:
                    buf.fill_missing(split, self.embedder, self.cfg, run.images,
                                     panos=self.plan(epoch)[0][:offset].ravel())
                redone = (f'those of the {offset} steps of epoch {epoch + 1} before it are computed again with its '
                          'weights, ' if offset else '')
                run.log(f'mining: no descriptors saved with {resumed_from}: {redone}those of earlier epochs\' '
                        'batches are zero (the rounds are not bit-identical to an uninterrupted run)')
            return buf
        if carried_from:
            if self.ckpts.mining_pool_size(carried_from) == n_tiles:
                buf = self.ckpts.load_mining(carried_from, n_panos, n_tiles, everything, dim)
                run.log(f'mining: carried over the descriptor table of {carried_from} ({int(buf.grd_seen.sum())} '
                        f'panoramas and {int(buf.sat_seen.sum())} tiles written by its batches)')
                return buf
            run.log(f'mining: no run-long descriptor table beside {carried_from} (trained with --mining 0 or '
                    '--mining_fill 1): the table starts at zero')
        return mining.MiningBuffer.run_long(n_panos, n_tiles, dim)

    def mining_round(self, epoch):
        """The round at the end of (0-based) `epoch`: rank its pool with the buffer (filled first with
        --mining_fill 1); every worker takes the chief's table."""
        cfg, split, buf = self.cfg, self.split, self.buf
        pool = self.pool(epoch)
        if cfg.mining_fill:
            buf.fill_missing(split, self.embedder, cfg, self.run.images)
        zeros = buf.unseen(pool)
        table = buf.rank(pool, cfg.mining_topk)
        self.state.hard.assign(distribute.broadcast(self.run.strategy, table))
        self.state.hard_valid.assign(True)
        buf.pending = -1
        self.run.log(f'mining: epoch {epoch + 1}: top-{min(cfg.mining_topk, len(pool))} of {len(pool)} tiles for '
                     f'{len(split)} panoramas' + ('' if cfg.mining_fill else
                                                  f'; {zeros[0]} pool tiles and {zeros[1]} panoramas in no batch '
                                                  'yet rank with zero descriptors (as released)'))

    # ------------------------------------------------------------------------------------------- epochs
    def run_epoch(self):
        """The steps from state.step to the end of its epoch (or of the run), logged; a checkpoint every
        --ckpt_every steps inside it."""
        cfg, state, step = self.cfg, self.state, self.step
        epoch, offset = divmod(step, self.spe)
        panos, semi = self.plan(epoch)
        end = min(self.spe, offset + self.total - step)
        ds = pipeline.train_dataset(self.split, panos[offset:end], semi[offset:end], cfg.grd_size, cfg.sat_size,
                                    cfg.batch, cache=self.run.images, with_semi=self.run.stage.uses_semi)
        if not self.run_long and mines_after(cfg, epoch) and self.buf is None:
            self.buf = mining.MiningBuffer(len(self.split), len(self.split.tile_paths), self.pool(epoch),
                                           state.model.dim)
        t_last, s_last = time.time(), step
        for batch in self.run.strategy.experimental_distribute_dataset(ds):
            loss, terms, reports, ok, desc = self.step_fn(batch)
            self.run.last_batch = batch
            if not bool(ok.numpy()):
                raise TrainError(f'non-finite loss or gradient at step {step + 1} (loss {float(loss)}); stopped; '
                                 'last good checkpoint: '
                                 f'{train_state.latest_checkpoint(self.run.run_dir) or "none yet"}')
            step += 1
            state.step.assign(step)
            if self.buf is not None:
                self.buf.add(desc['pano'].numpy().astype(np.int64), desc['grd'].numpy(),
                             desc['sat_idx'].numpy().astype(np.int64), desc['sat'].numpy())
            if step % cfg.log_every == 0 or step == self.total:
                now = time.time()
                self.log_step(epoch, loss, terms, reports, (step - s_last) / max(now - t_last, 1e-9))
                t_last, s_last = now, step
            if step % self.spe == 0 or step == self.total:
                return         # the epoch's end (or the run's): end_epoch saves it
            if step % cfg.ckpt_every == 0 or self.ctrl_c.requested:
                self.ckpts.save(step, self.buf)
            self.stop_if_asked()

    def end_epoch(self):
        """After run_epoch: the epoch's mining round (when due and the run goes on), its checkpoint, its
        validation (when due, on the chief)."""
        step, cfg = self.step, self.cfg
        epoch, offset = divmod(step, self.spe)
        epoch -= 0 if offset else 1                     # the epoch that just ended (or the run's last, partial)
        if not offset and self.buf is not None and mines_after(cfg, epoch):
            if step < self.total:
                self.mining_round(epoch)
                if not self.run_long:
                    self.buf = None
            elif self.run_long:
                self.buf.pending = epoch  # run by an extension of this run, or by the stage it carries over to
        self.ckpts.save(step, self.buf)  # (with the round's descriptors if it is pending)
        if not offset and not self.run_long:
            self.buf = None
        self.stop_if_asked()
        if self.run.chief and validation_due(cfg, step, self.spe, self.total):
            validation.validate(self.run, self.state.model, self.embedder, self.writer, step)
            self.stop_if_asked()   # (Ctrl-C during the validation)

    def stop_if_asked(self):
        if self.ctrl_c.requested:   # the checkpoint of this step is on disk
            raise Interrupted(f'interrupted at step {self.step} of {self.total}: checkpoint {self.ckpts.latest} '
                              'saved; run the same command to resume')

    def log_step(self, epoch, loss, terms, reports, rate):
        """One step's line on stdout and train.log, and its scalars in TensorBoard (flushed first: a killed run
        keeps what it showed)."""
        step, total, state = self.step, self.total, self.state
        lr = float(state.optimizer.learning_rate())
        with self.writer.as_default(step=step):
            tf.summary.scalar('loss/total', loss)
            for k, v in terms.items():
                tf.summary.scalar(f'loss/{k}', v)
            for k, v in reports.items():
                tf.summary.scalar(f'diagnostics/{k}', v)
            tf.summary.scalar('learning_rate', lr)
            tf.summary.scalar('steps_per_second', rate)
        self.writer.flush()
        parts = ' '.join(f'{k} {float(v):.4f}' for k, v in terms.items())
        extra = ' '.join(f'{k} {float(v):.3g}' for k, v in reports.items())
        self.run.log(f'step {step}/{total} epoch {epoch + 1} loss {float(loss):.4f} ({parts}) '
                     + (f'[{extra}] ' if extra else '')
                     + f'lr {lr:.2e} {rate:.2f} step/s ETA {(total - step) / max(rate, 1e-9) / 60:.1f} min')
