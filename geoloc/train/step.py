"""The compiled training step (embeddings -> the stage's loss terms -> one Adam update, replica scaling and the
dynamic loss scale included) and the gradient diagnostic that validation prints."""
import numpy as np
import tensorflow as tf

from geoloc.nn import embedding
from geoloc.train import distribute


# ----------------------------------------------------------------------------- the step

def make_step(state, stage, cfg, strategy):
    """The compiled training step: embeddings -> the stage's loss terms -> one Adam update.

    Replica scaling happens here, once: every term and report the loss returns is a mean over its
    replica's examples, so each is divided by the number of replicas and summed across them; gradients
    are summed. The result equals a single-device step on the global batch (tests/test_distribute.py).
    -> step(batch) = (total, {term}, {report}, ok, {grd, sat, pano, sat_idx} of the global batch).
    """
    opt, mixed, scaler = state.optimizer, bool(cfg.mixed_precision), state.scaler
    tables = dict(state.tables)

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
        if mixed:  # dynamic loss scale: an overflow halves it and skips the update (train_state.LossScale)
            scaler.update(finite_grads)
        # a skipped step still advances the schedule's global step (see geoloc/train/trainer.py: one counter)
        tf.cond(ok, lambda: (opt.apply(grads), tf.constant(True))[1], lambda: (opt.skip(), tf.constant(False))[1])
        if mixed:  # a skipped overflow is no reason to stop training, unless the scale has collapsed
            ok = tf.logical_and(tf.math.is_finite(total), tf.logical_or(finite_grads, scaler.scale >= 1))
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
        scaled = total * state.scaler.scale if mixed else total
    grads = tape.gradient(scaled, opt.vars)
    if mixed:  # (in float32 the division by 1 would be a pass over every gradient: 2.5 % of a paper step)
        grads = [None if g is None else tf.cast(g, tf.float32) / state.scaler.scale for g in grads]
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
