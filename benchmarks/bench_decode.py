"""What reading one image costs on one core, and how far each reader is from docs/design.md §2's OpenCV full decode +
INTER_AREA: images.load_image (OpenCV, a JPEG decoded at 1/2, 1/4 or 1/8 scale in libjpeg when read
smaller), pipeline.reader (the same in TensorFlow ops, what tf.data runs per image) and, with --prepared, the file of a
prepared copy (prepare_data.py) read at its own size.

    python benchmarks/bench_decode.py                    # paper-size files (2048x1024 JPEG, 640-px PNG)
    python benchmarks/bench_decode.py --data_root /data/VIGOR --prepared /data/VIGOR_320

Prints milliseconds per image (median of --repeats passes over --n files of each kind; TensorFlow's
one call per image from Python included) and the difference from the reference in grey levels (mean,
99.9th percentile, max over --n files). For the scaling over cores see bench_pipeline.py.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_image(fn, paths, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        times.append((time.perf_counter() - t) / len(paths))
    return 1e3 * float(np.median(times))


def difference(read, ref, paths):
    d = np.concatenate([np.abs(read(p).astype(int) - ref(p).astype(int)).ravel() for p in paths])
    return f'{d.mean():.2f} / {np.percentile(d, 99.9):.0f} / {d.max()}'


def main():
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    from geoloc.data import images
    from geoloc.data import pipeline
    from bench_train import paper_city
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_root', default='',
                   help='a VIGOR root (default: the paper-size synthetic city of bench_train)')
    p.add_argument('--prepared', default='', help='a copy of it from prepare_data.py (read at its own size)')
    p.add_argument('--n', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args()
    root = args.data_root or paper_city()
    print('ms per image on one core; difference from OpenCV full decode + INTER_AREA in grey levels: '
          'mean / 99.9th percentile / max')
    for kind, pattern, sizes in (('panorama', '*/panorama/*.jpg', [(320, 640), (64, 128)]),
                                 ('aerial', '*/satellite/*.png', [(320, 320), (64, 64)])):
        paths = sorted(glob.glob(os.path.join(root, pattern)))[:args.n]
        h, w = cv2.imread(paths[0]).shape[:2]
        for hw in sizes:
            ref = lambda q: cv2.resize(cv2.imread(q, cv2.IMREAD_COLOR), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
            opencv = lambda q: images.load_image(q, hw, kind)
            graph = pipeline.reader(hw, kind)
            tf_read = lambda q: graph(tf.constant(q))[0].numpy()[..., ::-1]   # RGB (network_input swaps per batch)
            tf_read(paths[0])
            t = {name: per_image(fn, paths, args.repeats)
                 for name, fn in (('ref', ref), ('cv', opencv), ('tf', tf_read))}
            print(f'{kind:8s} {w}x{h} file -> {hw[1]}x{hw[0]}: full decode + INTER_AREA {t["ref"]:6.2f} ms; '
                  f'images.load_image {t["cv"]:6.2f} ms ({difference(opencv, ref, paths[:5])}); '
                  f'pipeline.reader {t["tf"]:6.2f} ms ({difference(tf_read, ref, paths[:5])})', flush=True)
            if args.prepared:
                copies = [os.path.join(args.prepared, os.path.relpath(q, root)) for q in paths]
                if cv2.imread(copies[0]).shape[:2] == hw:
                    tf_copy = lambda q: tf_read(os.path.join(args.prepared, os.path.relpath(q, root)))
                    print(f'{"":8s} the prepared copy at {hw[1]}x{hw[0]}: pipeline.reader '
                          f'{per_image(tf_read, copies, args.repeats):6.2f} ms ({difference(tf_copy, ref, paths[:5])})',
                          flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
