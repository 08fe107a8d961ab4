"""What reading one image costs: a full decode + area resize against images.load_image, which
decodes a JPEG at 1/2, 1/4 or 1/8 scale in libjpeg when it is read smaller, and against a warm
images.ImageCache (the next epochs of a data set that fits in memory).

    python benchmarks/bench_decode.py                    # paper-size files (2048x1024 JPEG, 640-px PNG)
    python benchmarks/bench_decode.py --data_root /data/VIGOR

Prints milliseconds per image (median of --repeats passes over --n files of each kind) for each
input size, and how far the reduced decode is from the full one (mean / max absolute grey levels).
"""
import argparse
import glob
import os
import sys
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def per_image(fn, paths, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        times.append((time.perf_counter() - t) / len(paths))
    return 1e3 * float(np.median(times))


def main():
    import images
    from bench_train import paper_city
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='', help='a VIGOR root (default: the paper-size synthetic city of bench_train)')
    p.add_argument('--n', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args()
    root = args.data_root or paper_city()
    for kind, pattern, sizes in (('panorama', '*/panorama/*.jpg', [(320, 640), (64, 128)]),
                                 ('aerial', '*/satellite/*.png', [(320, 320), (64, 64)])):
        paths = sorted(glob.glob(os.path.join(root, pattern)))[:args.n]
        h, w = cv2.imread(paths[0]).shape[:2]
        for hw in sizes:
            full = lambda q: cv2.resize(cv2.imread(q, cv2.IMREAD_UNCHANGED), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
            cache = images.ImageCache(2 ** 30)
            for q in paths:
                cache.load(q, hw, kind)
            t_full = per_image(full, paths, args.repeats)
            t_load = per_image(lambda q: images.load_image(q, hw, kind), paths, args.repeats)
            t_warm = per_image(lambda q: cache.load(q, hw, kind), paths, args.repeats)
            diff = np.concatenate([np.abs(images.load_image(q, hw, kind).astype(int) - full(q)).ravel()
                                   for q in paths[:5]])
            print(f'{kind:8s} {w}x{h} file -> {hw[1]}x{hw[0]}: full decode + resize {t_full:6.2f} ms, '
                  f'load_image {t_load:6.2f} ms ({t_full / t_load:.1f}x), warm cache {t_warm:.4f} ms; '
                  f'difference mean {diff.mean():.2f} max {diff.max()} grey levels', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
