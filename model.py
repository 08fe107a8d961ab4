"""The siamese cross-view model of all four stages, as plain tf.Modules.

Two unshared VGG16 trunks (ground, aerial) + SAFA give the 4096-d retrieval descriptors; the VIGOR
offset head (E_1), the SAMP fusion + U-Net heatmap decoder + soft-argmax (E_2_1), and the Cholesky
covariance heads (E_2_2, E_3) sit on top. Every size follows the constructor's input sizes and width,
so a test can build a 32x64 model in one line. Nothing here reads flags.

Units: points and offsets are pixels of the 640-px aerial tile whatever the input size.
`delta` = (dy, dx) in VIGOR's convention (point at row 320 + dy, col 320 - dx);
`mu` = (row, col) of that frame (geometry.delta_to_rc and rc_to_delta convert).
"""
import numpy as np
import tensorflow as tf

from geoloc.data.geometry import TILE_PX
from geoloc.nn.correlation import CorrelationLocaliser, softmax_map
from geoloc.nn.moments import MomentsCholesky
from geoloc.nn.layers import Conv, Deconv, Dense, Init, channels, conv_taps, deconv_taps, unit_rms, variable

# (name, channels) of the VGG16 conv layers; 'pool' = 2x2 max-pool (4 of them: no pool5).
VGG16_LAYERS = (
    ('conv1_1', 64), ('conv1_2', 64), 'pool',
    ('conv2_1', 128), ('conv2_2', 128), 'pool',
    ('conv3_1', 256), ('conv3_2', 256), ('conv3_3', 256), 'pool',
    ('conv4_1', 512), ('conv4_2', 512), ('conv4_3', 512), 'pool',
    ('conv5_1', 512), ('conv5_2', 512), ('conv5_3', 512),
)
SKIP_LAYERS = ('conv1_2', 'conv2_2', 'conv3_3', 'conv4_3', 'conv5_3')

# Parts a stage may build and restore by name (attribute names of CrossViewModel).
RETRIEVAL_PARTS = ('grd_trunk', 'sat_trunk', 'grd_safa', 'sat_safa')
HEATMAP_PARTS = ('pos_fusion', 'pos_decoder', 'semi_fusion', 'semi_decoder')
CHOLESKY_PARTS = ('pos_cholesky', 'semi_cholesky')
ALL_PARTS = RETRIEVAL_PARTS + ('offset_head',) + HEATMAP_PARTS + CHOLESKY_PARTS
# What a heatmap branch's decoder is: the released U-Net, or the correlation localiser (not the paper's).
LOCALISERS = ('unet', 'correlation')


def read_vgg16_npy(path):
    """The classic TF-VGG `vgg16.npy` -> {layer: (W, b)}; ValueError (one line) if it is not one."""
    try:
        weights = np.load(path, allow_pickle=True, encoding='latin1').item()
    except Exception as e:  # noqa: BLE001 (np.load raises many types on a damaged pickle)
        raise ValueError(f'{path}: unreadable ImageNet VGG16 weights ({type(e).__name__}); expected the classic '
                         'TF-VGG vgg16.npy (see data/DATASET.md)') from None
    if not isinstance(weights, dict):
        raise ValueError(f'{path}: expected a dict layer -> [W, b] (the classic TF-VGG vgg16.npy)')
    return weights


def vgg16_width(weights):
    """-> (the --width whose VGG16 trunk every conv of `weights` (read_vgg16_npy) fits, ''), the width read from
    conv1_1's output channels (64 x width); or (None, the first layer that fits no width: missing, or of
    another shape than that width's)."""
    shape = lambda a: tuple(int(d) for d in np.shape(a))
    try:
        first = shape(weights['conv1_1'][0])
    except (KeyError, IndexError, TypeError):
        return None, 'layer conv1_1 missing'
    if len(first) != 4 or first[:3] != (3, 3, 3):
        return None, f'layer conv1_1 has shape {first}; a VGG16 of any width needs (3, 3, 3, 64 x width)'
    width = first[3] / 64
    for name, cin, cout in vgg16_convs(width):
        try:
            kernel, bias = shape(weights[name][0]), shape(weights[name][1])
        except (KeyError, IndexError, TypeError):
            return None, f'layer {name} missing'
        if kernel != (3, 3, cin, cout) or bias != (cout,):
            return None, (f'layer {name} has shapes {kernel} and {bias}; with conv1_1 of width {width:g} it needs '
                          f'{(3, 3, cin, cout)} and {(cout,)}')
    return width, ''


def vgg16_convs(width):
    """[(layer name, input channels, output channels)] of VGG16's convolutions at a channel width."""
    out, cin = [], 3
    for layer in VGG16_LAYERS:
        if layer != 'pool':
            out.append((layer[0], cin, channels(layer[1], width)))
            cin = out[-1][2]
    return out


class VGG16(tf.Module):
    """conv1_1 ... conv5_3 with 4 max-pools, then one extra 2x2 max-pool (input / 32)."""

    def __init__(self, init, width=1.0, name=None):
        super().__init__(name=name)
        self.convs = [Conv(init, cin, cout, he=True, name=name) for name, cin, cout in vgg16_convs(width)]
        self.out_channels = self.convs[-1].w.shape[-1]

    def __call__(self, x):
        """x: [B, H, W, 3] BGR minus mean -> ([B, H/32, W/32, C], {skip name: feature})."""
        skips, convs = {}, iter(self.convs)
        for layer in VGG16_LAYERS:
            if layer == 'pool':
                x = tf.nn.max_pool2d(x, 2, 2, 'VALID')
                continue
            x = next(convs)(x)
            if layer[0] in SKIP_LAYERS:
                skips[layer[0]] = x
        return tf.nn.max_pool2d(x, 2, 2, 'VALID'), skips

    def vgg16_mismatch(self, weights):
        """'' if `weights` (read_vgg16_npy) fit every conv of this trunk, else what does not."""
        for conv in self.convs:
            if conv.name not in weights:
                return f'layer {conv.name} missing'
            w, b = weights[conv.name][0], weights[conv.name][1]
            if tuple(w.shape) != tuple(conv.w.shape) or tuple(b.shape) != tuple(conv.b.shape):
                return f'layer {conv.name} has shape {tuple(w.shape)}, this network needs {tuple(conv.w.shape)}'
        return ''

    def load_weights(self, weights):
        problem = self.vgg16_mismatch(weights)
        if problem:
            raise ValueError(problem)
        for conv in self.convs:
            conv.w.assign(weights[conv.name][0])
            conv.b.assign(weights[conv.name][1])


class SAFA(tf.Module):
    """Spatial-aware feature aggregation (VIGOR variant): `heads` position-weighting maps."""

    def __init__(self, init, hw, heads=8, name=None):
        super().__init__(name=name)
        half = max(1, hw // 2)
        self.w1 = variable(init.truncated_normal((heads, hw, half), 0.005), 'w1')
        self.b1 = variable(np.full((heads, half), 0.1, np.float32), 'b1')
        self.w2 = variable(init.truncated_normal((heads, half, hw), 0.005), 'w2')
        self.b2 = variable(np.full((heads, hw), 0.1, np.float32), 'b2')

    def __call__(self, x):
        """x: [B, h, w, C] -> un-normalised descriptor [B, heads * C]."""
        b, c = tf.shape(x)[0], x.shape[-1]
        flat = tf.reshape(x, [b, -1, c])                                     # (B, P, C)
        m = tf.reduce_max(flat, axis=-1)                                     # (B, P)
        h = tf.einsum('bp,kpq->bkq', m, tf.cast(self.w1, x.dtype)) + tf.cast(self.b1, x.dtype)
        weights = tf.einsum('bkq,kqp->bkp', h, tf.cast(self.w2, x.dtype)) + tf.cast(self.b2, x.dtype)
        desc = tf.einsum('bpc,bkp->bkc', flat, weights)                      # (B, K, C)
        return tf.reshape(desc, [b, -1])


class OffsetHead(tf.Module):
    """VIGOR offset regression: concat(aerial, ground) -> 512 ReLU -> 2 (delta / 320); both layers VIGOR's
    fc_layer initialisation. zero_init: the output layer starts at zero (the tile centre), an option."""

    def __init__(self, init, dim, width=1.0, zero_init=False, name=None):
        super().__init__(name=name)
        self.fc1 = Dense(init, 2 * dim, channels(512, width), name='fc1')
        self.fc2 = Dense(init, channels(512, width), 2, kind='zero' if zero_init else 'fc', name='fc2')

    def __call__(self, sat, grd):
        return self.fc2(tf.nn.relu(self.fc1(tf.concat([sat, grd], -1))))


class Fusion(tf.Module):
    """SAMP fusion: concat(aerial, ground) -> 4096 ReLU -> 2048 linear bottleneck (fc_layer initialisation)."""

    def __init__(self, init, dim, width=1.0, name=None):
        super().__init__(name=name)
        self.fc1 = Dense(init, 2 * dim, channels(4096, width), name='fc1')
        self.fc2 = Dense(init, channels(4096, width), channels(2048, width), name='fc2')
        self.out_dim = channels(2048, width)

    def __call__(self, sat, grd):
        return self.fc2(tf.nn.relu(self.fc1(tf.concat([sat, grd], -1))))


class HeatmapDecoder(tf.Module):
    """U-Net decoder from the 2048-d bottleneck to a heatmap of twice the aerial input side.

    1x1 -> deconv0 (3x3 kernel, stride side/64, SAME: only the top-left 3x3 of its output sees the input,
    as in the original) -> conv -> 2x -> conv, conv -> five 2x stages with skips from the aerial trunk
    (conv5_3 ... conv1_2) -> 2x without skip -> conv 4 -> conv 1 (logits). Glorot-normal kernels and biases.
    """

    def __init__(self, init, in_dim, sat_side, width=1.0, trunk_channels=None, init_kind='released',
                 skip_norm=False, name=None):
        super().__init__(name=name)
        if sat_side % 64:
            raise ValueError(f'aerial side {sat_side} must be divisible by 64 for the heatmap decoder')
        if init_kind not in ('released', 'scaled'):
            raise ValueError(f"decoder init must be 'released' or 'scaled', got {init_kind!r}")
        ch = lambda c: channels(c, width)
        g = 'glorot'
        self.skip_norm = bool(skip_norm)
        self.deconv0 = Deconv(init, in_dim, ch(2048), sat_side // 64, k=3, bias=g, name='deconv0')
        self.conv0 = Conv(init, ch(2048), ch(2048), bias=g, name='conv0')
        self.up0 = Deconv(init, ch(2048), ch(1024), 2, bias=g, name='up0')
        self.conv1a = Conv(init, ch(1024), ch(512), bias=g, name='conv1a')
        self.conv1b = Conv(init, ch(512), ch(512), bias=g, name='conv1b')
        self.stages = []
        cin = ch(512)
        for cout, skip in zip((256, 128, 64, 32, 16), SKIP_LAYERS[::-1]):
            up = Deconv(init, cin, ch(cout), 2, bias=g, name=f'up_{skip}')
            conv_a = Conv(init, ch(cout) + trunk_channels[skip], ch(cout), bias=g, name=f'conv_{skip}_a')
            conv_b = Conv(init, ch(cout), ch(cout), bias=g, name=f'conv_{skip}_b')
            self.stages.append((up, conv_a, conv_b))
            cin = ch(cout)
        self.up_last = Deconv(init, cin, ch(8), 2, bias=g, name='up_last')
        self.conv_last = Conv(init, ch(8), ch(4), bias=g, name='conv_last')
        self.logits = Conv(init, ch(4), 1, bias=g, name='logits')
        if init_kind == 'scaled':
            self._scale_small_map_layers(sat_side // 64)

    def _scale_small_map_layers(self, s):
        """The 'scaled' repair (not the released initialisation): the layers before the first skip run on
        1x1 .. 2s x 2s maps, where a 3x3 kernel's output position sees fewer than its 9 taps while its
        glorot scale assumes all 9, so each layer shrinks the signal; their kernels are scaled by
        sqrt(9 / taps seen on average) and their biases zeroed (glorot-normal biases are as large as the
        signal there)."""
        layers = ((self.deconv0, deconv_taps(1, s)), (self.conv0, conv_taps(s)), (self.up0, deconv_taps(s, 2)),
                  (self.conv1a, conv_taps(2 * s)), (self.conv1b, conv_taps(2 * s)))
        for layer, taps in layers:
            layer.w.assign(layer.w * np.sqrt(9.0 / taps))
            layer.b.assign(tf.zeros_like(layer.b))

    def __call__(self, bottleneck, skips, trace=None):
        """bottleneck [B, 2048w], skips from the aerial trunk -> heatmap [B, 2S, 2S] (>= 0).
        trace: a dict that receives every layer's output by name (diagnostics), or None."""
        keep = (lambda name, x: trace.__setitem__(name, x) or x) if trace is not None else (lambda name, x: x)
        x = keep('deconv0', self.deconv0(bottleneck[:, None, None, :]))
        x = keep('conv0', self.conv0(x))
        x = keep('up0', self.up0(x))
        x = keep('conv1b', self.conv1b(keep('conv1a', self.conv1a(x))))
        for (up, conv_a, conv_b), skip in zip(self.stages, SKIP_LAYERS[::-1]):
            x, feat = keep(f'up_{skip}', up(x)), skips[skip]
            if self.skip_norm:   # the 'skip_norm' repair: both inputs of the concat at unit RMS per example
                x, feat = unit_rms(x), unit_rms(feat)
            x = keep(f'conv_{skip}_b', conv_b(keep(f'conv_{skip}_a', conv_a(tf.concat([x, feat], -1)))))
        x = keep('conv_last', self.conv_last(keep('up_last', self.up_last(x))))
        return keep('heatmap', tf.nn.relu(self.logits(x, relu=False)[..., 0]))


class CholeskyHead(tf.Module):
    """bottleneck -> Dense 512 sigmoid -> Dense 3 (Keras defaults) -> Cholesky factor (l0, l1, l2), pixels.

    'port': l0, l2 = scale (elu(z) + 1) + floor (always > 0), l1 = scale z (free: either sign of
    correlation). 'original': all three scale (elu(z) + 1) (+ floor on the diagonal), so rho > 0 always.
    With scale 1 the initial u is ~4.5 px, the original's scale.
    """

    def __init__(self, init, in_dim, width=1.0, kind='port', scale=1.0, floor=0.01, name=None):
        super().__init__(name=name)
        if kind not in ('port', 'original'):
            raise ValueError(f"cholesky must be 'port' or 'original', got {kind!r}")
        self.fc1 = Dense(init, in_dim, channels(512, width), kind='glorot_uniform', name='fc1')
        self.fc2 = Dense(init, channels(512, width), 3, kind='glorot_uniform', name='fc2')
        self.kind, self.scale, self.floor = kind, scale, floor

    def __call__(self, bottleneck):
        z = tf.cast(self.fc2(tf.sigmoid(self.fc1(bottleneck))), tf.float32)
        pos = (tf.nn.elu(z) + 1.0) * self.scale
        l0, l2 = pos[:, 0] + self.floor, pos[:, 2] + self.floor
        l1 = z[:, 1] * self.scale if self.kind == 'port' else pos[:, 1]
        return tf.stack([l0, l1, l2], -1)                                    # (B, 3)


def cholesky_to_cov(chol):
    """(l0, l1, l2) -> Sigma = L L^T with L = [[l0, 0], [l1, l2]]: [B, 2, 2] pixels^2."""
    l0, l1, l2 = chol[:, 0], chol[:, 1], chol[:, 2]
    return tf.stack([tf.stack([l0 * l0, l0 * l1], -1),
                     tf.stack([l0 * l1, l1 * l1 + l2 * l2], -1)], -2)


def uncertainty(chol):
    """Scalar u = 2 sqrt(lambda_max) + 2 sqrt(lambda_min) of Sigma: the 1-sigma ellipse's axes, pixels."""
    cov = cholesky_to_cov(chol)
    a, b, d = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    mean, diff = (a + d) / 2, tf.sqrt(((a - d) / 2) ** 2 + b * b)
    lam_max, lam_min = mean + diff, tf.maximum(mean - diff, 0.0)
    return 2 * tf.sqrt(lam_max) + 2 * tf.sqrt(lam_min)


def soft_argmax(heatmap, eps=1e-6):
    """heatmap [B, h, w] >= 0 -> mu [B, 2] = (row, col) of its mass centre in the 640-px frame."""
    heatmap = tf.cast(heatmap, tf.float32)
    h, w = heatmap.shape[1], heatmap.shape[2]
    rows = (tf.range(h, dtype=tf.float32) + 0.5) * (TILE_PX / h)
    cols = (tf.range(w, dtype=tf.float32) + 0.5) * (TILE_PX / w)
    mass = tf.reduce_sum(heatmap, [1, 2]) + eps
    row = tf.reduce_sum(heatmap * rows[None, :, None], [1, 2]) / mass
    col = tf.reduce_sum(heatmap * cols[None, None, :], [1, 2]) / mass
    return tf.stack([row, col], -1)


class CrossViewModel(tf.Module):
    """All parts of the method; `parts` says which are built (see ALL_PARTS).

    grd_hw: (H, W) of the ground input, sat_side: aerial input side; both divisible by 32
    (the aerial side by 64 when heatmap parts are built). width scales every channel count
    (1.0 = the paper's network; 0.25 for CPU demos).
    """

    def __init__(self, grd_hw=(320, 640), sat_side=320, width=1.0, parts=RETRIEVAL_PARTS, seed=0,
                 safa_heads=8, cholesky='port', cholesky_scale=1.0, cholesky_floor=0.01, offset_zero_init=False,
                 localiser='unet', decoder_init='released', skip_norm=False, correlation_dim=64):
        super().__init__(name='cross_view_model')
        unknown = set(parts) - set(ALL_PARTS)
        if unknown:
            raise ValueError(f'unknown model parts {sorted(unknown)}; known: {ALL_PARTS}')
        for side in (*grd_hw, sat_side):
            if side % 32:
                raise ValueError(f'input sides must be divisible by 32, got {grd_hw} and {sat_side}')
        if localiser not in LOCALISERS:
            raise ValueError(f'localiser must be one of {LOCALISERS}, got {localiser!r}')
        self.grd_hw, self.sat_side, self.width, self.localiser = tuple(grd_hw), sat_side, width, localiser
        self.cholesky = cholesky
        self.parts = tuple(p for p in ALL_PARTS if p in parts)
        init = Init(seed)
        self.grd_trunk = VGG16(init, width, name='grd_trunk')
        self.sat_trunk = VGG16(init, width, name='sat_trunk')
        c5 = self.grd_trunk.out_channels
        self.grd_safa = SAFA(init, (grd_hw[0] // 32) * (grd_hw[1] // 32), safa_heads, name='grd_safa')
        self.sat_safa = SAFA(init, (sat_side // 32) ** 2, safa_heads, name='sat_safa')
        self.dim = safa_heads * c5
        trunk_ch = {conv.name: conv.w.shape[-1] for conv in self.sat_trunk.convs}
        if 'offset_head' in parts:
            self.offset_head = OffsetHead(init, self.dim, width, offset_zero_init, name='offset_head')
        for branch in ('pos', 'semi'):
            if f'{branch}_fusion' in parts:
                fusion = Fusion(init, self.dim, width, name=f'{branch}_fusion')
                setattr(self, f'{branch}_fusion', fusion)
                if localiser == 'unet':
                    decoder = HeatmapDecoder(init, fusion.out_dim, sat_side, width, trunk_ch, decoder_init, skip_norm,
                                             name=f'{branch}_decoder')
                else:
                    decoder = CorrelationLocaliser(init, self.dim, trunk_ch, correlation_dim, name=f'{branch}_decoder')
                setattr(self, f'{branch}_decoder', decoder)
            if f'{branch}_cholesky' in parts and cholesky == 'moments':   # (not the paper's head)
                setattr(self, f'{branch}_cholesky', MomentsCholesky(name=f'{branch}_cholesky'))
            elif f'{branch}_cholesky' in parts:
                setattr(self, f'{branch}_cholesky', CholeskyHead(
                    init, channels(2048, width), width, cholesky, cholesky_scale, cholesky_floor,
                    name=f'{branch}_cholesky'))

    def part_variables(self, names):
        out = []
        for name in names:
            out.extend(getattr(self, name).trainable_variables)
        return out

    def embed_grd(self, grd):
        """grd [B, H, W, 3] -> un-normalised descriptor [B, D]."""
        feat, _ = self.grd_trunk(grd)
        return self.grd_safa(feat)

    def embed_sat(self, sat):
        """sat [B, S, S, 3] -> (un-normalised descriptor [B, D], skip features for the decoder)."""
        feat, skips = self.sat_trunk(sat)
        return self.sat_safa(feat), skips

    def offset(self, sat_desc, grd_desc):
        """VIGOR head -> predicted delta [B, 2] in pixels of the 640-px tile (regression x 320)."""
        return tf.cast(self.offset_head(sat_desc, grd_desc), tf.float32) * (TILE_PX / 2)

    def localise(self, branch, sat_desc, grd_desc, skips):
        """Heatmap branch ('pos' or 'semi') -> dict(heatmap [B, h, w] >= 0, mu [B,2] (row, col of the 640
        frame), chol [B,3] when the branch has a covariance head; logits [B, h, w] of the correlation
        localiser). The U-Net's heatmap is 2S x 2S for an S-px tile, the correlation localiser's S/4 x S/4."""
        has_chol = f'{branch}_cholesky' in self.parts
        decoder = getattr(self, f'{branch}_decoder')
        bottleneck = None
        if self.localiser == 'unet' or (has_chol and self.cholesky != 'moments'):
            bottleneck = getattr(self, f'{branch}_fusion')(sat_desc, grd_desc)
        if self.localiser == 'unet':
            out = {'heatmap': decoder(bottleneck, skips)}
        else:
            logits = decoder(grd_desc, skips)
            out = {'logits': logits, 'heatmap': softmax_map(logits)}
        out['mu'] = soft_argmax(out['heatmap'])
        if has_chol:
            head = getattr(self, f'{branch}_cholesky')
            out['chol'] = head(out['heatmap'] if self.cholesky == 'moments' else bottleneck)
        return out


def l2_normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)
