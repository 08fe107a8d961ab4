"""--test's descriptor path over aerial tiles, in fresh processes: is every run's rate alike?

    python benchmarks/bench_describe.py                     # 6 processes x 2 passes, 1,024 reads, demo size

Each process builds the demo network (64x128 / 64, width 0.25, random weights) and runs Embedder.describe, as
--test does, over --reads reads of the paper-size city's 640-px PNG tiles (bench_train.paper_city), once to
warm up on 64 reads and then --passes times. Printed per pass: tiles/s and the cores busy (process CPU time
over wall time), and at the end the slowest pass over the fastest. Decoding and the network share the cores.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child(args):
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import model as model_lib
    from geoloc.nn import embedding
    tiles = sorted(glob.glob(os.path.join(args.root, '*', 'satellite', '*.png')))
    paths = (tiles * (args.reads // len(tiles) + 1))[:args.reads]
    embedder = embedding.Embedder(model_lib.CrossViewModel((64, 128), 64, 0.25, model_lib.RETRIEVAL_PARTS, seed=0))
    embedder.describe(paths[:64], 'aerial', (64, 64), 32)
    out = []
    for _ in range(args.passes):
        t, c = time.perf_counter(), time.process_time()
        embedder.describe(paths, 'aerial', (64, 64), 32)
        wall = time.perf_counter() - t
        out.append({'rate': len(paths) / wall, 'busy': (time.process_time() - c) / wall})
    print('RESULT ' + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--processes', type=int, default=6)
    p.add_argument('--passes', type=int, default=2)
    p.add_argument('--reads', type=int, default=1024)
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--root', default='', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from bench_train import paper_city
    root = paper_city()
    print(f'load average {"/".join(f"{x:.2f}" for x in os.getloadavg())} at the start; {args.reads} reads of '
          f'{root}', flush=True)
    rates = []
    for i in range(args.processes):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', '--root', root, '--passes',
                               str(args.passes), '--reads', str(args.reads)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
        if proc.returncode or not lines:
            raise SystemExit(f'child failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
        got = json.loads(lines[-1][len('RESULT '):])
        rates += [g['rate'] for g in got]
        print(f'  process {i + 1}: ' + ', '.join(f'{g["rate"]:.1f} tiles/s ({g["busy"]:.2f} cores busy)' for g in got),
              flush=True)
    print(f'slowest / fastest pass {min(rates) / max(rates):.2f}; load average '
          f'{"/".join(f"{x:.2f}" for x in os.getloadavg())} at the end')
    return 0


if __name__ == '__main__':
    sys.exit(main())
