"""What one validation costs against one training epoch at paper size (320x640 / 320, width 1, batch 10).

    python benchmarks/bench_validation.py                  # FLOPs only (seconds)
    python benchmarks/bench_validation.py --time 1         # also times the forward of a tile and a panorama

A validation embeds --val_queries panoramas and the reference tiles (every one of same-area VIGOR's 90,618,
or --val_refs of them) with the forward pass alone, and localises the queries in their positive tiles and up
to 256 pairs again for the ground dependence, as they are and swapped (a heatmap stage); an epoch is floor(N / 14) = 3,757 steps of 10 samples, each step the stage's forward and
backward (3 x the forward's FLOPs, bench_train.step_flops). Both are counted from the traced graphs'
conv / matmul shapes (bench_train.forward_flops): a machine-independent ratio, since every image goes
through the same kernels in both. --time 1 measures the forward per image on this machine as a cross-check
of the FLOPs' proportions (not of a GPU's speed).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

VIGOR_SAME_AREA_TILES = 90618      # same-area VIGOR's reference tiles (docs/design.md §1)
VIGOR_SAME_AREA_TRAIN = 52609      # its training panoramas: floor(N / 14) = 3,757 steps an epoch (README)
GROUND_PAIRS = 256                 # localisers.GROUND_PAIRS (imported below would load TensorFlow first)
SIZES = {'grd_size': (320, 640), 'sat_size': 320, 'width': 1.0, 'batch': 10}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--stage', default='E_2_1')
    p.add_argument('--val_queries', type=int, default=1000)
    p.add_argument('--val_refs', type=int, nargs='+', default=[0, 20000, 5000])
    p.add_argument('--time', type=int, default=0)
    args = p.parse_args(argv)
    from geoloc import cli
    cli.setup_environment()
    import numpy as np
    import tensorflow as tf

    import bench_train
    from geoloc.train import train_state
    stage, cfg = bench_train.stage_config(args.stage, dict(SIZES))
    state = train_state.TrainState(stage, cfg, 100, 10)
    m = state.model
    rng = np.random.default_rng(0)
    b = cfg.batch
    batch = {'grd': tf.constant(rng.normal(0, 60, (b, 320, 640, 3)), tf.float32),
             'sat': tf.constant(rng.normal(0, 60, (b, 320, 320, 3)), tf.float32),
             'semi': tf.constant(rng.normal(0, 60, (b, 320, 320, 3)), tf.float32),
             'delta': tf.zeros((b, 2)), 'delta_semi': tf.zeros((b, 2)),
             'pano': tf.range(b, dtype=tf.int64), 'sat_idx': tf.range(b, dtype=tf.int64), 'semi_k': tf.ones(b, tf.int64)}
    step = 3 * bench_train.step_flops(state, stage, cfg, batch)[0]
    flops = lambda fn, x: bench_train.forward_flops(tf.function(fn, autograph=False).get_concrete_function(x).graph)[0]
    one_tile = tf.zeros((1, 320, 320, 3))
    tile = flops(lambda x: m.embed_sat(x)[0], one_tile)
    pano = flops(m.embed_grd, tf.zeros((1, 320, 640, 3)))
    loc = 0.0
    if stage.localise == 'heatmap':
        desc = tf.zeros((1, m.dim))
        loc = flops(lambda x: m.localise('pos', m.embed_sat(x)[0], desc, m.embed_sat(x)[1])['mu'], one_tile) - tile
        loc += tile        # localising runs the aerial trunk again on the positive tile (its skips)
    epoch = (VIGOR_SAME_AREA_TRAIN // 14) * step
    print(f'{args.stage} at paper size: a training step {step / 1e9:.0f} GFLOP (10 samples, forward + backward); '
          f'one tile {tile / 1e9:.1f}, one panorama {pano / 1e9:.1f}, one heatmap localisation {loc / 1e9:.1f} '
          f'GFLOP; an epoch ({VIGOR_SAME_AREA_TRAIN // 14} steps) {epoch / 1e15:.2f} PFLOP')
    for refs in args.val_refs:
        n_tiles = refs or VIGOR_SAME_AREA_TILES
        # + the ground-dependence swaps: up to GROUND_PAIRS pairs localised as they are and swapped
        val = n_tiles * tile + args.val_queries * (pano + loc) + 2 * min(GROUND_PAIRS, args.val_queries) * loc
        print(f'validation of {args.val_queries} queries against {n_tiles} tiles'
              f'{"" if refs else " (every reference)"}: {val / 1e12:.1f} TFLOP = {val / epoch:.3f} of an epoch'
              f' (--val_refs {refs})')
    if args.time:
        fn_t = tf.function(lambda x: m.embed_sat(x)[0], autograph=False)
        fn_p = tf.function(m.embed_grd, autograph=False)
        for name, fn, x, f in (('tile', fn_t, tf.zeros((8, 320, 320, 3)), tile),
                               ('panorama', fn_p, tf.zeros((8, 320, 640, 3)), pano)):
            fn(x)
            t0 = time.perf_counter()
            fn(x).numpy()
            dt = (time.perf_counter() - t0) / 8
            print(f'measured forward on this CPU: {dt:.3f} s per {name} ({f / dt / 1e9:.0f} GFLOP/s)')


if __name__ == '__main__':
    main()
