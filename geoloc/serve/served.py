"""A trained stage as a served model: decoded images in, descriptors and a position in the tile out.

`Server` is a tf.Module over a stage's CrossViewModel whose functions take uint8 RGB images, 0-255, of
any size (resized to the run's sizes inside, as the input pipeline does: an area resize rounded to
uint8), and do the preprocessing themselves (BGR minus the VGG mean, pipeline.network_input). export.py
saves it as a SavedModel (`export`); localise.py runs it from a run's checkpoint (`from_run`) or from such
a SavedModel (`from_saved_model`): both paths call the same functions, so they give the same answers.

Signatures (docs/serving.md has the table):
  serving_default(panorama [B, h, 2h, 3] uint8, tile [B, s, s, 3] uint8) -> grd_descriptor, sat_descriptor
      [B, D] (L2-normalised), score [B] (their dot product), delta [B, 2] (dy, dx) and mu [B, 2] (row, col),
      pixels of the 640-px tile frame; chol [B, 3] (stages with a covariance head; times the run's calibrated
      scale, metadata's sigma_scale, when it has a calibration.json), heatmap [B, h', w']
      (heatmap stages)
  embed_panorama(panorama) -> descriptor [B, D];  embed_tile(tile) -> descriptor [B, D]
  metadata() -> json: the stage, the sizes, the m/px convention (INFO_KEYS)
"""
import json
import os
import shutil

import tensorflow as tf

import model as model_lib
from geoloc.data import geometry, pipeline
from geoloc.errors import StateError

FORMAT = 'geoloc-served-1'       # metadata's 'format': a SavedModel this module wrote
INFO_KEYS = ('format', 'stage', 'localise', 'covariance', 'grd_size', 'sat_size', 'descriptor_dim', 'tile_px',
             'mpp_640', 'input', 'checkpoint')
_IMAGES = [None, None, None, 3]


def info_of(stage, cfg, model, checkpoint):
    """The metadata a served model carries (every key of INFO_KEYS)."""
    return {'format': FORMAT, 'stage': stage.name, 'localise': stage.localise or 'tile centre',
            'covariance': 'pos_cholesky' in model.parts, 'grd_size': list(model.grd_hw), 'sat_size': model.sat_side,
            'descriptor_dim': int(model.dim), 'tile_px': geometry.TILE_PX, 'mpp_640': geometry.ORIGINAL_MPP,
            'input': 'uint8 RGB, HWC, 0-255, any size (area-resized inside to grd_size / sat_size)',
            'checkpoint': os.path.basename(checkpoint), 'localiser': cfg.localiser}


class Server(tf.Module):
    """The served functions of one restored model (see the module docstring)."""

    def __init__(self, model, localise, info, sigma_scale=1.0):
        super().__init__(name='geoloc_server')
        self.model = model
        self._localise_kind = localise        # 'heatmap', 'offset' or '' (tile centre)
        self._sigma_scale = float(sigma_scale)   # the run's calibration (calibration.json), baked into chol
        self._info = json.dumps(info, sort_keys=True)

    def _input(self, images, hw):
        """uint8 [B, h, w, 3] RGB -> the network's float32 [B, H, W, 3] BGR minus the VGG mean at hw."""
        images = tf.convert_to_tensor(images, tf.uint8)
        same = tf.reduce_all(tf.equal(tf.shape(images)[1:3], hw))
        images = tf.cond(same, lambda: images,
                         lambda: tf.cast(tf.round(tf.image.resize(images, hw, method='area')), tf.uint8))
        return pipeline.network_input(tf.ensure_shape(images, [None, hw[0], hw[1], 3]))

    def _grd_raw(self, panorama):
        return self.model.embed_grd(self._input(panorama, self.model.grd_hw))

    def _sat_raw(self, tile):
        return self.model.embed_sat(self._input(tile, (self.model.sat_side,) * 2))

    @tf.function(input_signature=[tf.TensorSpec(_IMAGES, tf.uint8, name='panorama')], autograph=False)
    def embed_panorama(self, panorama):
        return {'descriptor': model_lib.l2_normalize(self._grd_raw(panorama))}

    @tf.function(input_signature=[tf.TensorSpec(_IMAGES, tf.uint8, name='tile')], autograph=False)
    def embed_tile(self, tile):
        return {'descriptor': model_lib.l2_normalize(self._sat_raw(tile)[0])}

    @tf.function(input_signature=[tf.TensorSpec(_IMAGES, tf.uint8, name='panorama'),
                                  tf.TensorSpec(_IMAGES, tf.uint8, name='tile')], autograph=False)
    def localise(self, panorama, tile):
        grd = self._grd_raw(panorama)
        sat, skips = self._sat_raw(tile)
        out = {'grd_descriptor': model_lib.l2_normalize(grd), 'sat_descriptor': model_lib.l2_normalize(sat)}
        out['score'] = tf.reduce_sum(out['grd_descriptor'] * out['sat_descriptor'], -1)
        if self._localise_kind == 'heatmap':
            head = self.model.localise('pos', sat, grd, skips)
            out.update(mu=head['mu'], delta=geometry.rc_to_delta(head['mu']), heatmap=head['heatmap'])
            if 'chol' in head:
                out['chol'] = head['chol'] * self._sigma_scale
        else:
            delta = self.model.offset(sat, grd) if self._localise_kind == 'offset' else tf.zeros_like(grd[:, :2])
            out.update(delta=delta, mu=geometry.delta_to_rc(delta))
        return out

    @tf.function(input_signature=[], autograph=False)
    def metadata(self):
        return {'json': tf.constant(self._info)}

    def signatures(self):
        return {'serving_default': self.localise, 'embed_panorama': self.embed_panorama,
                'embed_tile': self.embed_tile, 'metadata': self.metadata}


class Served:
    """What localise.py runs: the info dict and numpy in / numpy out calls of a Server, or of the signatures of
    a SavedModel that export.py wrote."""

    def __init__(self, info, embed_panorama, embed_tile, localise, keep=None):
        self.info = info
        self._calls = {'embed_panorama': embed_panorama, 'embed_tile': embed_tile, 'localise': localise}
        self._keep = keep      # the object the calls belong to (a loaded SavedModel must outlive them)

    def embed_panorama(self, panorama):
        """uint8 [B, h, w, 3] RGB -> L2-normalised descriptors [B, D] float32."""
        return self._calls['embed_panorama'](panorama=tf.constant(panorama))['descriptor'].numpy()

    def embed_tile(self, tile):
        return self._calls['embed_tile'](tile=tf.constant(tile))['descriptor'].numpy()

    def localise(self, panorama, tile):
        """uint8 panoramas and tiles [B, ...] -> {name: numpy array} (serving_default's outputs)."""
        out = self._calls['localise'](panorama=tf.constant(panorama), tile=tf.constant(tile))
        return {k: v.numpy() for k, v in out.items()}


def restore(run_dir):
    """A run directory's latest checkpoint as a Server -> (Server, info). StateError (one line) when it holds no
    run configuration, no checkpoint, or a stage this version does not know."""
    import config
    import stages
    from geoloc.eval import testing
    from geoloc.train import train_state
    if not os.path.isdir(run_dir):
        raise StateError(f'--run_dir {run_dir}: no such directory')
    saved = config.load(os.path.join(run_dir, 'config.json'))
    if saved is None:
        raise StateError(f'{run_dir}: not a run directory (no config.json); name the directory a stage script '
                         'trained (e.g. runs/E_2_2)')
    name = saved.get('stage') or ''
    if name not in stages.SCRIPTS:
        raise StateError(f'{run_dir}: a run of stage {name!r}, which is none of {", ".join(stages.ORDER)}')
    stage = stages.get(name)
    ckpt = train_state.latest_checkpoint(run_dir)
    if not ckpt:
        raise StateError(f'{run_dir}: no checkpoint (nothing trained yet); train it with {stage.command} first')
    cfg = config.model_settings(saved, config.Config(stage=name))
    scale = testing.calibration_scale(run_dir, ckpt)[0]
    model = testing.restored_model(stage, cfg, ckpt, run_dir)
    info = dict(info_of(stage, cfg, model, ckpt), sigma_scale=scale)
    return Server(model, stage.localise, info, scale), info


def from_run(run_dir):
    """A Served over a run directory's latest checkpoint."""
    server, info = restore(run_dir)
    return Served(info, server.embed_panorama, server.embed_tile, server.localise, keep=server)


def export(run_dir, out_dir):
    """Write the run's latest checkpoint as a SavedModel in out_dir (a new or empty directory) -> info.
    Written in a temporary sibling and moved into place when complete."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise StateError(f'--out {out_dir}: exists and is not an empty directory; name a new one')
    server, info = restore(run_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_dir))}.tmp-{os.getpid()}')
    try:
        tf.saved_model.save(server, tmp, signatures=server.signatures())
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def from_saved_model(path):
    """A Served over a SavedModel that export.py wrote; StateError (one line) for anything else."""
    if not os.path.isdir(path) or not (os.path.isfile(os.path.join(path, 'saved_model.pb'))
                                      or os.path.isfile(os.path.join(path, 'saved_model.pbtxt'))):
        raise StateError(f'--saved_model {path}: not a SavedModel directory (no saved_model.pb)')
    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise StateError(f'--saved_model {path}: unreadable SavedModel ({type(e).__name__}: '
                         f'{str(e).strip().splitlines()[0][:160] if str(e).strip() else ""})') from None
    sigs = loaded.signatures
    missing = [k for k in ('serving_default', 'embed_panorama', 'embed_tile', 'metadata') if k not in sigs]
    info = None
    if not missing:
        try:
            info = json.loads(sigs['metadata']()['json'].numpy().decode())
        except (ValueError, KeyError, TypeError, AttributeError, tf.errors.OpError):
            info = None
    if not isinstance(info, dict) or info.get('format') != FORMAT or set(INFO_KEYS) - set(info):
        what = f'it lacks the signature(s) {", ".join(missing)}' if missing else 'its metadata is not ours'
        raise StateError(f'--saved_model {path}: not a SavedModel written by export.py ({what})')
    return Served(info, sigs['embed_panorama'], sigs['embed_tile'], sigs['serving_default'], keep=loaded)


def check_stage(info, expected):
    """StateError unless the served model is of stage `expected` ('' = any)."""
    if expected and info['stage'] != expected:
        raise StateError(f'the model is of stage {info["stage"]}, not --stage {expected}'
                         + (' (it has no covariance head)' if not info['covariance'] else ''))

