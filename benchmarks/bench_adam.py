"""One Adam update over a stage's trained variables: TF's fused kernel against the same update as TF ops.

    python benchmarks/bench_adam.py                      # paper-size E_2_2 (every part trained), 5 updates each
    python benchmarks/bench_adam.py --stage E_1 --size demo

The update is memory-bound (it reads var, m, v and the gradient and writes var, m, v), so how many
passes over those arrays it makes is what it costs. train_state.Adam uses ResourceApplyAdam: one pass
per variable. The alternative written with TF ops (what a hand-written or library optimiser without a
fused kernel runs): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; var -= lr_t m / (sqrt(v) + eps),
each op a pass of its own, compiled in one tf.function. Both are timed on the same variables and
gradients, alternately, after a warm-up; the ratio is printed with the best and median times.
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SIZES = {'demo': {'grd_size': (64, 128), 'sat_size': 64, 'width': 0.25},
         'paper': {'grd_size': (320, 640), 'sat_size': 320, 'width': 1.0}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--stage', default='E_2_2')
    p.add_argument('--size', default='paper', choices=tuple(SIZES))
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    from geoloc import cli
    cli.setup_environment()
    import tensorflow as tf
    import config
    import stages
    from geoloc.train import train_state
    stage = stages.get(args.stage)
    cfg = config.resolve(stage.name, dict(SIZES[args.size]), 'paper', stage.defaults, own=stage.settings)
    t = time.time()
    state = train_state.TrainState(stage, cfg, 8, 1)
    opt = state.optimizer
    n = sum(int(np.prod(v.shape)) for v in opt.vars)
    print(f'{args.size} {args.stage}: {n / 1e6:.1f} M trained parameters (built in {time.time() - t:.0f} s); '
          f'{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}', flush=True)
    grads = [tf.random.stateless_normal(v.shape, seed=(i, 0)) * 1e-3 for i, v in enumerate(opt.vars)]

    fused = tf.function(lambda: opt.apply(grads), autograph=False)

    @tf.function(autograph=False)
    def unfused():
        lr = opt.learning_rate()
        t_ = tf.cast(opt.updates + 1, tf.float32)
        lr_t = lr * tf.sqrt(1 - opt.beta2 ** t_) / (1 - opt.beta1 ** t_)
        for var, g, m, v in zip(opt.vars, grads, opt.m, opt.v):
            m.assign(opt.beta1 * m + (1 - opt.beta1) * g)
            v.assign(opt.beta2 * v + (1 - opt.beta2) * tf.square(g))
            var.assign_sub(lr_t * m / (tf.sqrt(v) + opt.eps))
        opt.updates.assign_add(1)
        opt.global_step.assign_add(1)

    times = {'fused': [], 'ops': []}
    for fn in (fused, unfused):   # warm-up: trace and touch every page
        fn()
    for _ in range(args.repeats):
        for name, fn in (('fused', fused), ('ops', unfused)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    gb = n * 4 * 7 / 1e9          # read var, m, v, g; write var, m, v
    for name in ('fused', 'ops'):
        best, med = min(times[name]), float(np.median(times[name]))
        print(f'  {name:5s}: best {best * 1e3:.0f} ms, median {med * 1e3:.0f} ms ({gb / best:.1f} GB/s of the '
              f'7 x 4 bytes a parameter must move)', flush=True)
    print(f'  ops / fused: {min(times["ops"]) / min(times["fused"]):.2f}x (best), '
          f'{np.median(times["ops"]) / np.median(times["fused"]):.2f}x (median)')


if __name__ == '__main__':
    main()
