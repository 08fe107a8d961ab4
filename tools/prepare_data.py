"""Write a copy of a VIGOR or CVACT tree resized to the training size, once; the stage scripts read it as they
read the original (same layout, same file names), several times faster (docs/pipeline.md).

    python tools/prepare_data.py --data_root /data/VIGOR --out /data/VIGOR_320 --grd_size 320 640 --sat_size 320
    python train_first_E_1.py --data_root /data/VIGOR_320
    python tools/prepare_data.py --dataset cvact --data_root /data/CVACT --out /data/CVACT_320 \
        --grd_size 320 640 --sat_size 320

Every image is read as docs/design.md §2 reads it (OpenCV full decode, BGR, INTER_AREA; images.load_image with
exact=True) and checked as training checks it; a JPEG whose compressed data libjpeg reports corrupt is
refused too (OpenCV and TensorFlow decode such a file with garbled rows and only print a warning; this
command runs the decoders in worker processes whose stderr it reads). A JPEG has no checksum, so damage
that still decodes as valid data is invisible to any reader. Panoramas (and CVACT's JPEG crops) are
written as JPEG of quality --jpeg_quality (95) without chroma subsampling (4:4:4), PNG aerial tiles as
PNG (lossless; zlib level --png_compression, 0 = stored: larger files, the fastest to decode). Label and split files are
copied as they are.

The last file written is prepared.json, the sizes: a run that reads the copy at other sizes is refused in
one line (input_data.check_prepared). An interrupted preparation resumes where it stopped (each image is
written under a temporary name and renamed). Bad images are listed one line each (`error: <file>: <what>`),
exit status 2, and no prepared.json.

VIGOR: <City>/panorama/*.jpg and <City>/satellite/*.png of every city folder, splits/ and splits__corrected/.
CVACT: ACT_data.mat, streetview/*.jpg, and the resampled crops of samples_on_cvact.py (--cvact_resampled,
default <data_root>/resampled) into <out>/resampled; satview_polish/ (the resampler's input) is not copied.
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ''):   # run as a file: the repository root on the import path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2

from geoloc.data import images
import input_data

IN_PROGRESS = '.prepare_in_progress.json'


def tasks(dataset, root, out, grd_hw, sat_side, resampled=''):
    """(source, destination, hw, kind) of every image, and (source, destination) of every file copied as is."""
    todo, copies = [], []
    sat_hw = (sat_side, sat_side)
    if dataset == 'vigor':
        for city in sorted(os.listdir(root)):
            for sub, pattern, hw, kind in (('panorama', '*.jpg', grd_hw, 'panorama'),
                                           ('satellite', '*.png', sat_hw, 'aerial')):
                for src in sorted(glob.glob(os.path.join(root, city, sub, pattern))):
                    todo.append((src, os.path.join(out, city, sub, os.path.basename(src)), hw, kind))
        for folder in ('splits', 'splits__corrected'):
            for src in sorted(glob.glob(os.path.join(root, folder, '**', '*.txt'), recursive=True)):
                copies.append((src, os.path.join(out, os.path.relpath(src, root))))
    else:
        resampled = resampled or os.path.join(root, 'resampled')
        copies.append((os.path.join(root, 'ACT_data.mat'), os.path.join(out, 'ACT_data.mat')))
        for src in sorted(glob.glob(os.path.join(root, 'streetview', '*.jpg'))):
            todo.append((src, os.path.join(out, 'streetview', os.path.basename(src)), grd_hw, 'panorama'))
        for src in sorted(glob.glob(os.path.join(resampled, 'satellite', '*.jpg'))):
            todo.append((src, os.path.join(out, 'resampled', 'satellite', os.path.basename(src)), sat_hw, 'aerial'))
        texts = [os.path.join(resampled, 'centers.txt')] + sorted(glob.glob(os.path.join(resampled, 'splits', '*.txt')))
        for src in texts:
            copies.append((src, os.path.join(out, 'resampled', os.path.relpath(src, resampled))))
    return todo, copies


# ----------------------------------------------------------------------------- one image, in a worker process

_STDERR = {}


def _watch_stderr():
    """A worker's fd 2 goes to a file of its own, so what libjpeg prints while it decodes an image is that
    image's (the worker decodes one image at a time)."""
    log = tempfile.TemporaryFile()
    os.dup2(log.fileno(), 2)
    _STDERR['log'] = log


def _new_stderr():
    log = _STDERR.get('log')
    if log is None:
        return ''
    log.seek(0)
    text = log.read().decode(errors='replace')
    log.seek(0)
    log.truncate()
    return text


def prepare_one(task, jpeg_quality, png_compression):
    """Read one image (docs/design.md §2, every check), write it resized; -> None, or the one-line error."""
    src, dst, hw, kind = task
    if os.path.exists(dst):
        return None
    _new_stderr()
    try:
        img = images.load_image(src, hw, kind, exact=True)
    except input_data.DataError as e:
        return str(e)
    warning = [line for line in _new_stderr().splitlines() if 'Corrupt JPEG' in line or 'Premature end' in line]
    if warning:
        return f'{src}: corrupt JPEG data (libjpeg: {warning[0].strip()})'
    root, ext = os.path.splitext(dst)
    tmp = f'{root}.part{ext}'
    params = [cv2.IMWRITE_PNG_COMPRESSION, png_compression] if ext.lower() == '.png' else \
        [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if not cv2.imwrite(tmp, img, params):
        return f'{dst}: cannot write'
    os.replace(tmp, dst)
    return None


def _work(args):
    return args[0], prepare_one(*args[1:])


# ----------------------------------------------------------------------------- the command

def prepare(dataset, root, out, grd_hw, sat_side, resampled='', jpeg_quality=95, png_compression=0, workers=0,
            log=print):
    """Write the copy; -> the list of one-line errors (empty: done, prepared.json written)."""
    grd_hw, sat_side = tuple(int(s) for s in grd_hw), int(sat_side)
    if not os.path.isdir(root):
        raise input_data.DataError(f'{root}: dataset root not found')
    if os.path.realpath(out) == os.path.realpath(root):
        raise input_data.DataError(f'{out}: the copy must go elsewhere than the original')
    sizes = {'grd_size': list(grd_hw), 'sat_size': sat_side}
    meta = dict(sizes, dataset=dataset, source=os.path.abspath(root), jpeg_quality=jpeg_quality,
                png_compression=png_compression, reader='OpenCV full decode + INTER_AREA (SPEC 2)')
    for name in (input_data.PREPARED, IN_PROGRESS):   # a copy, or an interrupted one, of other sizes
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path) as f:
                there = json.load(f)
            if {k: there.get(k) for k in sizes} != sizes or there.get('jpeg_quality') != jpeg_quality:
                raise input_data.DataError(f'{path}: {out} holds a copy of other settings '
                                           f'({there.get("grd_size")}, {there.get("sat_size")}, quality '
                                           f'{there.get("jpeg_quality")}); choose another --out')
    todo, copies = tasks(dataset, root, out, grd_hw, sat_side, resampled)
    if not todo:
        raise input_data.DataError(f'{root}: no images found (expected the {dataset} layout, see prepare_data.py)')
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, IN_PROGRESS), meta)
    for d in sorted({os.path.dirname(t[1]) for t in todo} | {os.path.dirname(c[1]) for c in copies}):
        os.makedirs(d, exist_ok=True)
    for src, dst in copies:
        if not os.path.isfile(src):
            raise input_data.DataError(f'{src}: not found')
        shutil.copyfile(src, dst)
    workers = workers or len(os.sched_getaffinity(0))
    errors, t0, t_log = [], time.time(), time.time()
    with multiprocessing.get_context('spawn').Pool(workers, initializer=_watch_stderr) as pool:
        jobs = ((i, t, jpeg_quality, png_compression) for i, t in enumerate(todo))
        for n, (i, err) in enumerate(pool.imap_unordered(_work, jobs, chunksize=8), 1):
            if err:
                errors.append((i, err))
            if time.time() - t_log > 30:
                log(f'{n}/{len(todo)} images ({n / (time.time() - t0):.0f}/s), {len(errors)} bad')
                t_log = time.time()
    errors = [e for _, e in sorted(errors)]
    if not errors:
        meta['images'] = len(todo)
        _write_json(os.path.join(out, input_data.PREPARED), meta)
        os.remove(os.path.join(out, IN_PROGRESS))
        if dataset == 'cvact':
            _write_json(os.path.join(out, 'resampled', input_data.PREPARED), meta)
        log(f'{out}: {len(todo)} images at grd {grd_hw[0]}x{grd_hw[1]}, sat {sat_side} in {time.time() - t0:.0f} s '
            f'with {workers} workers')
    return errors


def _write_json(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='vigor', choices=('vigor', 'cvact'))
    p.add_argument('--data_root', required=True, help='the original tree')
    p.add_argument('--cvact_resampled', default='', help='CVACT: the resampled crops (default <data_root>/resampled)')
    p.add_argument('--out', required=True, help='where the copy goes (same layout and names)')
    p.add_argument('--grd_size', type=int, nargs=2, default=(320, 640), help='panorama H W, as the run will read it')
    p.add_argument('--sat_size', type=int, default=320, help='aerial side, as the run will read it')
    p.add_argument('--jpeg_quality', type=int, default=95, help='JPEG quality of the panoramas (and CVACT crops)')
    p.add_argument('--png_compression', type=int, default=0,
                   help='zlib level of the PNG tiles (lossless; 0, stored, decodes fastest: benchmarks/README.md)')
    p.add_argument('--workers', type=int, default=0, help='processes (default: every core)')
    args = p.parse_args(argv)
    try:
        errors = prepare(args.dataset, args.data_root, args.out, args.grd_size, args.sat_size, args.cvact_resampled,
                         args.jpeg_quality, args.png_compression, args.workers)
    except input_data.DataError as e:
        errors = [str(e)]
    for e in errors:
        print(f'error: {e}', file=sys.stderr)
    return 2 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
