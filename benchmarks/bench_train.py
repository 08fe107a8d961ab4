"""Speed and memory of every stage's training step, and what the input pipeline costs.

    python benchmarks/bench_train.py --steps 6 --rounds 8                     # demo size, all 5 steps
    python benchmarks/bench_train.py --sizes paper --steps 1 --warmup 1 --rounds 1 --feeds ''   # ~30 min
    python benchmarks/bench_train.py --onednn 1,0 --profile 1                 # both CPU kernel libraries

Sizes: demo = grd 64x128, sat 64, width 0.25; paper = grd 320x640, sat 320, width 1.0; batch 10 for both.
Each (size, stage[, oneDNN mode]) runs in a fresh subprocess, so its peak RSS (psutil, sampled every
50 ms) is its own. The child builds the stage through the training loop's own code with random weights:
train_state.TrainState (model, Adam) and loop.make_step (the loop's embeddings, the stage script's loss,
GradientTape, cross-replica sum, finiteness check, fused Adam). Then it
  1. times the pipeline alone (pipeline.train_dataset reading the JPEG/PNG files of a synthetic city
     through an ImageCache of --image_cache_mb, as Run.train does) over one epoch's dataset (at most 50
     batches), wall and process CPU time per batch, its per-epoch start-up included: cold
     (every image decoded: a first epoch, or a data set larger than the cache), then warm (the same
     batches again: the next epochs of a data set that fits). On a CPU whose cores the step already keeps
     busy, prefetching cannot hide it;
  2. runs --rounds rounds of blocks of --steps timed steps (after --warmup untimed ones): one block fed by
     a batch already in memory and one per --feeds entry fed by the pipeline (cold: a fresh cache; warm:
     the filled one; distributed by the strategy as Run.train does it), in reverse order every other
     round (A B B' A ...), so a drift of the machine's load hits every feed alike. Wall and process CPU
     time per step; the pipeline's overhead is the median over rounds of each round's ratio, printed
     with the rounds' range;
  3. times a plain fp32 4096^3 product before and after: tf.matmul (the reference of the target) and
     numpy's OpenBLAS matmul (the best fp32 GEMM on a CPU where TF's default kernels lack AVX2/FMA);
  4. with --profile 1: traces one more step with tf.profiler and prints the time per op type and the
     slowest nodes with their shapes.
On a shared machine the step time reported is the best timed in-memory step and the matmul rate the
best of its two measurements (each a median of --matmul_repeats), medians alongside.

FLOPs are counted analytically from the layer shapes of the traced loss graph: 2 x MACs of every Conv2D,
transposed conv (Conv2DBackpropInput), MatMul, BatchMatMul and Einsum of the forward pass, times 3 for
forward + backward (every trained layer's backward is two products the size of its forward: dX and dW;
the first conv's unneeded dX is counted too, < 0.2 %). Element-wise ops, pooling, the loss and Adam are
not counted. Cross-check: tf.profiler's float_operation count of the conv/matmul ops of the whole step
graph (forward and backward as TF built them; it has no Einsum statistics and miscounts BatchMatMul),
compared with the analytic count of the same op types.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stages import ORDER as STAGES  # noqa: E402  (the registry's stage order; TensorFlow-free import)

SIZES = {
    'demo': {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25},
    'paper': {'grd_size': (320, 640), 'sat_size': 320, 'width': 1.0},
}
# Ops whose MACs are counted; the profiler cross-check uses the TF names of the same products.
COUNTED = ('Conv2D', 'Conv2DBackpropInput', 'MatMul', 'BatchMatMul', 'BatchMatMulV2', 'BatchMatMulV3', 'Einsum')
# BatchMatMul is left out of the cross-check: tf.profiler reads its adjoint flag under MatMul's attribute
# name (transpose_a), so it miscounts every adjoint product, e.g. the weight gradients of model.Conv's
# 1x1-map matmul (3.2 GFLOP for 0.2 real in one decoder).
PROFILED = ('Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'MatMul')
GiB = 2 ** 30




def dataset_root(args, size):
    """The synthetic city the pipeline reads (generated once): demo = the training demo's own city;
    paper = one city of full-size files (2048x1024 JPEG panoramas, 640x640 PNG tiles by default)."""
    from tools import synthetic_data
    if args.data_root:
        return args.data_root, None
    if size == 'demo':
        return synthetic_data.ensure_vigor(os.path.join(ROOT, 'data', 'synthetic_vigor')), None
    return paper_city(args.tile_px, args.pano_h), PAPER_CITIES


PAPER_CITIES = ('NewYork',)


def paper_city(tile_px=640, pano_h=1024):
    """Root of the full-size synthetic city (one city, 8x8 tiles with panoramas in a ring: 10x10 tiles), generated
    on first use."""
    from tools import synthetic_data
    root = os.path.join(ROOT, 'data', f'synthetic_vigor_bench_{tile_px}_{pano_h}')
    return synthetic_data.ensure_vigor(root, cities=PAPER_CITIES, grid=8, tile_px=tile_px,
                                       pano_hw=(pano_h, 2 * pano_h))


# ----------------------------------------------------------------------------- FLOPs

def _static(shape):
    dims = shape.as_list()
    if any(d is None for d in dims):
        raise ValueError(f'FLOP count needs static shapes, got {dims}')
    return dims


def op_macs(op):
    """Multiply-accumulates of one conv/matmul op from its static shapes (0 for other ops)."""
    t = op.type
    if t == 'Conv2D':                       # out (B, H, W, cout) x kernel (kh, kw, cin, cout) / cout
        out, w = _static(op.outputs[0].shape), _static(op.inputs[1].shape)
        return int(np.prod(out)) * w[0] * w[1] * w[2]
    if t == 'Conv2DBackpropInput':          # a deconv: every input pixel scatters kh kw cin cout
        w, dy = _static(op.inputs[1].shape), _static(op.inputs[2].shape)
        return int(np.prod(dy[:3])) * w[0] * w[1] * w[2] * w[3]
    if t == 'MatMul':
        a = _static(op.inputs[0].shape)
        k = a[0] if op.get_attr('transpose_a') else a[1]
        return int(np.prod(_static(op.outputs[0].shape))) * k
    if t.startswith('BatchMatMul'):
        a = _static(op.inputs[0].shape)
        k = a[-2] if op.get_attr('adj_x') else a[-1]
        return int(np.prod(_static(op.outputs[0].shape))) * k
    if t == 'Einsum':                       # the product of every index's size
        lhs = op.get_attr('equation').decode().split('->')[0].split(',')
        sizes = {}
        for labels, x in zip(lhs, op.inputs):
            sizes.update(zip(labels, _static(x.shape)))
        return int(np.prod(list(sizes.values())))
    return 0


def forward_flops(graph):
    """2 x MACs of the counted ops of a traced forward graph -> (total, {op type: flops})."""
    by_type = {}
    for op in graph.get_operations():
        if op.type in COUNTED:
            by_type[op.type] = by_type.get(op.type, 0) + 2 * op_macs(op)
    return sum(by_type.values()), by_type


def profiler_flops(graph):
    """tf.profiler's float_operation count restricted to the conv/matmul ops of the step graph."""
    import tensorflow as tf
    opts = (tf.compat.v1.profiler.ProfileOptionBuilder(tf.compat.v1.profiler.ProfileOptionBuilder.float_operation())
            .with_empty_output().build())
    node, total = tf.compat.v1.profiler.profile(graph, options=opts, cmd='op'), 0
    while node.children:        # the op view is a chain of op types; float_ops is the type's own count
        node = node.children[0]
        total += node.float_ops if node.name in PROFILED else 0
    return total


# ----------------------------------------------------------------------------- profile

def profile_ops(fn, feed, graph, logdir, top=15):
    """Trace fn(feed) with tf.profiler and sum the executed TF ops' times from the trace (XSpace).

    -> lines: seconds per op type, then the `top` slowest nodes with their input shapes (from `graph`).
    Ops run on 2 inter-op threads, so the sums can exceed the wall time.
    """
    import glob
    import tensorflow as tf
    try:
        from tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    tf.profiler.experimental.start(logdir)
    t = time.perf_counter()
    fn(feed)
    wall = time.perf_counter() - t
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True))[-1], 'rb') as f:
        space.ParseFromString(f.read())
    by_type, by_node = {}, {}
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith('tf_Compute') and not line.name.startswith('tf_inter_op'):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ':' not in name or '::' in name:    # executor bookkeeping, not an op
                    continue
                node, op_type = name.rsplit(':', 1)
                sec = event.duration_ps * 1e-12
                by_type[op_type] = by_type.get(op_type, 0.0) + sec
                by_node[node] = by_node.get(node, 0.0) + sec
    total = sum(by_type.values())
    lines = [f'profile: one step {wall:.3f} s wall; {total:.3f} s summed over executed ops; by op type:']
    for op_type, sec in sorted(by_type.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f'  {sec:8.3f} s {100 * sec / total:5.1f} %  {op_type}')
    lines.append(f'slowest {top} nodes:')
    for node, sec in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]:
        try:
            op = graph.get_operation_by_name(node)
            shapes = ' '.join(str(x.shape.as_list()) for x in op.inputs if x.dtype != 'resource')
            lines.append(f'  {sec:8.3f} s  {node}: {op.type} {shapes}')
        except (KeyError, ValueError):
            lines.append(f'  {sec:8.3f} s  {node}')
    return lines


# ----------------------------------------------------------------------------- the child

class PeakRSS:
    """Samples this process's RSS with psutil every `period` seconds in a thread; .peak in bytes."""

    def __init__(self, period=0.05):
        self.peak, self.period, self.stop = 0, period, threading.Event()
        self.proc = psutil.Process()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak


def matmul_rates(n, repeats):
    """Median FLOP/s of an n x n @ n x n fp32 product: {'tf': tf.matmul, 'numpy': numpy (OpenBLAS)},
    one warm-up call each excluded."""
    import tensorflow as tf
    a = tf.random.stateless_normal([n, n], seed=[1, 2])
    b = tf.random.stateless_normal([n, n], seed=[3, 4])
    fn = tf.function(tf.matmul)
    a_np, b_np = a.numpy(), b.numpy()
    rates = {}
    for name, call in (('tf', lambda: fn(a, b).numpy()), ('numpy', lambda: a_np @ b_np)):
        call()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        rates[name] = 2.0 * n ** 3 / float(np.median(times))
    return rates


def onednn_enabled():
    """Whether this TensorFlow runs its CPU kernels through oneDNN (TF_ENABLE_ONEDNN_OPTS, read at import)."""
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled())


def stage_config(stage_name, explicit):
    """(stage, cfg) of a registered stage with the paper's defaults and the `explicit` flags (a dict)."""
    import config
    import stages
    stage = stages.get(stage_name)
    return stage, config.resolve(stage.name, explicit, 'paper', stage.defaults, stage.presets, own=stage.settings)


def build_step(stage, cfg, n_train, steps_per_epoch, strategy):
    """The stage's train state with random weights (train_state.TrainState: model, Adam) and its real compiled
    step (loop.make_step), as Run.train builds them -> (state, step). Run tables (E_3's u table, which E_2_2
    would fill) hold plausible random values: any time the same."""
    from geoloc.train import loop
    from geoloc.train import train_state
    with strategy.scope():
        state = train_state.TrainState(stage, cfg, n_train, steps_per_epoch)
    for table in state.tables.values():
        table.assign(np.random.default_rng(0).uniform(20, 150, table.shape).astype(np.float32))
    return state, loop.make_step(state, stage, cfg, strategy)


def step_flops(state, stage, cfg, batch):
    """-> (forward FLOPs, {op type: FLOPs}) of the stage's loss on `batch`, from its traced graph (forward_flops;
    default strategy: plain tensors, static batch). A step is 3 x the forward."""
    import tensorflow as tf
    from geoloc.nn import embedding

    def forward(b):
        emb = embedding.embed_batch(state.model, b, stage.uses_semi)
        return sum(stage.loss(state.model, emb, b, embedding.LossContext(cfg, dict(state.tables))).values())
    return forward_flops(tf.function(forward, autograph=False).get_concrete_function(batch).graph)


def child(args):
    import input_data
    from geoloc.data import pipeline
    from geoloc.train import distribute
    size, stage_name = args.child.split(':')
    rss = PeakRSS()
    out = {'size': size, 'stage': stage_name, 'threads': os.cpu_count(), 'load_start': os.getloadavg()[0]}
    say = lambda msg: print(f'  [{size} {stage_name}] {msg}', flush=True)
    s = SIZES[size]
    explicit = {'grd_size': s['grd_size'], 'sat_size': s['sat_size'], 'width': s['width'], 'batch': args.batch,
                'mixed_precision': args.mixed_precision}
    stage, cfg = stage_config(stage_name, explicit)
    root, cities = dataset_root(args, size)
    split = input_data.load_vigor(root, 'train', cities=cities)
    sampler = input_data.BatchSampler(split, cfg.batch, 0)
    n_batches = args.warmup + args.steps
    n_pipe = args.pipeline_batches or min(sampler.steps_per_epoch, 50)
    n_plan = max(n_batches, n_pipe)
    plans = [sampler.epoch_plan(e) for e in range(-(-n_plan // sampler.steps_per_epoch))]
    panos = np.concatenate([p for p, _ in plans])[:n_plan]
    semi = np.concatenate([k for _, k in plans])[:n_plan]
    make_ds = lambda cache, n=n_batches: pipeline.train_dataset(
        split, panos[:n], semi[:n], cfg.grd_size, cfg.sat_size, cfg.batch, cache=cache, with_semi=stage.uses_semi)
    new_cache = lambda: pipeline.ImageCache(cfg.image_cache_mb * 2 ** 20)

    out['onednn'] = onednn_enabled()
    out['matmul_before'] = matmul_rates(args.matmul_n, args.matmul_repeats)
    say(f'oneDNN {"on" if out["onednn"] else "off"}; fp32 matmul {args.matmul_n}^3: '
        f'tf {out["matmul_before"]["tf"] / 1e9:.1f}, numpy {out["matmul_before"]["numpy"] / 1e9:.1f} GFLOP/s')

    strategy = distribute.make_strategy('default')
    state, step = build_step(stage, cfg, len(split), sampler.steps_per_epoch, strategy)
    n_params = sum(int(np.prod(v.shape)) for v in state.optimizer.vars)
    all_params = sum(int(np.prod(v.shape)) for v in state.model.trainable_variables)
    batch = next(iter(make_ds(None)))      # the pipeline's first batch, kept in memory

    fwd, by_type = step_flops(state, stage, cfg, batch)
    out.update(flops_forward=fwd, flops_step=3 * fwd, flops_by_type=by_type, trained_params=n_params,
               model_params=all_params)
    if args.profiler_check:
        out['profiler_flops_step'] = profiler_flops(step.get_concrete_function(batch).graph)

    def timed(feed):
        """Run Run.train's inner loop over `feed` -> (wall s, process CPU s) of each step after the warm-up."""
        walls, cpus = [], []
        t, c = time.perf_counter(), time.process_time()
        for i, b in enumerate(feed):
            loss, _, _, ok, _ = step(b)
            if not bool(ok.numpy()):
                raise RuntimeError(f'non-finite step (loss {float(loss)})')
            now, cpu = time.perf_counter(), time.process_time()
            if i >= args.warmup:
                walls.append(now - t)
                cpus.append(cpu - c)
            t, c = now, cpu
        return walls, cpus

    # The pipeline alone, as training runs it (Run.images, an ImageCache of --image_cache_mb): cold = every
    # image decoded (the first epoch, or a data set larger than the cache), warm = the same batches again
    # (the next epochs of a data set that fits, like the demo city). One epoch's dataset as Run.train builds
    # it (--pipeline_batches batches; default an epoch, at most 50), timed from its creation: the
    # per-epoch start-up is part of what training pays.
    cache = new_cache()
    for kind in ('cold', 'warm'):
        t, c = time.perf_counter(), time.process_time()
        for _ in make_ds(cache, n_pipe):
            pass
        out[f'pipeline_{kind}_s'] = (time.perf_counter() - t) / n_pipe
        out[f'pipeline_{kind}_cpu'] = (time.process_time() - c) / n_pipe
    need = len(split.pano_paths) * np.prod(cfg.grd_size) * 3 + len(split.tile_paths) * cfg.sat_size ** 2 * 3
    out['cache_fits'] = bool(need <= cache.max_bytes)
    say(f'pipeline alone, s per batch (wall / CPU): cold {out["pipeline_cold_s"]:.4f} / {out["pipeline_cold_cpu"]:.4f}, '
        f'warm {out["pipeline_warm_s"]:.4f} / {out["pipeline_warm_cpu"]:.4f}; the '
        f'train split at this size is {need / 2 ** 20:.0f} MiB, the image cache {cache.max_bytes / 2 ** 20:.0f} MiB')
    # --rounds rounds of one block per feed: in memory, then pipeline-fed (cold: a fresh cache, warm: the
    # filled one), in the reverse order every other round (A B B' A ...), so a drift of the machine's load
    # hits every feed alike. A round's overhead compares its blocks' mean step times, wall and process CPU
    # time (CPU time counts the pipeline's own work whatever else runs on the machine); the spread of the
    # rounds shows how far the machine's noise lets the figure be trusted.
    feeds = [k for k in args.feeds.split(',') if k]
    say(f'{n_params / 1e6:.1f} M trained parameters; {3 * fwd / 1e9:.1f} GFLOP per step; {args.rounds} rounds '
        f'of {args.steps} steps per feed (in memory, ' + ', '.join(f'pipeline-fed {k}' for k in feeds) + ')')
    out['mem_times'], out['mem_cpu'], out['rounds'] = [], [], []
    for kind in feeds:
        out[f'pipe_{kind}_times'], out[f'pipe_{kind}_cpu'] = [], []
    for r in range(args.rounds):
        order = ['mem'] + feeds
        rec = {}
        for kind in (order if r % 2 == 0 else order[::-1]):
            if kind == 'mem':
                walls, cpus = timed([batch] * n_batches)
                out['mem_times'] += walls
                out['mem_cpu'] += cpus
            else:
                feed = make_ds(new_cache() if kind == 'cold' else cache)
                walls, cpus = timed(strategy.experimental_distribute_dataset(feed))
                out[f'pipe_{kind}_times'] += walls
                out[f'pipe_{kind}_cpu'] += cpus
            rec[kind] = [float(np.mean(walls)), float(np.mean(cpus))]
        out['rounds'].append(rec)
        say(f'round {r + 1}/{args.rounds}, mean s per step (wall / CPU): ' +
            ', '.join(f'{k} {rec[k][0]:.3f} / {rec[k][1]:.3f}' for k in order))
    if args.profile:
        for line in profile_ops(step, batch, step.get_concrete_function(batch).graph,
                                os.path.join(tempfile.mkdtemp(prefix='bench_train_'), 'profile')):
            say(line)
    out['matmul_after'] = matmul_rates(args.matmul_n, args.matmul_repeats)
    out['peak_rss'] = rss.close()
    out['ru_maxrss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out['load_end'] = os.getloadavg()[0]
    print('RESULT ' + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent

def report(r, batch):
    """Printed lines of one child's result.

    The machine may be shared: the step time is the best of the timed in-memory steps and the matmul
    rate the best of its two measurements (each a median of repeats), i.e. both as little disturbed as
    this run saw them; the medians are printed too. The pipeline's overhead is the median over rounds of
    a pipeline-fed block's mean step time over the same round's in-memory block's, wall and process CPU.
    """
    step_s, step_med = float(np.min(r['mem_times'])), float(np.median(r['mem_times']))
    mm = {k: max(r['matmul_before'][k], r['matmul_after'][k]) for k in ('tf', 'numpy')}
    mm_med = float(np.mean([r['matmul_before']['tf'], r['matmul_after']['tf']]))
    achieved = r['flops_step'] / step_s
    ratio, ratio_med = achieved / mm['tf'], r['flops_step'] / step_med / mm_med
    images = (2 if r['stage'] == 'E_1a' else 3) * batch       # E_1a's loss reads no semi-positive
    feeds = []
    for kind in ('cold', 'warm'):
        feeds.append(f'      pipeline alone ({kind}): {r[f"pipeline_{kind}_s"] * 1e3:.1f} ms wall, '
                     f'{r[f"pipeline_{kind}_cpu"] * 1e3:.1f} ms CPU per batch = '
                     f'{100 * r[f"pipeline_{kind}_cpu"] / float(np.median(r["mem_cpu"])):.1f} % of an in-memory '
                     f'step\'s CPU time (median)')
        if not r['rounds'] or kind not in r['rounds'][0]:
            continue
        wall = [100.0 * (rec[kind][0] / rec['mem'][0] - 1) for rec in r['rounds']]
        cpu = [100.0 * (rec[kind][1] / rec['mem'][1] - 1) for rec in r['rounds']]
        overhead = float(np.median(wall))
        feeds.append(f'      pipeline-fed ({kind}) vs in memory, median of {len(wall)} rounds [min, max]: '
                     f'{overhead:+.1f} % [{min(wall):+.1f}, {max(wall):+.1f}] wall '
                     f'[<= 5 %: {"ok" if overhead <= 5 else "MISSED"}], {float(np.median(cpu)):+.1f} % '
                     f'[{min(cpu):+.1f}, {max(cpu):+.1f}] process CPU')
    same_ops = sum(f for t, f in r['flops_by_type'].items() if t in PROFILED)
    return [
        f'{r["size"]:5s} {r["stage"]:5s} oneDNN {"on " if r["onednn"] else "off"}: step {step_s:.3f} s '
        f'(median {step_med:.3f}), {images / step_s:.1f} img/s, peak RSS {r["peak_rss"] / GiB:.2f} GiB, '
        f'{r["flops_step"] / 1e9:.1f} GFLOP/step, {achieved / 1e9:.1f} GFLOP/s = {100 * ratio:.1f} % of tf.matmul '
        f'{mm["tf"] / 1e9:.1f} GFLOP/s [>= 75 %: {"ok" if ratio >= 0.75 else "MISSED"}] (medians: '
        f'{100 * ratio_med:.1f} %; numpy matmul {mm["numpy"] / 1e9:.1f})',
        *feeds,
        f'      {r["trained_params"] / 1e6:.1f} M trained params of {r.get("model_params", 0) / 1e6:.1f} M in the '
        f'model; train split '
        f'{"fits" if r["cache_fits"] else "does not fit"} the image cache; load avg {r["load_start"]:.1f} -> '
        f'{r["load_end"]:.1f}' + (f'; conv/matmul FLOPs per step: tf.profiler {r["profiler_flops_step"] / 1e9:.2f} G, '
                                  f'analytic {3 * same_ops / 1e9:.2f} G' if 'profiler_flops_step' in r else ''),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='demo', help='comma-separated: demo, paper')
    p.add_argument('--stages', default=','.join(STAGES), help='comma-separated: ' + ', '.join(STAGES))
    p.add_argument('--steps', type=int, default=10, help='timed steps per block (warm-up excluded)')
    p.add_argument('--rounds', type=int, default=4,
                   help='rounds of one block per feed (in memory, pipeline-fed), alternating order')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (tracing, allocator)')
    p.add_argument('--batch', type=int, default=10)
    p.add_argument('--pipeline_batches', type=int, default=0,
                   help='batches read to time the pipeline alone (0 = an epoch of the split, at most 50)')
    p.add_argument('--matmul_n', type=int, default=4096)
    p.add_argument('--matmul_repeats', type=int, default=3)
    p.add_argument('--tile_px', type=int, default=640, help='aerial file side of the paper-size synthetic city')
    p.add_argument('--pano_h', type=int, default=1024, help='panorama file height (width 2x) of that city')
    p.add_argument('--data_root', default='', help='a VIGOR root to read instead of a synthetic city')
    p.add_argument('--profiler_check', type=int, default=1, help='1 = cross-check the FLOPs with tf.profiler')
    p.add_argument('--mixed_precision', type=int, default=0)
    p.add_argument('--profile', type=int, default=0, help='1 = trace one step, print time per op type and node')
    p.add_argument('--feeds', default='cold,warm',
                   help='pipeline-fed timings: cold (every image decoded), warm (image cache filled), or both')
    p.add_argument('--onednn', default='1',
                   help="TF_ENABLE_ONEDNN_OPTS of the children: 1 (the stage scripts' setting), 0, default (TF's "
                        "own choice: off on CPUs without AVX-512), or a list such as 1,0 to run each stage both ways")
    p.add_argument('--json', default='', help='also write the raw results (a JSON list) to this file')
    p.add_argument('--child', default='', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sizes, stages = args.sizes.split(','), args.stages.split(',')
    onednn = args.onednn.split(',')
    bad = [x for x in sizes if x not in SIZES] + [x for x in stages if x not in STAGES] + \
        [x for x in onednn if x not in ('default', '0', '1')]
    if bad:
        p.error(f'unknown size or stage {bad}')
    for size in sizes:
        dataset_root(args, size)  # generate once, before the children
    print(f'bench_train: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GiB:.0f} GiB; '
          f'{args.rounds} rounds of {args.steps} timed steps per feed after {args.warmup} warm-up; FLOPs = 3 x 2 x forward MACs of '
          f'conv/deconv/matmul/einsum (analytic, from the traced shapes)', flush=True)
    results = []
    for size, stage, mode in [(a, b, c) for a in sizes for b in stages for c in onednn]:
        cmd = [sys.executable, os.path.abspath(__file__), '--child', f'{size}:{stage}'] + \
              [a for a in sys.argv[1:]]
        env = dict(os.environ)
        env.pop('TF_ENABLE_ONEDNN_OPTS', None)
        if mode != 'default':
            env['TF_ENABLE_ONEDNN_OPTS'] = mode
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env)
        result, tail = None, []
        for line in proc.stdout:
            if line.startswith('RESULT '):
                result = json.loads(line[len('RESULT '):])
            elif line.startswith('  ['):
                print(line, end='', flush=True)
            tail = (tail + [line])[-30:]
        if proc.wait() != 0 or result is None:
            print(''.join(tail) + f'{size} {stage}: the child failed (exit {proc.returncode})', flush=True)
            continue
        results.append(result)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1)
        for line in report(result, args.batch):
            print(line, flush=True)
    print('\nsummary')
    for r in results:
        for line in report(r, args.batch):
            print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
