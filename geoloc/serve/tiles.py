"""The aerial tiles localise.py searches: listed from folders and files, named as VIGOR names them, and ranked
against a panorama in bounded memory.

Ranking streams the tiles through the input pipeline in batches (pipeline.image_dataset, the images as
decoded uint8, so a SavedModel can take them) and keeps only a running top-k of the scores: memory does not
grow with the number of tiles beyond their paths. The score is --test's: the dot product of L2-normalised
descriptors (docs/design.md §6).
"""
import os
import time

import numpy as np

import input_data
from geoloc.data import pipeline
from geoloc.errors import DataError

TILE_SUFFIXES = ('.png', '.jpg')    # what input_data.vigor_sat_latlon reads


def list_tiles(args):
    """--tiles arguments, each a folder (its .png / .jpg files, not its subfolders) or a tile file ->
    (paths [N] in the order given, folders sorted by name, each once; centres (N, 2) float64 lat, lon degrees).
    DataError (one line) for a path that does not exist, a folder without tiles, a tile whose name holds no
    coordinates (VIGOR's satellite_<lat>_<lon>.png)."""
    paths, seen = [], set()
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(e.path for e in os.scandir(arg) if e.is_file() and e.name.lower().endswith(TILE_SUFFIXES))
            if not found:
                raise DataError(f'{arg}: no aerial tiles in this folder (expected satellite_<lat>_<lon>.png files)')
        elif os.path.isfile(arg):
            found = [arg]
        else:
            raise DataError(f'{arg}: no such tile file or folder')
        for path in found:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    centres = np.zeros((len(paths), 2), np.float64)
    for i, path in enumerate(paths):
        try:
            centres[i] = input_data.vigor_sat_latlon(os.path.basename(path))
        except (ValueError, IndexError) as e:
            raise DataError(f'{path}: not a tile name with coordinates ({e}); tiles are named as VIGOR names them, '
                            'satellite_<lat>_<lon>.png') from None
    return paths, centres


def read_images(paths, hw, kind):
    """uint8 RGB [n, H, W, 3] of image files at hw through the input pipeline ('panorama': width = 2 x height;
    'aerial': square; never upscaled). A bad file stops it with an op error that pipeline.unwrap_error words."""
    return np.concatenate([img.numpy() for img, _ in pipeline.image_dataset(paths, hw, kind, len(paths),
                                                                            decoded=True)])


def rank(embed_tile, grd, paths, side, batch, top_k, progress=None, every_s=10.0):
    """The top_k tiles for a panorama, streaming the tiles in batches.

    embed_tile: uint8 [b, side, side, 3] -> L2-normalised descriptors [b, D]; grd: (D,) the panorama's
    L2-normalised descriptor. -> (indices [k] into paths, scores [k] float32), best first (ties: the lower
    index, as --test). progress(msg) every `every_s` seconds and at the end."""
    best_idx, best_score = np.zeros(0, np.int64), np.zeros(0, np.float32)
    grd = np.asarray(grd, np.float32)
    t0 = t = time.time()
    done = 0
    for images, idx in pipeline.image_dataset(paths, (side, side), 'aerial', batch, decoded=True):
        scores = embed_tile(images) @ grd                                   # (b,)
        cand_idx = np.concatenate([best_idx, idx.numpy()])
        cand_score = np.concatenate([best_score, scores.astype(np.float32)])
        keep = np.lexsort((cand_idx, -cand_score))[:top_k]                 # by score, then index
        best_idx, best_score = cand_idx[keep], cand_score[keep]
        done += len(scores)
        if progress and time.time() - t > every_s:
            progress(f'{done}/{len(paths)} tiles ranked')
            t = time.time()
    if progress:
        progress(f'{len(paths)} tiles ranked in {time.time() - t0:.1f} s')
    return best_idx, best_score
