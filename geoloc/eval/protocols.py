"""The evaluation protocols of --test: which orientation and field of view the test panoramas are shown
with, and the directory each setting's results go to. TensorFlow-free; pipeline.apply_views applies a
protocol's views to the decoded images.

Orientation (`--yaw`):
  north    the panoramas as they are, north-aligned (VIGOR's and the paper's protocol; the default).
  random   unknown orientation (CCVPE and its successors): every test panorama rotated by its own yaw,
           drawn uniformly in [0, 360) degrees from --eval_seed and the panorama's file name, so a
           panorama gets the same yaw on every machine, in every split, label set and query count.
  <deg>    every panorama rotated by the same yaw (360 = the unrotated images: a check).
A yaw of θ degrees turns the camera θ clockwise: the rotated panorama's centre column looks θ
clockwise from north. On a north-aligned equirectangular panorama of width W that is a circular shift
of its columns: rotated[:, c] = original[:, (c + W θ / 360) mod W], applied to the decoded image at the
network's input width, so θ is rounded to a whole column (a multiple of 360 / W degrees; the applied
yaw is what yaws.csv and the per-query file report).

Field of view (`--fov DEG`, default 360): the camera sees DEG degrees around a heading drawn like the
yaws (uniform in [0, 360) from --eval_seed and the file name, another stream); the columns outside
that window are set to zero after the VGG mean is subtracted (the mean colour). The window is cut from
the north-aligned panorama, then the yaw (if any) rotates the whole image.
"""
import dataclasses
import hashlib
import math
import os

import numpy as np

NORTH = 'north'
RANDOM = 'random'


def parse_yaw(text):
    """'north', 'random' or a finite number of degrees -> the same, numbers as float; ValueError (one line)
    for anything else."""
    if text in (NORTH, RANDOM):
        return text
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--yaw {text}: must be 'north', 'random' or a number of degrees") from None
    if not math.isfinite(value):
        raise ValueError(f"--yaw {text}: must be 'north', 'random' or a number of degrees")
    return value


def seeded_degrees(names, seed, stream):
    """(n,) float64 degrees in [0, 360), one per name, from SHA-256 of (seed, stream, name): the same on
    every machine and whatever other names are drawn with it."""
    out = np.empty(len(names), np.float64)
    for i, name in enumerate(names):
        digest = hashlib.sha256(f'{int(seed)}/{stream}/{name}'.encode()).digest()
        out[i] = int.from_bytes(digest[:8], 'big') / 2.0 ** 64 * 360.0
    return out


@dataclasses.dataclass(frozen=True)
class Protocol:
    yaw: object = NORTH      # 'north', 'random' or degrees (float)
    fov: float = 360.0       # degrees seen around the heading
    seed: int = 0            # of the random yaws and headings

    @classmethod
    def from_config(cls, cfg):
        return cls(parse_yaw(cfg.yaw), float(cfg.fov), int(cfg.eval_seed))

    @property
    def identity(self):
        """True when the panoramas are shown as they are (no view to apply)."""
        return self.yaw == NORTH and self.fov >= 360

    @property
    def name(self):
        """Short name for directory names: north, yaw180, yawrandom-s0, north_fov90-s0, ..."""
        if self.yaw == NORTH:
            out = 'north'
        elif self.yaw == RANDOM:
            out = f'yawrandom-s{self.seed}'
        else:
            out = f'yaw{self.yaw:g}'
        if self.fov < 360:
            out += f'_fov{self.fov:g}-s{self.seed}'
        return out

    def describe(self):
        """One line for the report."""
        if self.yaw == NORTH:
            text = 'north-aligned panoramas (known orientation)'
        elif self.yaw == RANDOM:
            text = (f'unknown orientation: each panorama rotated by a yaw drawn uniformly in [0, 360) deg '
                    f'(seed {self.seed}; yaws.csv)')
        else:
            text = f'every panorama rotated by a yaw of {self.yaw:g} deg'
        fov = '360 deg field of view' if self.fov >= 360 else \
            f'{self.fov:g} deg field of view around a seeded heading (seed {self.seed}), the rest masked'
        return f'{text}; {fov}'

    def yaws(self, names):
        """(n,) yaw in degrees of each panorama (file names), before rounding to a column; None if north."""
        if self.yaw == NORTH:
            return None
        if self.yaw == RANDOM:
            return seeded_degrees(names, self.seed, 'yaw')
        return np.full(len(names), float(self.yaw))

    def headings(self, names):
        """(n,) heading of the field of view, degrees clockwise from north; None at 360 degrees."""
        return None if self.fov >= 360 else seeded_degrees(names, self.seed, 'fov heading')

    def views(self, names, width):
        """int64 [n, 3] (shift, start, visible) per panorama at input width `width`, or None (identity):
        rotated[:, c] = original[:, (c + shift) mod W], and original columns (start + j) mod W for
        j < visible stay, the others are zeroed (see pipeline.apply_views)."""
        if self.identity:
            return None
        n = len(names)
        out = np.zeros((n, 3), np.int64)
        yaws = self.yaws(names)
        if yaws is not None:
            out[:, 0] = np.mod(np.rint(yaws * width / 360.0).astype(np.int64), width)
        heading = self.headings(names)
        if heading is None:
            out[:, 2] = width
        else:
            # column c of a north-aligned panorama looks at azimuth 360 (c + 0.5) / W - 180 degrees
            first = (heading - self.fov / 2 + 180.0) * width / 360.0 - 0.5
            out[:, 1] = np.mod(np.floor(first + 0.5).astype(np.int64), width)
            out[:, 2] = max(1, min(width, int(round(self.fov * width / 360.0))))
        return out

    def applied_yaws(self, views, width):
        """(n,) the yaw each view applies, degrees in [0, 360) (a whole number of columns)."""
        return views[:, 0] * 360.0 / width


def settings_name(cfg):
    """The directory name of a --test setting: <labels>_<area>_<protocol>_q<N|all> (VIGOR) or
    cvact_<protocol>_q<N|all>; N is --max_queries."""
    data = 'cvact' if cfg.dataset == 'cvact' else f'{cfg.labels}_{cfg.area}'
    queries = f'q{cfg.max_queries}' if cfg.max_queries else 'qall'
    return f'{data}_{Protocol.from_config(cfg).name}_{queries}'


def results_dir(cfg, run_dir):
    """Where --test writes: <--test_dir or <run_dir>/test>/<settings_name> (<run_dir>/calibration/... for
    --calibrate 1, whose split is held-out panoramas, not the test split)."""
    return os.path.join(cfg.test_dir or os.path.join(run_dir, 'calibration' if cfg.calibrate else 'test'),
                        settings_name(cfg))
