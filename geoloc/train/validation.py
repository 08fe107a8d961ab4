"""Validation during training: --val_queries test panoramas evaluated as --test does, to TensorBoard and the
log, with two diagnostics of whether the parts learn."""
import numpy as np
import tensorflow as tf

import input_data
from geoloc.eval import results, testing
from geoloc.train.step import gradient_report


def validate(run, model, embedder, writer, step):
    """Evaluate on the first --val_queries test panoramas; metrics and example figures to TensorBoard, with two
    diagnostics of whether the parts learn: a heatmap stage's ground dependence (ground/<branch>_*,
    localisers.ground_dependence) and, on a single device, each trained part's gradient RMS on the last training
    batch beside Adam's eps (grad_rms/<part>, grad_rms_over_eps/<part>; a log line names the parts below
    BARELY_TRAINS_EPS x eps)."""
    cfg = run.cfg
    if run.test_split is None:          # parsed (and with --val_refs its references chosen) once per run
        split = run.dataset('test')
        if cfg.val_refs:
            split = input_data.reference_subset(split, np.arange(min(cfg.val_queries, len(split))), cfg.val_refs,
                                                cfg.seed)
        run.test_split = split
    split = run.test_split
    queries = np.arange(min(cfg.val_queries, len(split)))
    ev = testing.evaluate_model(run.stage, cfg, model, embedder, split, queries, cache=run.images, keep_heatmaps=3,
                                ground=True)
    r, figures = ev.results, results.localisation_figures(ev, split, cfg, 3)
    loc = r['localisation']
    lines = results.format_results(r)
    against = f' (against {len(split.tile_paths)} reference tiles, --val_refs)' if cfg.val_refs else ''
    run.log(f'validation at step {step}: ' + lines[0] + f'; median {loc["all"]["median_m"]:.2f} m{against}')
    ground = r.get('ground_dependence') or {}
    if ground:
        run.log(f'validation at step {step}: ' + next(line for line in lines if line.startswith('ground dependence')))
    rms = {}
    if run.gradient_probe is not None and run.last_batch is not None:
        rms = {p: float(v) for p, v in run.gradient_probe(run.last_batch).items()}
        for line in gradient_report(rms, run.adam_eps):
            run.log(f'validation at step {step}: {line}')
    with writer.as_default(step=step):
        for k in ('R@1', 'R@5', 'R@10', 'R@1%', 'hit_rate'):
            tf.summary.scalar(f'val/{k}', r['retrieval'][k])
        for sub in ('all', 'top1_correct'):
            if loc[sub]['median_m'] is not None and np.isfinite(loc[sub]['median_m']):
                tf.summary.scalar(f'val/median_m_{sub}', loc[sub]['median_m'])
        for branch, g in ground.items():
            for key in ('swap_shift_px_median', 'swap_shift_px_mean', 'swap_shift_px_p90', 'heatmap_swap_change'):
                if np.isfinite(g[key]):
                    tf.summary.scalar(f'ground/{branch}_{key.replace("_median", "")}', g[key])
        for part, v in rms.items():
            tf.summary.scalar(f'grad_rms/{part}', v)
            tf.summary.scalar(f'grad_rms_over_eps/{part}', v / run.adam_eps)
        if figures:
            h = min(p.shape[0] for p in figures)
            w = min(p.shape[1] for p in figures)
            tf.summary.image('val/localisation', np.stack([p[:h, :w] for p in figures]), step=step, max_outputs=3)
    writer.flush()
