"""Which localiser sees the panorama? E_2_1 variants on one leak-free dials city, from one E_1a checkpoint.

  python benchmarks/bench_localiser.py --out runs_bench_localiser            # every variant (CPU, ~1 h)
  python benchmarks/bench_localiser.py --out runs_x --variants released correlation --e2_steps 600

Writes a synthetic VIGOR with the ambiguity dials (synthetic_data.py; an outer ring of reference-only tiles,
so a panorama's side of its tile follows from nothing but the panorama), trains E_1a once (demo network:
64x128 / 64, width 0.25, random trunks, the corrected labels), then E_2_1 once per variant from that
checkpoint with the variant's flags, and measures each in the positive tile:
  swap shift   median shift of the soft-argmax (px of the 640-px tile) when each pair's panorama is replaced
               by another query's, the tile fixed: 0 = the heatmap ignores the panorama
  train / test median error of the localiser against the tile centre's (a ratio: 1.00 = no better)
and prints one table (markdown) and writes <out>/localisers.json. Wall times are for this machine as it
was during the run (the load average is printed beside them).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from geoloc import cli  # noqa: E402  (TensorFlow-free)

# The variants: flags of E_2_1 on top of the shared ones. 'released' is the paper's U-Net as released.
VARIANTS = {
    'released': [],
    'eps': ['--adam_eps', '1e-20'],
    'scaled': ['--decoder_init', 'scaled'],
    'skip_norm': ['--skip_norm', '1'],
    'scaled+skip_norm+eps': ['--decoder_init', 'scaled', '--skip_norm', '1', '--adam_eps', '1e-20'],
    'correlation': ['--localiser', 'correlation'],
}
NET = ['--grd_size', '64', '128', '--sat_size', '64', '--width', '0.25', '--batch', '10', '--epoch_batch', '0',
       '--labels', 'corrected', '--val_every', '0', '--plots', '0', '--mining_pool', '200', '--mining_topk', '20']


def city(out, seed, grid, panos_per_tile):
    from tools import synthetic_data
    return synthetic_data.ensure_vigor(os.path.join(out, 'VIGOR'), seed=seed, grid=grid, tile_px=128,
                                       pano_hw=(128, 256), panos_per_tile=panos_per_tile, ambiguity='mixed')


def positive_errors(stage, cfg, run_dir, split, queries):
    """(median error / tile centre's, swap shift median px, median error m, centre median m) in the
    positive tile for split[queries], through the --test code path's localiser."""
    from geoloc.nn import embedding
    from geoloc.data import geometry
    from geoloc.eval import testing
    _, ckpt, cfg = testing.trained_run(stage, cfg)
    model = testing.restored_model(stage, cfg, ckpt, run_dir)
    embedder = embedding.Embedder(model)
    tiles = [split.tile_paths[t] for t in split.tiles[queries, 0]]
    grd = embedder.describe([split.pano_paths[q] for q in queries], 'panorama', cfg.grd_size, cfg.eval_batch)
    mu, _, _ = embedder.localise_tiles('pos', tiles, grd, cfg.sat_size, cfg.eval_batch)
    swapped, _, _ = embedder.localise_tiles('pos', tiles, np.roll(grd, 1, axis=0), cfg.sat_size, cfg.eval_batch)
    gt = geometry.delta_to_rc(split.deltas[queries, 0].astype(np.float64))
    mpp = split.mpp[queries]
    err = np.linalg.norm(mu - gt, axis=1) * mpp
    centre = np.linalg.norm(gt - geometry.TILE_PX / 2, axis=1) * mpp
    return (float(np.median(err) / np.median(centre)), float(np.median(np.linalg.norm(swapped - mu, axis=1))),
            float(np.median(err)), float(np.median(centre)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs_bench_localiser')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--grid', type=int, default=8, help='tiles with panoramas per city side')
    p.add_argument('--panos_per_tile', type=int, default=16, help='4 cities: 16 gives 2,048 training panoramas')
    p.add_argument('--e1_steps', type=int, default=600)
    p.add_argument('--e2_steps', type=int, default=1200)
    p.add_argument('--e1_lr', type=float, default=3e-4)
    p.add_argument('--e2_lr', type=float, default=1e-4)
    p.add_argument('--eval_queries', type=int, default=512, help='training and test panoramas measured')
    args = p.parse_args(argv)
    cli.setup_environment(['--preset', 'demo'])
    import stages
    data = city(args.out, args.seed, args.grid, args.panos_per_tile)
    shared = NET + ['--data_root', data, '--seed', str(args.seed)]
    e1a, e21 = stages.get('E_1a'), stages.get('E_2_1')
    t0 = time.time()
    e1_dir = os.path.join(args.out, 'E_1')
    code = cli.main([e1a], shared + ['--run_dir', e1_dir, '--lr', str(args.e1_lr), '--epochs', '1000',
                                           '--max_steps', str(args.e1_steps), '--log_every', '100'])
    if code:
        return code
    e1_minutes = (time.time() - t0) / 60
    rows = []
    for name in args.variants:
        run_dir = os.path.join(args.out, 'E_2_1_' + name.replace('+', '_'))
        argv = shared + ['--run_dir', run_dir, '--init_from', os.path.join(e1_dir, 'phase_a'), '--lr',
                         str(args.e2_lr), '--epochs', '1000', '--max_steps', str(args.e2_steps), '--log_every',
                         '100'] + VARIANTS[name]
        t1, load = time.time(), os.getloadavg()[0]
        code = cli.main([e21], argv)
        if code:
            return code
        minutes = (time.time() - t1) / 60
        cfg = cli.configs([e21], argv)[0]
        row = {'variant': name, 'flags': ' '.join(VARIANTS[name]), 'e2_steps': args.e2_steps,
               'e2_minutes': minutes, 'load_start': load, 'load_end': os.getloadavg()[0]}
        for which in ('train', 'test'):
            split = cli.dataset_splits(cfg, which)
            queries = np.arange(min(args.eval_queries, len(split)))
            ratio, swap, err, centre = positive_errors(e21, cfg, run_dir, split, queries)
            row.update({f'{which}_ratio': ratio, f'{which}_swap_px': swap, f'{which}_median_m': err,
                        f'{which}_centre_m': centre})
        rows.append(row)
        print(f'bench_localiser: {name}: test {row["test_ratio"]:.2f}x the centre, swap shift '
              f'{row["test_swap_px"]:.3g} px, {minutes:.1f} min', flush=True)
    table = ['| variant | flags | swap shift (px, test) | train error / centre | test error / centre | '
             'E_2_1 steps | E_2_1 wall min (load) |', '|---|---|---|---|---|---|---|']
    for r in rows:
        table.append(f'| {r["variant"]} | `{r["flags"] or "(none)"}` | {r["test_swap_px"]:.3g} | '
                     f'{r["train_ratio"]:.2f} | {r["test_ratio"]:.2f} | {r["e2_steps"]} | {r["e2_minutes"]:.1f} '
                     f'({r["load_start"]:.1f}-{r["load_end"]:.1f}) |')
    print(f'\nE_1a: {args.e1_steps} steps in {e1_minutes:.1f} min; city: 4 cities x {args.grid}x'
          f'{args.grid} tiles with panoramas, {args.panos_per_tile} panoramas a tile, seed {args.seed}')
    print('\n'.join(table))
    with open(os.path.join(args.out, 'localisers.json'), 'w') as f:
        json.dump({'args': vars(args), 'e1_minutes': e1_minutes, 'rows': rows}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
