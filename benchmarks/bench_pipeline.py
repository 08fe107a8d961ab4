"""How the input pipeline scales over cores, and what it takes to feed a GPU.

    python benchmarks/bench_pipeline.py                        # demo and paper size, 3 repetitions (~6 min)
    python benchmarks/bench_pipeline.py --sizes paper --repeats 5 --gpu_step 0.1 --gpu_images 2000
    python benchmarks/bench_pipeline.py --sizes demo --cases tiles/original --repeats 8   # --test's tiles only

Files: the paper-size synthetic city of bench_train (2048x1024 JPEG panoramas, 640x640 PNG tiles: VIGOR's
sizes) and its copies prepared at each size by prepare_data.py (made once, next to it). Sizes: demo = grd
64x128, sat 64; paper = grd 320x640, sat 320.

Each repetition runs one child process pinned to 1 core and one pinned to every core (os.sched_setaffinity
before TensorFlow loads, so its thread pools and pipeline.cores() see the pin), in alternating order. A
child measures, each in a fresh dataset after two warm-up batches and for --seconds:
  tiles, panoramas  images/s of descriptor extraction input (pipeline.image_dataset, batch 32), from the
            originals and from the prepared copy;
  train     samples/s of training batches (pipeline.train_dataset, batch 10, grd + sat + semi: 3 images a
            sample), from the originals, from the prepared copy, and from the originals through a warm
            pipeline.ImageCache (every image decoded once before).
Each repetition also measures what the machine gives at that moment: n pinned processes decoding the same
tiles (or panoramas) serially with OpenCV (images.load_image, as docs/design.md §2 reads them) side by side,
whose summed rate is the n cores' serial rate; and, around every measurement, the share of the machine's time
the hypervisor took (steal, /proc/stat). On a virtual machine whose host takes a core away for a while, every
figure of that repetition falls together: the pipeline's rate over the serial rate of the same moment is the
figure that belongs to the pipeline.
Printed per repetition: the rates, the parallel efficiency rate(n cores) / (n x rate(1 core)), the process CPU
time per item on 1 and on n cores and how busy the n cores were (a wall-clock efficiency below 1 with the same
CPU per item and cores less than fully busy means other jobs had the cores), the speed-up of the prepared
copy over the originals (same child, same cores), and the interpreter-lock share: the main
thread's CPU time over the process's (the pipeline runs no Python per image; everything Python does,
iterating the dataset included, runs on the main thread, so this bounds the time any thread can hold the
lock). From the 1-core rate and that share, Amdahl's law projects the efficiency at 16 cores and the cores
needed to feed a GPU that takes --gpu_step seconds per training step of 10 samples, or reads --gpu_images
images/s in descriptor extraction. Load averages are printed at the start and the end: figures taken
while other jobs ran are not valid.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

SIZES = {'demo': ((64, 128), 64), 'paper': ((320, 640), 320)}
CITY = ('NewYork',)
TRAIN_BATCH, DESCRIBE_BATCH = 10, 32
CASES = (('tiles', 'original'), ('tiles', 'prepared'), ('panoramas', 'original'), ('panoramas', 'prepared'),
         ('train', 'original'), ('train', 'prepared'), ('train', 'cached'))


def prepared_root(original, grd_hw, sat_side):
    """The copy of `original` prepared at this size (written once)."""
    from tools import prepare_data
    import input_data
    out = f'{original}_prepared_{grd_hw[0]}x{grd_hw[1]}_{sat_side}'
    if not os.path.isfile(os.path.join(out, input_data.PREPARED)):
        errors = prepare_data.prepare('vigor', original, out, grd_hw, sat_side)
        if errors:
            raise SystemExit('\n'.join(errors))
    return out


# ----------------------------------------------------------------------------- the child (pinned)

def _spin(stop, cpu, out):
    """A busy Python thread on its own core: it runs only while it holds the interpreter lock."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})   # this thread only (Linux affinity is per thread)
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        n += 1
    out.append(n / (time.perf_counter() - t0))


def spinning(fn, cpu):
    """fn() with a busy Python thread beside it -> (fn's result, the thread's iterations/s)."""
    import threading
    stop, out = threading.Event(), []
    thread = threading.Thread(target=_spin, args=(stop, cpu, out))
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    return result, out[0]


def cpu_ticks():
    """(steal, total) ticks of the whole machine so far (/proc/stat's first line; steal is its 8th field)."""
    with open('/proc/stat') as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_share(before, after):
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def measure(ds, batch_items, seconds, probe_cpu):
    """Iterate ds from Python, as the training loop and Embedder.describe do, for `seconds` after two warm-up
    batches -> items/s, process CPU s per item, and the main thread's share of the process's CPU time;
    with probe_cpu (a core the pipeline does not use), again beside a busy Python thread on that core:
    the share of the time that thread could not hold the interpreter lock, and the pipeline's rate then."""
    it = iter(ds)
    for _ in range(2):
        next(it)

    def timed():
        n, t0, c0, m0 = 0, time.perf_counter(), time.process_time(), time.thread_time()
        while time.perf_counter() - t0 < seconds:
            next(it)
            n += batch_items
        wall, cpu, main = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
        return n / wall, cpu / n, main / cpu, main / (n / batch_items)
    out = {}
    ticks = cpu_ticks()
    out['rate'], out['cpu_per_item'], out['main_share'], out['main_per_batch'] = timed()
    out['steal'] = steal_share(ticks, cpu_ticks())
    if probe_cpu is not None:
        _, alone = spinning(lambda: time.sleep(1.0), probe_cpu)
        (out['rate_beside_spinner'], _, _, _), beside = spinning(timed, probe_cpu)
        out['lock_share'] = max(0.0, 1.0 - beside / alone)
    return out


def child(args):
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
    import input_data
    from geoloc.data import pipeline
    grd_hw, sat_side = SIZES[args.size]
    roots = {'original': args.original, 'prepared': args.prepared, 'cached': args.original}
    out = {'cores': pipeline.cores()}
    if args.serial:
        return serial_child(args, roots, grd_hw, sat_side)
    # the lock probe runs in the 1-core child, on a core the pipeline does not use
    others = sorted(set(range(os.cpu_count())) - os.sched_getaffinity(0))
    probe = others[0] if others and len(os.sched_getaffinity(0)) == 1 else None
    for task, source in cases(args.cases):
        split = input_data.load_vigor(roots[source], 'train', cities=CITY)
        if task in ('tiles', 'panoramas'):
            paths, hw, kind = ((split.tile_paths, (sat_side, sat_side), 'aerial') if task == 'tiles' else
                               (split.pano_paths, grd_hw, 'panorama'))
            paths = (paths * (args.items // len(paths) + 1))[:args.items]
            result = measure(pipeline.image_dataset(paths, hw, kind, DESCRIBE_BATCH), DESCRIBE_BATCH, args.seconds,
                             probe)
        else:
            # random items (a one-city grid cannot fill many batches without a repeated tile; decoding does not care)
            rng = np.random.default_rng(0)
            panos = rng.integers(len(split), size=(args.items // TRAIN_BATCH, TRAIN_BATCH))
            semi = 1 + rng.integers(3, size=panos.shape)
            semi = np.where(split.tiles[panos, semi] >= 0, semi, np.argmax(split.tiles[panos, 1:] >= 0, -1) + 1)
            cache = None
            if source == 'cached':    # every image of the split decoded once before
                cache = pipeline.ImageCache(2 ** 31)
                everything = np.repeat(np.arange(len(split)), 3)[:, None]
                for _ in pipeline.train_dataset(split, everything, np.tile([1, 2, 3], len(split))[:, None], grd_hw,
                                                sat_side, 1, cache=cache):
                    pass
            ds = pipeline.train_dataset(split, panos, semi, grd_hw, sat_side, TRAIN_BATCH, cache=cache)
            result = measure(ds, TRAIN_BATCH, args.seconds, probe)
        out[f'{task}/{source}'] = result
    print('RESULT ' + json.dumps(out), flush=True)


def cases(names):
    """CASES, or those of the comma-separated 'task/source' names."""
    if not names:
        return CASES
    chosen = [tuple(n.split('/')) for n in names.split(',')]
    unknown = [f'{t}/{s}' for t, s in chosen if (t, s) not in CASES]
    if unknown:
        raise SystemExit(f'--cases: unknown {", ".join(unknown)}; known: {", ".join(f"{t}/{s}" for t, s in CASES)}')
    return tuple(chosen)


def serial_child(args, roots, grd_hw, sat_side):
    """Decode the originals' tiles and panoramas serially with OpenCV, each for --seconds -> images/s."""
    import input_data
    from geoloc.data import images
    split = input_data.load_vigor(roots['original'], 'train', cities=CITY)
    out = {}
    for task, paths, hw, kind in (('tiles', split.tile_paths, (sat_side, sat_side), 'aerial'),
                                  ('panoramas', split.pano_paths, grd_hw, 'panorama')):
        images.load_image(paths[0], hw, kind)                       # warm-up
        n, t0, i = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            images.load_image(paths[i % len(paths)], hw, kind)
            n, i = n + 1, i + 1
        out[task] = n / (time.perf_counter() - t0)
    print('RESULT ' + json.dumps(out), flush=True)


def child_command(size, cpus, args, original, prepared, serial=False):
    return ([sys.executable, os.path.abspath(__file__), '--child', '--size', size, '--cpus', ','.join(map(str, cpus)),
             '--original', original, '--prepared', prepared, '--seconds', str(args.seconds), '--items',
             str(args.items), '--cases', args.cases] + (['--serial'] if serial else []))


def _result(proc, stdout, stderr):
    lines = [line for line in stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise SystemExit(f'child failed ({proc.returncode}):\n{stderr[-3000:]}')
    return json.loads(lines[-1][len('RESULT '):])


def run_child(size, cpus, args, original, prepared):
    proc = subprocess.run(child_command(size, cpus, args, original, prepared), capture_output=True, text=True,
                          timeout=1800)
    return _result(proc, proc.stdout, proc.stderr)


def serial_rate(size, cpus, args, original, prepared):
    """One serial OpenCV process pinned to each of cpus, side by side -> ({task: summed images/s}, steal)."""
    ticks = cpu_ticks()
    procs = [subprocess.Popen(child_command(size, [c], args, original, prepared, serial=True),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cpus]
    got = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        got.append(_result(proc, stdout, stderr))
    return {task: sum(g[task] for g in got) for task in got[0]}, steal_share(ticks, cpu_ticks())


# ----------------------------------------------------------------------------- the report

def amdahl(s, n):
    """Speed-up on n cores of work whose share s is serial (the interpreter lock)."""
    return 1.0 / (s + (1.0 - s) / n)


def cores_needed(rate_1, s, need):
    """The fewest cores whose Amdahl speed-up over rate_1 reaches `need` items/s (inf if none can)."""
    k = need / rate_1
    if k <= 1:
        return 1
    if 1.0 / k <= s:
        return math.inf
    return math.ceil((1.0 - s) / (1.0 / k - s))


def load():
    return '/'.join(f'{x:.2f}' for x in os.getloadavg())


def idle_share(seconds=2.0):
    """The share of the machine's CPU time that was idle over the next `seconds` (/proc/stat)."""
    def sample():
        with open('/proc/stat') as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)     # idle + iowait, total
    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(min_idle, max_wait):
    """Wait (at most max_wait s) until the machine is at least min_idle idle; -> the idle share seen."""
    t0, idle = time.time(), idle_share()
    while idle < min_idle and time.time() - t0 < max_wait:
        idle = idle_share()
    return idle


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='demo,paper')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--seconds', type=float, default=3.0, help='measured time per case and child')
    p.add_argument('--items', type=int, default=0, help='items per dataset (default: 60000 demo, 6000 paper)')
    p.add_argument('--gpu_step', type=float, default=0.1, help='GPU seconds per training step of 10 samples')
    p.add_argument('--gpu_images', type=float, default=2000.0, help='images/s a GPU embeds in descriptor extraction')
    p.add_argument('--min_idle', type=float, default=0.0,
                   help='before each repetition wait until the machine is this idle (0-1; a shared machine)')
    p.add_argument('--max_wait', type=float, default=600.0, help='seconds to wait for --min_idle at most')
    p.add_argument('--cases', default='', help='comma-separated task/source cases (default: all), e.g. tiles/original')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--serial', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--size', default='demo', help=argparse.SUPPRESS)
    p.add_argument('--cpus', default='', help=argparse.SUPPRESS)
    p.add_argument('--original', default='', help=argparse.SUPPRESS)
    p.add_argument('--prepared', default='', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(',')})   # before TensorFlow starts its threads
        args.items = args.items or (60000 if args.size == 'demo' else 6000)
        return child(args)
    from bench_train import paper_city
    original = paper_city()
    all_cpus = sorted(os.sched_getaffinity(0))
    n = len(all_cpus)
    print(f'{n} cores; load average {load()} (1/5/15 min) at the start')
    summary = {}
    for size in args.sizes.split(','):
        grd_hw, sat_side = SIZES[size]
        prepared = (prepared_root(original, grd_hw, sat_side)
                    if any(src == 'prepared' for _, src in cases(args.cases)) else '')
        print(f'\n{size} size: grd {grd_hw[0]}x{grd_hw[1]}, sat {sat_side}; originals {original}, copy {prepared}')
        for r in range(args.repeats):
            if args.min_idle:
                print(f'  (machine {100 * wait_for_quiet(args.min_idle, args.max_wait):.0f} % idle before rep {r + 1})')
            order = [[all_cpus[0]], all_cpus] if r % 2 == 0 else [all_cpus, [all_cpus[0]]]
            got = {len(c): run_child(size, c, args, original, prepared) for c in order}
            serial, steal = serial_rate(size, all_cpus, args, original, prepared)
            one, many = got[1], got[n]
            line = [f'  rep {r + 1} (load average {load()} after it, machine {100 * idle_share(1.0):.0f} % idle after it):',
                    f'    serial OpenCV, {n} processes side by side: tiles {serial["tiles"]:.1f} img/s, panoramas '
                    f'{serial["panoramas"]:.1f} img/s (steal {100 * steal:.1f} %)']
            for task, source in cases(args.cases):
                key = f'{task}/{source}'
                eff = many[key]['rate'] / (n * one[key]['rate'])
                summary.setdefault((size, key), []).append((one[key], many[key], eff))
                unit = 'samples/s' if task == 'train' else 'img/s'
                probe = (f'lock share {one[key]["lock_share"]:.4f} (1 core '
                         f'{one[key]["rate_beside_spinner"] / one[key]["rate"]:.2f}x beside the spinner); '
                         if 'lock_share' in one[key] else '')
                busy = many[key]['rate'] * many[key]['cpu_per_item'] / n
                vs_serial = (f'{many[key]["rate"] / serial[task]:.2f}x the serial rate, ' if task in serial else '')
                summary.setdefault((size, key, 'vs_serial'), []).append(many[key]['rate'] / serial.get(task, np.nan))
                line.append(f'    {key:18s} 1 core {one[key]["rate"]:8.1f} {unit:9s} {n} cores {many[key]["rate"]:8.1f}  '
                            f'({vs_serial}steal {100 * one[key]["steal"]:.1f} / {100 * many[key]["steal"]:.1f} %)  '
                            f'efficiency {eff:.3f}  CPU/item {1e3 * one[key]["cpu_per_item"]:.2f} / '
                            f'{1e3 * many[key]["cpu_per_item"]:.2f} ms ({n} cores {100 * busy:.0f} % busy)  {probe}'
                            f'main thread {one[key]["main_share"]:.4f} / {many[key]["main_share"]:.4f} '
                            f'({1e6 * one[key]["main_per_batch"]:.0f} us/batch)')
            for task in ('tiles', 'panoramas', 'train'):
                if not {task + '/prepared', task + '/original'} <= {f'{t}/{s}' for t, s in cases(args.cases)}:
                    continue
                line.append(f'    {task}: prepared copy / originals: 1 core '
                            f'{one[task + "/prepared"]["rate"] / one[task + "/original"]["rate"]:.2f}x, {n} cores '
                            f'{many[task + "/prepared"]["rate"] / many[task + "/original"]["rate"]:.2f}x')
            print('\n'.join(line), flush=True)
    print(f'\nsummary over {args.repeats} repetitions (load average {load()} at the end). Amdahl from the median 1-core '
          'rate and the largest main-thread share (all Python runs there: a bound on the interpreter-lock share; the '
          'spinner probe above checks it, and reads high whenever other jobs take the spare core):')
    for (size, key, *what), rows in summary.items():
        if what:
            rates = [x for x in rows if np.isfinite(x)]
            if rates:
                print(f'  {size:5s} {key:18s} {n} cores over the serial rate of the moment: '
                      f'{" ".join(f"{x:.2f}" for x in rates)} (min / max {min(rates) / max(rates):.2f})')
            continue
        effs = [e for _, _, e in rows]
        rate_1 = float(np.median([a['rate'] for a, _, _ in rows]))
        s = max(max(a['main_share'], b['main_share']) for a, b, _ in rows)
        probe = [a['lock_share'] for a, _, _ in rows if 'lock_share' in a]
        task = key.split('/')[0]
        need = TRAIN_BATCH / args.gpu_step if task == 'train' else args.gpu_images
        unit = 'samples/s' if task == 'train' else 'img/s'
        print(f'  {size:5s} {key:18s} efficiency on {n} cores {" ".join(f"{e:.3f}" for e in effs)} (min {min(effs):.3f}); '
              f'lock share {s:.4f} (spinner {" ".join(f"{x:.2f}" for x in probe)}): '
              f'16 cores -> efficiency {amdahl(s, 16) / 16:.3f}, '
              f'{rate_1 * amdahl(s, 16):.0f} {unit}; {need:.0f} {unit} need {cores_needed(rate_1, s, need)} cores')
    return 0


if __name__ == '__main__':
    sys.exit(main())
