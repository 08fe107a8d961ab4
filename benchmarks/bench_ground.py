"""Does the released U-Net's heatmap see the panorama at paper size? Measured at initialisation and after E_2_1
steps on a synthetic city written at paper size.

  python benchmarks/bench_ground.py --out runs_bench_ground                 # init, then 200 E_2_1 steps
  python benchmarks/bench_ground.py --out runs_x --steps 0                  # initialisation only
  python benchmarks/bench_ground.py --out runs_x --grd_size 64 128 --sat_size 64 --width 0.25   # demo size

Builds E_2_1's model (320x640 ground, 320 aerial, width 1 by default; the trunks from --vgg_weights when the
file is there, else random), writes a small synthetic VIGOR whose images are at least the read size, and
reports, for 16 panoramas of the test split each paired with ONE tile (the first panorama's positive):
  share     per layer of the positive branch, the share of the activation that changes with the panorama:
            RMS over panoramas of (a - its mean over the panoramas) / RMS of a (0: the layer ignores it)
  swap      median shift of the soft-argmax (px of the 640-px tile) when each panorama is swapped for the
            next one, the tile fixed
  gradient  each trained part's gradient RMS under E_2_1's loss on one training batch, and its ratio to
            Adam's eps (1e-8): below ~10 the part barely moves
then trains E_2_1 for --steps steps (the stage's loss and optimiser, --batch) and measures again. Prints one
table and writes <out>/ground.json.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from geoloc import cli  # noqa: E402  (TensorFlow-free)


def paper_city(out, grd_hw, sat_side):
    """A 4-city synthetic VIGOR whose images are at least the read sizes (never upscaled)."""
    from tools import synthetic_data
    return synthetic_data.ensure_vigor(os.path.join(out, f'VIGOR_{sat_side}'), seed=0, grid=4, tile_px=sat_side,
                                       pano_hw=tuple(grd_hw), panos_per_tile=2)


def share(a):
    """[P, ...] activations of P panoramas with one tile -> the share that changes with the panorama."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    total = np.sqrt(np.mean(a ** 2))
    return float(np.sqrt(np.mean((a - a.mean(0)) ** 2)) / total) if total > 0 else 0.0


def measure(model, grd, sat):
    """Per-layer shares, RMS and the swap shift of the positive branch (grd [P, H, W, 3] panoramas, sat [P, S, S, 3]
    the same tile repeated)."""
    import tensorflow as tf
    import model as model_lib
    g = model.embed_grd(grd)
    s, skips = model.embed_sat(sat)
    trace = {'descriptor': g, 'bottleneck': model.pos_fusion(s, g)}
    heat = model.pos_decoder(trace['bottleneck'], skips, trace)
    mu = model_lib.soft_argmax(heat)
    swapped = model_lib.soft_argmax(model.pos_decoder(model.pos_fusion(s, tf.roll(g, 1, 0)), skips))
    layers = [{'layer': k, 'share': share(v.numpy()), 'rms': float(np.sqrt(np.mean(np.square(v.numpy()))))}
              for k, v in trace.items()]
    skip_rms = {k: float(np.sqrt(np.mean(np.square(v.numpy())))) for k, v in skips.items()}
    return {'layers': layers, 'skip_rms': skip_rms,
            'swap_shift_px_median': float(np.median(np.linalg.norm((swapped - mu).numpy(), axis=1)))}


def gradients(state, stage, cfg, batch):
    """Each trained part's gradient RMS under the stage's loss on one batch, not applied: the training loop's
    own diagnostic (loop.make_gradient_probe), as validation logs it."""
    from geoloc.train import loop
    return {part: float(v) for part, v in loop.make_gradient_probe(state, stage, cfg)(batch).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs_bench_ground')
    p.add_argument('--grd_size', type=int, nargs=2, default=(320, 640))
    p.add_argument('--sat_size', type=int, default=320)
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--steps', type=int, default=200, help='E_2_1 steps between the two measurements')
    p.add_argument('--batch', type=int, default=10)
    p.add_argument('--lr', type=float, default=1e-5, help="E_2_1's (the paper's 1e-5)")
    p.add_argument('--flags', default='', help='more E_2_1 flags, e.g. "--decoder_init scaled --skip_norm 1"')
    p.add_argument('--panoramas', type=int, default=16)
    args = p.parse_args(argv)
    cli.setup_environment()
    import tensorflow as tf
    from geoloc.data import pipeline
    import stages
    from geoloc.train import train_state
    stage = stages.get('E_2_1')
    data = paper_city(args.out, args.grd_size, args.sat_size)
    argv = ['--grd_size', *map(str, args.grd_size), '--sat_size', str(args.sat_size), '--width', str(args.width),
            '--data_root', data, '--batch', str(args.batch), '--lr', str(args.lr), '--epoch_batch', '0',
            '--val_every', '0', '--mining', '0', '--log_every', '10', '--epochs', '1000', '--max_steps',
            str(max(args.steps, 1)), '--run_dir', os.path.join(args.out, 'E_2_1'), '--plots', '0'] + args.flags.split()
    cfg = cli.configs([stage], argv)[0]
    split = cli.dataset_splits(cfg, 'test')
    train = cli.dataset_splits(cfg, 'train')
    n = min(args.panoramas, len(split))
    grd = np.stack([next(iter(pipeline.image_dataset([split.pano_paths[q]], cfg.grd_size, 'panorama', 1)))[0][0]
                    for q in range(n)])
    tile = next(iter(pipeline.image_dataset([split.tile_paths[split.tiles[0, 0]]], (cfg.sat_size,) * 2,
                                            'aerial', 1)))[0]
    grd, sat = tf.constant(grd), tf.repeat(tile, n, 0)
    sampler_batch = next(iter(pipeline.train_dataset(train, np.arange(args.batch), np.ones(args.batch, np.int64),
                                                     cfg.grd_size, cfg.sat_size, args.batch)))
    state = train_state.TrainState(stage, cfg, len(train), 1)
    weights = cfg.vgg_weights if os.path.isfile(cfg.vgg_weights) else ''
    if weights:   # the initialisation order's ImageNet step, as a first stage takes it
        train_state.initialise(state, dataclasses.replace(stage, previous=''), cfg, os.path.join(args.out, 'none'),
                               '', print)
    report = {'args': vars(args), 'trunks': 'ImageNet' if weights else 'random', 'eps': state.optimizer.eps}
    t0 = time.time()
    report['init'] = dict(measure(state.model, grd, sat), gradients=gradients(state, stage, cfg, sampler_batch))
    report['init']['seconds'] = time.time() - t0
    if args.steps:
        # the stage script starts E_2_1 from a predecessor's checkpoint: this state, measured above, is that
        e1a_dir = os.path.join(args.out, 'E_1a_init')
        tf.train.CheckpointManager(state.checkpoint(), os.path.join(e1a_dir, 'ckpt'), 1).save(0)
        t1 = time.time()
        code = cli.main([stage], argv + ['--init_from', e1a_dir])
        if code:
            return code
        report['train_seconds'] = time.time() - t1
        run_dir = os.path.join(args.out, 'E_2_1')
        trained = train_state.TrainState(stage, cfg, len(train), 1)
        trained.checkpoint().read(train_state.latest_checkpoint(run_dir)).expect_partial()
        report['after'] = dict(measure(trained.model, grd, sat),
                               gradients=gradients(trained, stage, cfg, sampler_batch), steps=args.steps)
    lines = [f'E_2_1 at {cfg.grd_size[0]}x{cfg.grd_size[1]} / {cfg.sat_size}, width {cfg.width}, {report["trunks"]} '
             f'trunks; {n} panoramas with one tile', '',
             'share of each layer that changes with the panorama (RMS of the layer in brackets)']
    phases = ['init'] + (['after'] if 'after' in report else [])
    for i, layer in enumerate(report['init']['layers']):
        lines.append(f'  {layer["layer"]:>14}: ' + '   '.join(
            f'{ph} {report[ph]["layers"][i]["share"]:.3g} ({report[ph]["layers"][i]["rms"]:.3g})' for ph in phases))
    lines.append('aerial skip RMS at init: ' + ', '.join(f'{k} {v:.3g}' for k, v in report['init']['skip_rms'].items()))
    lines.append('swap shift median (px of the 640 tile): ' + '   '.join(
        f'{ph} {report[ph]["swap_shift_px_median"]:.3g}' for ph in phases))
    lines.append("gradient RMS / Adam's eps:")
    for part in report['init']['gradients']:
        lines.append(f'  {part:>12}: ' + '   '.join(
            f'{ph} {report[ph]["gradients"][part]:.3g} ({report[ph]["gradients"][part] / report["eps"]:.3g} eps)'
            for ph in phases))
    if 'after' in report:
        lines.append(f'after {args.steps} E_2_1 steps of batch {args.batch} at lr {args.lr}: '
                     f'{report["train_seconds"] / 60:.1f} min')
    print('\n'.join(lines))
    with open(os.path.join(args.out, 'ground.json'), 'w') as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, 'ground.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
