"""The built-in synthetic datasets as a reader sees them: where they live, how a complete one is marked, and
what a reader needs to know of their format. tools/synthetic_data.py writes them and run_all.py runs it
first (`ensure_builtin`); loading a split never writes anything."""
import json
import os

from geoloc.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = {name: os.path.join(ROOT, 'data', f'synthetic_{name}') for name in ('vigor', 'cvact')}
MARKER = '.synthetic_complete'   # written last, holding the generator's arguments (and VIGOR's layout version)
# The VIGOR generator's output version, recorded in the marker: 2 = with the ring of reference-only tiles.
VIGOR_LAYOUT = 2
# Metres per pixel of a synthetic 1200x1200 CVACT aerial: Google zoom 20 at Canberra is ~0.122 m/px,
# so a 600x600 crop of the CVACT resampler covers ~72 m, about one VIGOR 640-px tile (~73 m).
CVACT_MPP_1200 = 0.12
RESAMPLED = 'resampled'          # the built-in CVACT's positive / semi-positive crops (samples_on_cvact.py)


def marker(root):
    """The arguments a complete synthetic dataset at root was written with (its marker), else None."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            params = json.load(f)
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) else None


def synthetic_kind(root):
    """'vigor' or 'cvact' when root is a complete synthetic dataset (its marker file), else None."""
    params = marker(root) or {}
    return 'cvact' if 'n_panos' in params else 'vigor' if 'grid' in params else None


def command(dataset):
    """The shell command that writes the built-in `dataset` ('vigor' or 'cvact')."""
    return f'python tools/synthetic_data.py {dataset} --root data/synthetic_{dataset}'


def check(dataset):
    """The built-in dataset's root, complete and of this version; DataError in one line naming the command that
    writes it when it is missing or was written by an older generator."""
    root = FOLDERS[dataset]
    params = marker(root)
    if params is None:
        raise DataError(f'{root}: the built-in synthetic {dataset.upper() if dataset == "cvact" else "VIGOR"} is not '
                        f'there; write it with `{command(dataset)}` (run_all.py does), or give --data_root')
    if dataset == 'vigor' and params.get('layout') != VIGOR_LAYOUT:
        raise DataError(f'{root}: written by an older generator (layout {params.get("layout")}, this version reads '
                        f'{VIGOR_LAYOUT}); delete it and run `{command(dataset)}`')
    if dataset == 'cvact' and not os.path.exists(os.path.join(root, RESAMPLED, 'splits', 'test.txt')):
        raise DataError(f'{os.path.join(root, RESAMPLED)}: the built-in CVACT has no resampled crops; run '
                        f'`{command(dataset)}` (it resamples too)')
    return root
