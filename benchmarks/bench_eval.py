"""Speed and memory of the streamed retrieval metrics against a plain blocked matmul.

    python benchmarks/bench_eval.py                      # full same-area VIGOR: 52,605 x 90,618, 4096-d
    python benchmarks/bench_eval.py --queries 5000       # a tenth of it

Random L2-normalised float32 descriptors stand in for the model's. In one run it times
evaluation.retrieval_ranks + retrieval_metrics and, as the baseline, np.matmul alone over the
same (block x ref_block) tiles into one reused buffer (result discarded), alternating the two
over segments of `block` queries. Targets: peak RSS <=
descriptors + 1 GiB, and throughput >= 80 % of the baseline's. 2·Q·N·D flops per pass.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from geoloc.eval import evaluation  # noqa: E402

GiB = 2 ** 30


def random_unit_rows(rng, n, dim, chunk=4096):
    """(n, dim) float32 unit rows, generated in place chunk by chunk (no full-size temporary)."""
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        rows = out[i:i + chunk]
        rng.standard_normal(rows.shape, dtype=np.float32, out=rows)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def blocked_matmul(grd, sat, block, ref_block):
    """The baseline: grd · satᵀ by the same tiles as retrieval_ranks, each result discarded."""
    tile = np.empty(min(block, len(grd)) * min(ref_block, len(sat)), np.float32)
    for q0 in range(0, len(grd), block):
        g = grd[q0:q0 + block]
        for r0 in range(0, len(sat), ref_block):
            s = sat[r0:r0 + ref_block]
            np.matmul(g, s.T, out=tile[:len(g) * len(s)].reshape(len(g), len(s)))


def clocks():
    """(wall, process CPU) seconds."""
    return np.array([time.perf_counter(), time.process_time()])


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # Linux: kB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--queries', type=int, default=52605)
    parser.add_argument('--refs', type=int, default=90618)
    parser.add_argument('--dim', type=int, default=4096)
    parser.add_argument('--block', type=int, default=4096, help='queries per tile')
    parser.add_argument('--ref-block', type=int, default=None, help='references per tile (default: 256 MB tile)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    q, n, d = args.queries, args.refs, args.dim
    ref_block = args.ref_block or max(1, evaluation.SIM_TILE_BYTES // (4 * args.block))
    flops = 2.0 * q * n * d

    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    grd = random_unit_rows(rng, q, d)
    sat = random_unit_rows(rng, n, d)
    pos = rng.integers(0, n, q)
    semi = rng.integers(0, n, (q, 3))
    descriptors = grd.nbytes + sat.nbytes
    print(f'{q} queries x {n} references x {d} dims; tiles {args.block} x {min(ref_block, n)}; '
          f'BLAS threads: {os.environ.get("OPENBLAS_NUM_THREADS", "default")}, {os.cpu_count()} CPUs')
    print(f'descriptors: {descriptors / GiB:.2f} GiB, generated in {time.perf_counter() - t:.1f} s; '
          f'RSS now {psutil.Process().memory_info().rss / GiB:.2f} GiB')

    # Alternate the two over segments of `block` queries so that other load on the machine hits
    # both alike; wall and process CPU time are both summed.
    ours, base = np.zeros(2), np.zeros(2)
    parts = []
    load = os.getloadavg()[0]
    for q0 in range(0, q, args.block):
        rows = slice(q0, q0 + args.block)
        clock = clocks()
        parts.append(evaluation.retrieval_ranks(grd[rows], sat, pos[rows], semi[rows],
                                                block=args.block, ref_block=args.ref_block))
        ours += clocks() - clock
        clock = clocks()
        blocked_matmul(grd[rows], sat, args.block, ref_block)
        base += clocks() - clock
        print(f'  queries {min(q0 + args.block, q)}/{q}: wall so far {ours[0]:.0f} s metrics, '
              f'{base[0]:.0f} s matmul', flush=True)
    clock = clocks()
    ranks = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    metrics = evaluation.retrieval_metrics(ranks, n)
    ours += clocks() - clock
    peak = peak_rss()
    print(f'load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}')
    print(f'retrieval_ranks + retrieval_metrics: wall {ours[0]:.1f} s ({flops / ours[0] / 1e9:.1f} GFLOP/s), '
          f'CPU {ours[1]:.1f} s; R@1 {metrics["R@1"]:.5f} (chance {1 / n:.5f})')
    print(f'baseline blocked matmul:             wall {base[0]:.1f} s ({flops / base[0] / 1e9:.1f} GFLOP/s), '
          f'CPU {base[1]:.1f} s')

    ratio = base[0] / ours[0]
    overhead = peak - descriptors
    print(f'peak RSS {peak / GiB:.2f} GiB = descriptors + {overhead / GiB:.2f} GiB '
          f'[target <= +1 GiB: {"ok" if overhead <= GiB else "MISSED"}]')
    print(f'throughput ratio metrics / matmul: {ratio:.3f} wall [target >= 0.80: '
          f'{"ok" if ratio >= 0.8 else "MISSED"}], {base[1] / ours[1]:.3f} CPU time')


if __name__ == '__main__':
    main()
