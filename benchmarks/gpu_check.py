"""The accelerator check: one offline command that measures, in about 8 minutes on one GPU, every stage's
paper-size training step, its share of the GPU's peak, and how fast the host's cores feed it.

    python benchmarks/gpu_check.py --out DIR            # on the GPU machine (nothing is downloaded)
    python benchmarks/gpu_check.py --out DIR --smoke    # the same code paths at tiny size on the CPU (< 3 min)

Needs only the working tree and a Python with requirements.txt installed, TensorFlow with CUDA
(tensorflow[and-cuda] of the same version range) in place of tensorflow-cpu. Parts, in order, within --budget
seconds (450) counted from the start of the process:
  peak      tf.matmul of 8192^3 in float32 (TensorFloat-32 where TensorFlow enables it: the float32 kernels'
            own peak) and float16: the reference every step is compared with;
  city      a small synthetic VIGOR written at paper size into a temporary folder (two cities of 4 x 4
            tiles with panoramas: 640-px PNG tiles, 1024 x 2048 JPEG panoramas; synthetic_data.write_vigor);
  pipeline  pipeline.image_dataset's rate on every host core (pipeline.cores()), no image cache, every
            image decoded from the files (in the page cache), from each dataset's first batch: panoramas
            read at 320 x 640, tiles at 320, and training samples (pipeline.train_dataset: a panorama and
            two tiles); the table says whether that feeds each stage's step;
  stages    every stage (E_1a, E_1, E_2_1, E_2_2, E_3) in float32, then with --mixed_precision 1: the stage's
            train state with random weights and its real compiled step (benchmarks/bench_train.py's
            build_step: train_state.TrainState, loop.make_step) on a pipeline batch of 10 (the paper's) held
            on the device; the first step (tracing, graph optimisation, kernel autotuning) timed apart, 3
            untimed steps, then up to --steps (20) timed ones, fewer when the stage's share of what is left
            is spent, each read back as the training loop reads it (the step's finiteness flag). FLOPs counted from the traced shapes (bench_train.step_flops: 3 x the
            forward's conv/matmul/einsum) over the best step time, as a share of the peak of the same
            precision.
A stage that would not fit in what is left of the budget is skipped and a part that fails is recorded,
both by name in the output; the rest still run. DIR/gpu_check.json and DIR/gpu_check.txt (the table, also
printed) are rewritten after every part, and a watchdog writes them and ends the process a minute past the
budget (a hung kernel). Exit status 0: every part measured; 1: some part skipped or failed; 2: a
requirement missing or, without --smoke, no GPU visible (the JSON then says which, and what TensorFlow was
built for).
"""
import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

T0 = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from stages import ORDER  # noqa: E402  (TensorFlow-free, standard library only)

bench_train = None   # imported by main() once the requirements are known to be there

PRECISIONS = ('float32', 'mixed')
CITIES = ('NewYork', 'Seattle')
# what each mode measures at: input sizes, width, batch, the city's files, the matmul's n and the timings
MODES = {
    'paper': {'grd_size': (320, 640), 'sat_size': 320, 'width': 1.0, 'batch': 10, 'tile_px': 640,
              'pano_hw': (1024, 2048), 'matmul_n': 8192, 'budget': 450, 'steps': 20, 'warmup': 3,
              'pipeline_s': 8.0, 'eval_batch': 32},
    'smoke': {'grd_size': (32, 64), 'sat_size': 64, 'width': 0.0625, 'batch': 4, 'tile_px': 64,
              'pano_hw': (32, 64), 'matmul_n': 256, 'budget': 170, 'steps': 3, 'warmup': 1,
              'pipeline_s': 1.0, 'eval_batch': 16},
}
# seconds kept back at the end for writing the results
RESERVE_S = 10.0
BUDGET = MODES['paper']['budget']     # main() sets the run's
# what the code paths import (requirements.txt); a machine without one gets a JSON saying which
REQUIRED = {'tensorflow': 'tensorflow[and-cuda]', 'numpy': 'numpy', 'cv2': 'opencv-python-headless',
            'scipy': 'scipy', 'PIL': 'pillow', 'matplotlib': 'matplotlib', 'psutil': 'psutil'}


def left():
    return BUDGET - (time.time() - T0)


def first_line(e):
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0][:300] if text else ""}'


# ----------------------------------------------------------------------------- the machine

def environment(tf):
    """What TensorFlow was built for and what it sees (written whatever happens next)."""
    info = {'python': platform.python_version(), 'tensorflow': tf.__version__, 'host': platform.node(),
            'host_cores': os.cpu_count(), 'pipeline_cores': None, 'gpus': []}
    build = tf.sysconfig.get_build_info()
    info['built_with'] = {k: build.get(k) for k in ('cuda_version', 'cudnn_version', 'is_cuda_build')}
    for gpu in tf.config.list_physical_devices('GPU'):
        details = tf.config.experimental.get_device_details(gpu)
        info['gpus'].append({'name': details.get('device_name', gpu.name),
                             'compute_capability': details.get('compute_capability')})
    info['tensor_float_32'] = bool(tf.config.experimental.tensor_float_32_execution_enabled())
    if shutil.which('nvidia-smi'):
        try:
            info['nvidia_smi'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm', '--format=csv,noheader'],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info['nvidia_smi'] = first_line(e)
    with (open('/proc/cpuinfo') if os.path.exists('/proc/cpuinfo') else open(os.devnull)) as f:
        names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    info['cpu'] = names[0] if names else platform.processor()
    return info


# ----------------------------------------------------------------------------- peak

def matmul_peak(tf, n, dtype, device, calls=10, repeats=3):
    """Best FLOP/s of an n x n @ n x n product in `dtype` on `device`: `calls` products dispatched back to back
    (the GPU queues them) and one element read back, best of `repeats`, after one untimed round."""
    with tf.device(device):
        a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
        b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dtype)
    fn = tf.function(tf.matmul)
    best = float('inf')
    for r in range(repeats + 1):
        t = time.perf_counter()
        for _ in range(calls):
            c = fn(a, b)
        float(c[0, 0].numpy())
        if r:
            best = min(best, (time.perf_counter() - t) / calls)
    return 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------- the input pipeline

def write_city(mode, folder):
    from tools import synthetic_data
    return synthetic_data.ensure_vigor(os.path.join(folder, 'VIGOR'), seed=0, cities=CITIES, grid=4,
                                       tile_px=mode['tile_px'], pano_hw=mode['pano_hw'])


def first_batch_items(split, batch):
    """(panos [1, batch], semi [1, batch]): training panoramas with distinct positive tiles, each with its
    first semi-positive in the reference set (what a pipeline batch needs; the sampler's rules do not matter
    to the step's time)."""
    seen, panos = set(), []
    for p, t in enumerate(split.tiles[:, 0]):
        if int(t) not in seen:
            seen.add(int(t))
            panos.append(p)
        if len(panos) == batch:
            break
    panos = np.array(panos * (-(-batch // len(panos))))[:batch]
    semi = np.array([1 + int(np.argmax(split.tiles[p, 1:] >= 0)) for p in panos])
    return panos[None], semi[None]


def rate(ds, seconds):
    """Items/s of the dataset `ds` over `seconds` from its first batch (its start-up, tracing its functions,
    left out) -> (rate, items counted)."""
    it = iter(ds)
    next(it)
    n, t = 0, time.perf_counter()
    for x in it:
        n += int(x[0].shape[0]) if isinstance(x, tuple) else int(x['grd'].shape[0])
        if time.perf_counter() - t >= seconds:
            break
    return n / (time.perf_counter() - t), n


def pipeline_rates(mode, split, seconds, items=20000):
    """Panoramas/s, tiles/s and training samples/s of the pipeline over the city's files (repeated to `items`,
    more than the cores read in `seconds`), every image decoded (no cache; the files in the page cache)."""
    from geoloc.data import pipeline
    grd, sat = mode['grd_size'], (mode['sat_size'],) * 2
    panos = np.resize(np.array(split.pano_paths), items)
    tiles = np.resize(np.array(split.tile_paths), items)
    plan = np.resize(np.arange(len(split)), items // 3)
    semi = np.array([1 + int(np.argmax(split.tiles[p, 1:] >= 0)) for p in plan])
    out = {'cores': pipeline.cores(), 'seconds': seconds}
    for name, ds in (
            ('panoramas_per_s', pipeline.image_dataset(panos, grd, 'panorama', mode['eval_batch'])),
            ('tiles_per_s', pipeline.image_dataset(tiles, sat, 'aerial', mode['eval_batch'])),
            ('training_samples_per_s', pipeline.train_dataset(split, plan, semi, grd, mode['sat_size'],
                                                              mode['batch']))):
        out[name], out[name.replace('_per_s', '_counted')] = rate(ds, seconds)
    return out


# ----------------------------------------------------------------------------- one stage's step

def time_stage(tf, mode, stage_name, precision, host_batch, device, flops_cache, cap_s, n_train):
    """Build the stage's state and step, time them -> a result dict."""
    from geoloc.train import distribute
    res = {'stage': stage_name, 'precision': precision}
    t = time.perf_counter()
    explicit = {'grd_size': mode['grd_size'], 'sat_size': mode['sat_size'], 'width': mode['width'],
                'batch': mode['batch'], 'mixed_precision': int(precision == 'mixed')}
    stage, cfg = bench_train.stage_config(stage_name, explicit)
    keys = [k for k in host_batch if stage.uses_semi or k != 'semi']
    with tf.device(device):                 # held on the device: the step alone is timed
        batch = {k: tf.identity(host_batch[k]) for k in keys}
    if device.startswith('/GPU'):
        tf.config.experimental.reset_memory_stats(device[1:])
    strategy = distribute.make_strategy('default')
    state, step = bench_train.build_step(stage, cfg, n_train, max(1, n_train // 14), strategy)
    res['build_s'] = time.perf_counter() - t
    res['trained_params'] = int(sum(int(np.prod(v.shape)) for v in state.optimizer.vars))
    if stage_name not in flops_cache:
        flops_cache[stage_name] = bench_train.step_flops(state, stage, cfg, batch)[0] * 3
    res['flops_step'] = flops_cache[stage_name]

    def one():
        s = time.perf_counter()
        loss, _, _, ok, _ = step(batch)
        if not bool(ok.numpy()):            # what the loop reads back every step
            raise FloatingPointError(f'non-finite step (loss {float(loss)})')
        return time.perf_counter() - s
    start = time.perf_counter()
    res['first_step_s'] = one()
    for _ in range(mode['warmup']):
        one()
    times = []
    while len(times) < mode['steps']:
        times.append(one())
        if 3 <= len(times) < mode['steps'] and time.perf_counter() - start > cap_s:
            res['note'] = f'{len(times)} of {mode["steps"]} timed steps: the stage\'s share of the budget was spent'
            break
    res.update(step_s=float(np.min(times)), step_s_median=float(np.median(times)), steps_timed=len(times),
               samples_per_s=mode['batch'] / float(np.min(times)),
               flops_per_s=res['flops_step'] / float(np.min(times)))
    if device.startswith('/GPU'):
        res['gpu_peak_bytes'] = int(tf.config.experimental.get_memory_info(device[1:])['peak'])
    res['total_s'] = time.perf_counter() - t
    del state, step, batch
    gc.collect()
    return res


# ----------------------------------------------------------------------------- the report

def table(out):
    env, lines = out['environment'], []
    gpu = ', '.join(f'{g["name"]} (compute {g["compute_capability"]})' for g in env.get('gpus', [])) or 'no GPU'
    built = env.get('built_with', {})
    lines.append(f'gpu_check{" --smoke" if out["smoke"] else ""} {out["date"]}: {gpu}; TensorFlow '
                 f'{env.get("tensorflow", "?")} (CUDA {built.get("cuda_version")}, cuDNN {built.get("cudnn_version")}); '
                 f'host {env.get("cpu", "?")}, {env.get("host_cores", "?")} cores; {out["elapsed_s"]:.0f} s of a '
                 f'{out["budget_s"]:.0f} s budget')
    peak = out.get('peak', {})
    if peak:
        lines.append(f'peak: tf.matmul {peak["n"]}^3 float32 {peak["float32"] / 1e12:.2f} TFLOP/s '
                     f'(TensorFloat-32 {"on" if env["tensor_float_32"] else "off"}), float16 '
                     f'{peak["float16"] / 1e12:.2f} TFLOP/s')
    pipe = out.get('pipeline', {})
    if 'panoramas_per_s' in pipe:
        m = out['mode']
        lines.append(f'input pipeline on {pipe["cores"]} cores, from the files, no cache: panoramas '
                     f'{m["pano_hw"][1]}x{m["pano_hw"][0]} JPEG -> {m["grd_size"][1]}x{m["grd_size"][0]} '
                     f'{pipe["panoramas_per_s"]:,.0f} img/s, tiles {m["tile_px"]} PNG -> {m["sat_size"]} '
                     f'{pipe["tiles_per_s"]:,.0f} img/s, training samples (3 images) '
                     f'{pipe["training_samples_per_s"]:,.0f}/s (city written in {pipe["city_s"]:.0f} s)')
    lines.append('')
    lines.append(f'{"stage":6s} {"precision":9s} {"step ms":>8s} {"median":>8s} {"steps":>5s} {"samples/s":>9s} '
                 f'{"GFLOP":>7s} {"TFLOP/s":>8s} {"% peak":>6s} {"first s":>7s} {"GPU GiB":>7s}  pipeline keeps up')
    for r in out['stages']:
        if r.get('status') != 'ok':
            lines.append(f'{r["stage"]:6s} {r["precision"]:9s} {r["status"]}')
            continue
        gib = f'{r["gpu_peak_bytes"] / 2 ** 30:7.1f}' if 'gpu_peak_bytes' in r else f'{"-":>7s}'
        feed = ''
        if 'training_samples_per_s' in pipe:
            need = r['samples_per_s']
            feed = (f'yes ({pipe["training_samples_per_s"] / need:.1f}x)' if pipe['training_samples_per_s'] >= need
                    else f'no ({pipe["training_samples_per_s"] / need:.2f}x)')
        lines.append(f'{r["stage"]:6s} {r["precision"]:9s} {1e3 * r["step_s"]:8.1f} {1e3 * r["step_s_median"]:8.1f} '
                     f'{r["steps_timed"]:5d} {r["samples_per_s"]:9.1f} {r["flops_step"] / 1e9:7.1f} '
                     f'{r["flops_per_s"] / 1e12:8.2f} {100 * r["share_of_peak"]:6.1f} {r["first_step_s"]:7.1f} {gib}  '
                     f'{feed}' + (f'  [{r["note"]}]' if r.get('note') else ''))
    for problem in out['problems']:
        lines.append(f'NOTE: {problem}')
    return lines


_WRITING = threading.Lock()


def write(out, folder):
    """gpu_check.json and gpu_check.txt with what is measured so far (after every part: a killed run keeps
    them) -> the table's lines."""
    with _WRITING:
        out['elapsed_s'] = time.time() - T0
        lines = table(out)
        for name, text in (('gpu_check.json', json.dumps(out, indent=1, default=str)),
                           ('gpu_check.txt', '\n'.join(lines) + '\n')):
            with open(os.path.join(folder, name + '.tmp'), 'w') as f:
                f.write(text)
            os.replace(os.path.join(folder, name + '.tmp'), os.path.join(folder, name))
    return lines


def watchdog(out, folder, part, grace):
    """Past the budget and `grace` seconds, write what was measured with a note and end the process: a step
    that hangs must not cost the results of the parts before it."""
    def run():
        while time.time() - T0 < BUDGET + grace:
            time.sleep(1.0)
        try:
            out['problems'].append(f'stopped by the watchdog at {time.time() - T0:.0f} s, during {part[0]}')
            print('\n'.join(write(out, folder)), flush=True)
        finally:
            os._exit(1)
    threading.Thread(target=run, daemon=True).start()


# ----------------------------------------------------------------------------- main

def main(argv=None):
    global BUDGET, bench_train
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='folder for gpu_check.json and gpu_check.txt')
    p.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU: the same code paths in < 3 min')
    p.add_argument('--budget', type=float, default=0, help='seconds for the whole run (default: 450; smoke 170)')
    p.add_argument('--steps', type=int, default=0, help='timed steps per stage and precision (default 20; smoke 3)')
    p.add_argument('--stages', default=','.join(ORDER))
    p.add_argument('--precisions', default=','.join(PRECISIONS))
    p.add_argument('--grace', type=float, default=60,
                   help='seconds past the budget before a watchdog writes the results and ends the run')
    p.add_argument('--city', default='', help='where to write (or find) the synthetic city (default: a temporary '
                                              'folder, removed at the end)')
    args = p.parse_args(argv)
    mode = dict(MODES['smoke' if args.smoke else 'paper'])
    if args.steps:
        mode['steps'] = args.steps
    BUDGET = args.budget or mode['budget']
    stage_names = [s for s in args.stages.split(',') if s]
    precisions = [s for s in args.precisions.split(',') if s]
    bad = [s for s in stage_names if s not in ORDER] + [s for s in precisions if s not in PRECISIONS]
    if bad:
        p.error(f'unknown stage or precision {bad}')
    os.makedirs(args.out, exist_ok=True)
    out = {'smoke': args.smoke, 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'budget_s': BUDGET,
           'mode': mode, 'environment': {}, 'stages': [], 'problems': []}
    missing = [f'{m} (pip: {pkg})' for m, pkg in REQUIRED.items() if importlib.util.find_spec(m) is None]
    if missing:
        out['problems'].append('not installed: ' + ', '.join(missing) + '; install requirements.txt (tensorflow'
                               '[and-cuda] in place of tensorflow-cpu) into this Python')
        print('\n'.join(write(out, args.out)), flush=True)
        return 2
    if args.smoke:
        os.environ['CUDA_VISIBLE_DEVICES'] = '-1'      # the CPU, whatever the machine has
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    import bench_train as bt
    bench_train = bt
    part = ['start-up']
    watchdog(out, args.out, part, args.grace)

    gpus = tf.config.list_physical_devices('GPU')
    for gpu in gpus:         # take memory as needed: the peak per stage is then what the stage used
        tf.config.experimental.set_memory_growth(gpu, True)
    out['environment'] = environment(tf)
    if not gpus and not args.smoke:
        out['problems'].append('TensorFlow sees no GPU: install tensorflow[and-cuda] of requirements.txt\'s version '
                               'range and check the driver (environment.built_with, environment.nvidia_smi)')
        print('\n'.join(write(out, args.out)), flush=True)
        return 2
    device = '/GPU:0' if gpus else '/CPU:0'
    say = lambda msg: print(f'[{time.time() - T0:5.0f} s] {msg}', flush=True)
    say(f'TensorFlow {tf.__version__} on {device}; budget {BUDGET:.0f} s')

    # peak
    part[0] = 'the matmul peak'
    try:
        out['peak'] = {'n': mode['matmul_n'],
                       'float32': matmul_peak(tf, mode['matmul_n'], tf.float32, device),
                       'float16': matmul_peak(tf, mode['matmul_n'], tf.float16, device)}
        say(f'matmul peak: float32 {out["peak"]["float32"] / 1e12:.2f}, float16 {out["peak"]["float16"] / 1e12:.2f} '
            'TFLOP/s')
    except Exception as e:  # noqa: BLE001  (one failed part must not cost the others)
        out['problems'].append(f'peak: {first_line(e)}')
    write(out, args.out)

    # the city and the input pipeline
    import input_data
    from geoloc.data import pipeline
    part[0] = 'the city and the input pipeline'
    folder = args.city or tempfile.mkdtemp(prefix='gpu_check_city_')
    host_batch, split = None, None
    try:
        t = time.time()
        root = write_city(mode, folder)
        city_s = time.time() - t
        split = input_data.load_vigor(root, 'train', cities=CITIES)
        panos, semi = first_batch_items(split, mode['batch'])
        host_batch = next(iter(pipeline.train_dataset(split, panos, semi, mode['grd_size'], mode['sat_size'],
                                                      mode['batch'])))
        say(f'city: {len(split)} training panoramas, {len(split.tile_paths)} tiles in {city_s:.0f} s')
        out['pipeline'] = dict(pipeline_rates(mode, split, mode['pipeline_s']), city_s=city_s)
        out['environment']['pipeline_cores'] = out['pipeline']['cores']
        say(f'pipeline on {out["pipeline"]["cores"]} cores: {out["pipeline"]["panoramas_per_s"]:.0f} panoramas/s, '
            f'{out["pipeline"]["tiles_per_s"]:.0f} tiles/s, {out["pipeline"]["training_samples_per_s"]:.0f} '
            'training samples/s')
    except Exception as e:  # noqa: BLE001
        out['problems'].append(f'city or pipeline: {first_line(e)}')
    finally:
        if not args.city:
            shutil.rmtree(folder, ignore_errors=True)
    write(out, args.out)

    # the stages: every stage in float32 first, then mixed precision
    combos = [(s, pr) for pr in precisions for s in stage_names]
    flops, longest = {}, 0.0
    for i, (stage_name, precision) in enumerate(combos):
        part[0] = f'{stage_name} {precision}'
        room = left() - RESERVE_S
        if host_batch is None:
            r = {'stage': stage_name, 'precision': precision,
                 'status': 'skipped: no batch (the city or the pipeline failed)'}
        elif room < max(longest, 5.0):
            r = {'stage': stage_name, 'precision': precision,
                 'status': f'skipped: {room:.0f} s of the budget left, the longest stage took {longest:.0f} s'}
            say(f'{stage_name} {precision}: skipped (budget)')
        else:
            cap = room / (len(combos) - i)       # the timed steps' share; building and tracing come on top
            try:
                r = time_stage(tf, mode, stage_name, precision, host_batch, device, flops, cap, len(split))
                peak = (out.get('peak') or {}).get('float32' if precision == 'float32' else 'float16')
                r['share_of_peak'] = r['flops_per_s'] / peak if peak else float('nan')
                r['status'] = 'ok' if np.isfinite(r['step_s']) else 'failed: no finite step time'
                longest = max(longest, r['total_s'])
                say(f'{stage_name} {precision}: step {1e3 * r["step_s"]:.1f} ms (median '
                    f'{1e3 * r["step_s_median"]:.1f}, {r["steps_timed"]} steps), {r["flops_per_s"] / 1e12:.2f} '
                    f'TFLOP/s = {100 * r["share_of_peak"]:.1f} % of peak; first step {r["first_step_s"]:.1f} s, '
                    f'{r["total_s"]:.0f} s in all')
            except Exception as e:  # noqa: BLE001
                r = {'stage': stage_name, 'precision': precision, 'status': f'failed: {first_line(e)}'}
                say(f'{stage_name} {precision}: {r["status"]}')
                gc.collect()
        out['stages'].append(r)
        write(out, args.out)
    part[0] = 'writing the results'
    skipped = [f'{r["stage"]} {r["precision"]}' for r in out['stages'] if r['status'] != 'ok']
    if skipped:
        over = any('budget' in r['status'] for r in out['stages'])
        out['problems'].append('not measured: ' + ', '.join(skipped) +
                               (' (over budget: run again with --stages / --precisions for those)' if over else ''))
    print('\n'.join(write(out, args.out)), flush=True)
    return 0 if not out['problems'] else 1


if __name__ == '__main__':
    sys.exit(main())
