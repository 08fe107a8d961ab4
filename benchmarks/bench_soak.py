"""Host memory over a paper-length run: the process RSS after building, and dropping, every tf.data dataset
that a paper-size E_2_1 on same-area VIGOR builds over --epochs epochs. No image is read.

    python benchmarks/bench_soak.py --epochs 200                  # ~4 min on 2 cores
    python benchmarks/bench_soak.py --epochs 20 --val_every 1     # the stage's own default validation cadence

The path tables have VIGOR's sizes and VIGOR's path lengths (52,605 training and 52,605 test panoramas,
90,618 tiles, four cities, e.g. /data/VIGOR/NewYork/panorama/<22-char id>,40.750038,-73.979685,.jpg); the
files do not exist and nothing iterates a dataset: building one is what allocates (its path columns, its
traced functions). What is built, through pipeline.py's own functions as the training loop calls them:
  every epoch   the training dataset (floor(52,605 / 14) steps of --batch items, E_2_1 reads the
                semi-positive), then the mining round's top-ups (mining.MiningBuffer.fill_missing):
                the panoramas the epoch did not sample and the pool's tiles it did not see;
  every --val_every epochs, and after the last
                a validation (testing.evaluate_model at --val_queries): the queries' panoramas, every
                reference tile, the tiles of the (query, positive) and (query, top-1) pairs, and those of the
                ground-dependence pairs of both heatmap branches (localisers.ground_dependence: 2 x 2
                localisations of --eval_batch pairs per chunk); a localiser reads tiles alone, the panoramas'
                descriptors are the queries'.
The RSS (psutil) is read after one warm-up epoch (the traced readers and TensorFlow's one-off
allocations) and after the last; their difference is printed last as `rss growth N MB`, and every
--every epochs the RSS so far. --image_cache_mb 0 by default: the image cache is a fixed budget filled in
the first epoch, not growth. No gc.collect(): a training run does not call it either.
"""
import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB = 2 ** 20
CITIES = (('NewYork', 40.75, -73.98), ('Seattle', 47.61, -122.33), ('SanFrancisco', 37.77, -122.42),
          ('Chicago', 41.88, -87.63))
ID_CHARS = np.array(list('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'))


def vigor_like_split(name, n_panos, tile_paths, rng):
    """An input_data.Split of n_panos panoramas over tile_paths with VIGOR's path lengths and random labels."""
    import input_data
    n_tiles = len(tile_paths)
    ids = [''.join(row) for row in ID_CHARS[rng.integers(len(ID_CHARS), size=(n_panos, 22))]]
    pano_paths = []
    for i, pid in enumerate(ids):
        city, lat, lon = CITIES[i * len(CITIES) // n_panos]
        pano_paths.append(f'/data/VIGOR/{city}/panorama/{pid},{lat + rng.uniform(-.05, .05):.6f},'
                          f'{lon + rng.uniform(-.05, .05):.6f},.jpg')
    tiles = rng.integers(n_tiles, size=(n_panos, 4))
    deltas = rng.uniform(-320, 320, (n_panos, 4, 2)).astype(np.float32)
    return input_data.Split(name, pano_paths, tile_paths, tiles, deltas, np.full(n_panos, 0.114),
                            np.zeros((n_tiles, 2)), np.zeros((n_panos, 2)), 'haversine')


def vigor_like_tiles(n_tiles, rng):
    out = []
    for i in range(n_tiles):
        city, lat, lon = CITIES[i * len(CITIES) // n_tiles]
        out.append(f'/data/VIGOR/{city}/satellite/satellite_{lat + rng.uniform(-.05, .05):.7f}_'
                   f'{lon + rng.uniform(-.05, .05):.7f}.png')
    return out


class Builder:
    """Builds (and drops) the datasets of one paper-size E_2_1 epoch and of one validation."""

    def __init__(self, args):
        from geoloc.data import pipeline
        self.pipeline, self.args = pipeline, args
        rng = np.random.default_rng(0)
        tile_paths = vigor_like_tiles(args.n_tiles, rng)
        self.train = vigor_like_split('train', args.n_train, tile_paths, rng)
        self.test = vigor_like_split('test', args.n_test, tile_paths, rng)
        self.grd_hw, self.sat_hw = tuple(args.grd_size), (args.sat_size, args.sat_size)
        self.spe = args.n_train // args.epoch_batch
        self.cache = pipeline.ImageCache(args.image_cache_mb * MB) if args.image_cache_mb > 0 else None
        self.built = 0
        every = self.train.pano_paths + self.test.pano_paths + tile_paths
        self.path_chars = sum(len(p) for p in every) / len(every)

    def _made(self, ds):
        self.built += 1    # the dataset goes out of scope here, as a finished epoch's does in loop._epochs
        return ds.element_spec is not None

    def epoch(self, epoch):
        from geoloc.train import mining
        a, split = self.args, self.train
        rng = np.random.default_rng([a.seed, epoch])
        # BatchSampler's draws (a random positive tile, then one of its panoramas) cover about as many panoramas
        panos = rng.integers(len(split), size=(self.spe, a.batch))
        semi = rng.integers(1, 4, size=(self.spe, a.batch))
        self._made(self.pipeline.train_dataset(split, panos, semi, self.grd_hw, a.sat_size, a.batch, cache=self.cache,
                                               with_semi=True))
        # the mining round's top-ups, as MiningBuffer.fill_missing asks Embedder.describe for them
        pool = mining.mining_pool(a.seed, epoch, len(split.tile_paths), a.mining_pool)
        seen_panos = np.zeros(len(split), bool)
        seen_panos[panos.reshape(-1)] = True
        seen_tiles = np.zeros(len(split.tile_paths), bool)
        seen_tiles[split.tiles[panos.reshape(-1), 0]] = True
        missing_panos = np.flatnonzero(~seen_panos)
        missing_tiles = pool[~seen_tiles[pool]]
        for paths, kind, hw in (([split.pano_paths[i] for i in missing_panos], 'panorama', self.grd_hw),
                                ([split.tile_paths[i] for i in missing_tiles], 'aerial', self.sat_hw)):
            if paths:
                self._made(self.pipeline.image_dataset(paths, hw, kind, a.eval_batch, cache=self.cache))
        return len(missing_panos), len(missing_tiles)

    def validation(self):
        from geoloc.eval import localisers
        a, split = self.args, self.test
        queries = np.arange(min(a.val_queries, len(split)))
        p = self.pipeline
        tiles = lambda idx: p.image_dataset([split.tile_paths[t] for t in idx], self.sat_hw, 'aerial', a.eval_batch,
                                            cache=self.cache)
        self._made(p.image_dataset([split.pano_paths[q] for q in queries], self.grd_hw, 'panorama', a.eval_batch,
                                   cache=self.cache))
        self._made(p.image_dataset(split.tile_paths, self.sat_hw, 'aerial', a.eval_batch, cache=self.cache))
        pos = split.tiles[queries, 0]
        self._made(tiles(pos))
        self._made(tiles((pos + 1) % len(split.tile_paths)))   # an untrained model's top-1 is wrong for every query
        rows = np.arange(min(localisers.GROUND_PAIRS, len(queries)))
        for branch_tiles in (split.tiles[rows, 0], split.tiles[rows, 1]):        # pos, semi
            for s in range(0, len(rows), a.eval_batch):
                idx = rows[s:s + a.eval_batch]
                self._made(tiles(branch_tiles[idx]))          # the pairs as they are
                self._made(tiles(branch_tiles[idx]))          # the same tiles with the panoramas swapped


def rss(collect=False):
    if collect:
        gc.collect()
    return psutil.Process().memory_info().rss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=int, default=200)
    p.add_argument('--val_every', type=int, default=10, help='a validation every N epochs and after the last')
    p.add_argument('--n_train', type=int, default=52605)
    p.add_argument('--n_test', type=int, default=52605)
    p.add_argument('--n_tiles', type=int, default=90618)
    p.add_argument('--batch', type=int, default=10)
    p.add_argument('--epoch_batch', type=int, default=14)
    p.add_argument('--eval_batch', type=int, default=32)
    p.add_argument('--val_queries', type=int, default=1000)
    p.add_argument('--mining_pool', type=int, default=10000)
    p.add_argument('--grd_size', type=int, nargs=2, default=(320, 640))
    p.add_argument('--sat_size', type=int, default=320)
    p.add_argument('--image_cache_mb', type=int, default=0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--every', type=int, default=20, help='print the RSS every N epochs')
    p.add_argument('--collect', type=int, default=0,
                   help='1 = gc.collect() before every RSS reading (garbage the collector has not reached yet)')
    p.add_argument('--json', default='', help='write the figures to this file')
    args = p.parse_args(argv)

    import tensorflow as tf
    t0 = time.time()
    b = Builder(args)
    print(f'bench_soak: TensorFlow {tf.__version__}; {len(b.train)} training / {len(b.test)} test panoramas, '
          f'{len(b.train.tile_paths)} tiles, {b.path_chars:.0f} characters a path; {b.spe} steps of {args.batch} an epoch; grd {b.grd_hw}, sat {args.sat_size}; '
          f'a validation every {args.val_every} epochs', flush=True)
    validates = lambda e: e % args.val_every == 0 or e == args.epochs   # after 1-based epoch e
    b.epoch(args.epochs)     # an epoch the timed loop does not draw
    b.validation()
    before, t_start = rss(args.collect), time.time()
    print(f'after the warm-up epoch and validation ({b.built} datasets, {t_start - t0:.0f} s): '
          f'RSS {before / MB:.0f} MB', flush=True)
    trace = [{'epoch': 0, 'datasets': b.built, 'rss_mb': before / MB}]
    top_ups = []
    for e in range(1, args.epochs + 1):
        top_ups.append(b.epoch(e - 1))
        if args.val_every and validates(e):
            b.validation()
        if e % args.every == 0 or e == args.epochs:
            now = rss(args.collect)
            trace.append({'epoch': e, 'datasets': b.built, 'rss_mb': now / MB})
            print(f'epoch {e}: {b.built} datasets built, RSS {now / MB:.0f} MB ({(now - before) / MB:+.0f}), '
                  f'{time.time() - t_start:.0f} s', flush=True)
    after = rss(args.collect)
    growth = (after - before) / MB
    out = {'epochs': args.epochs, 'val_every': args.val_every, 'datasets': b.built, 'rss_before_mb': before / MB,
           'rss_after_mb': after / MB, 'rss_growth_mb': growth, 'seconds': time.time() - t0, 'trace': trace,
           'mean_top_up_panoramas': float(np.mean([t[0] for t in top_ups])) if top_ups else 0.0,
           'mean_top_up_tiles': float(np.mean([t[1] for t in top_ups])) if top_ups else 0.0,
           'args': vars(args)}
    print(f'mining top-ups: {out["mean_top_up_panoramas"]:.0f} panoramas and {out["mean_top_up_tiles"]:.0f} pool '
          f'tiles an epoch (mean)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    print(f'rss growth {growth:.0f} MB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
