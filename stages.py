"""What a stage is, and the order of the paper's stages.

A stage script describes its stage(s) with a `Stage` and hands them to `cli.main`; the shared
code owns everything else (distribution, replica scaling, state, checkpoints, mining, the loop,
validation, --test). The registry below is the one list of the paper's stages and their scripts,
read by run_all.py, the benchmarks and the tests. Importing it loads no TensorFlow (get() imports the
stage scripts, which do). A new stage needs no entry here to train: it names
its predecessor and its script itself (tests/test_loop.py trains a toy stage defined in the test).

The loss contract: `loss(model, emb, batch, ctx) -> {term name: scalar}`.
  emb    the batch's embeddings, computed by the loop (embedding.embed_batch): grd, sat, semi
         (L2-normalised [b, D]), grd_raw, sat_raw, semi_raw (un-normalised), sat_skips, semi_skips
         (aerial trunk features for the decoder), grd_all, sat_all (the global batch's normalised
         descriptors, every replica's rows) and row0 (this replica's first row in them);
  batch  the pipeline's dict: delta, delta_semi [b, 2] (pixels of the 640 frame), pano, semi_k, sat_idx;
  ctx    ctx.cfg (the Config), ctx.tables (run tables, e.g. E_3's u table), ctx.report(name, value)
         for a diagnostic that is logged but not optimised.
Every term and report is a mean over this replica's b examples (the triplet term: over its anchors,
against every negative of the global batch); the total is their sum. The loop scales every one of them
for the replicas, once (embedding.LossContext and loop.make_step).
"""
import dataclasses
import importlib
import os

# The paper's stages in training order, and the script that trains each.
ORDER = ('E_1a', 'E_1', 'E_2_1', 'E_2_2', 'E_3')
SCRIPTS = {'E_1a': 'train_first_E_1.py', 'E_1': 'train_first_E_1.py', 'E_2_1': 'train_second_E_2_1.py',
           'E_2_2': 'train_second_E_2_2.py', 'E_3': 'train_third_E_3.py'}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                  # e.g. 'E_2_1'; its run directory defaults to runs/<home>/<subdir>
    parts: tuple               # model parts built (model.ALL_PARTS)
    train_parts: tuple         # parts the optimiser updates
    loss: callable             # (model, emb, batch, ctx) -> {name: scalar}; see the module docstring
    previous: str = ''         # predecessor's stage name ('' = start from ImageNet)
    restore: tuple = ()        # parts restored from the predecessor
    also_accepts: tuple = ()   # other stages whose checkpoints --init_from may hold
    inherits: tuple = ()       # settings taken from the predecessor's config.json (E_3: its --nll, the scale of
                               # its u); given on the command line, one that differs is refused
    carry: str = 'slots'       # from the predecessor: 'slots' (Adam slots of restored parts), 'all' (and
                               # the global step and the mining table), 'none'
    uses_semi: bool = True     # the loss looks at the semi-positive tile (else it is not even read)
    defaults: dict = dataclasses.field(default_factory=dict)   # the paper's values for this stage
    presets: dict = dataclasses.field(default_factory=dict)    # {'demo': {...}} on top of config.PRESETS
    flags: dict = dataclasses.field(default_factory=dict)      # flags of this stage alone: {flag: (setting, help)};
                               # given, the flag sets the setting for this stage over the shared flag (E_1's
                               # --epochs_a: phase a's --epochs)
    tables: dict = dataclasses.field(default_factory=dict)     # run tables: name -> columns (rows = train split)
                                                                # or a (rows, columns) shape
    prepare: callable = None   # (model, split, embedder, cfg, log, image cache, run dir) -> {table: array},
                               # run before the first step of a fresh run
    script: str = ''           # the script that trains it (default: the registry's)
    home: str = ''             # run directory name under runs/ (default: name)
    subdir: str = ''           # below the script's --run_dir (E_1's phase a)
    settings: tuple = ()       # this stage's own settings: ((name, config.setting(...)), ...): flags of its script
                               # and fields of its Config (ctx.cfg.<name>), validated by their rules
    localiser: str = ''        # how --test localises in a tile, a name in geoloc/eval/localisers.py's registry
                               # ('' = the one its parts say: localise below)
    metrics: tuple = ()        # the stage's own --test metrics: callables (testing.Evaluation, split) ->
                               # {name: float}, written under 'stage_metrics'

    @property
    def localise(self):
        """How --test localises inside a tile: 'heatmap', 'offset' or '' (tile centre only)."""
        if 'pos_fusion' in self.parts:
            return 'heatmap'
        return 'offset' if 'offset_head' in self.parts else ''

    @property
    def accepts(self):
        """Stage names whose checkpoints this stage may start from."""
        return ((self.previous,) if self.previous else ()) + tuple(self.also_accepts)

    @property
    def command(self):
        return f'python {self.script or SCRIPTS.get(self.name, "?")}'

    def default_run_dir(self):
        base = os.path.join('runs', self.home or self.name)
        return os.path.join(base, self.subdir) if self.subdir else base

    def run_dirs(self, cfg):
        """(this stage's run directory, the predecessor's) for a Config."""
        base = cfg.run_dir or os.path.join('runs', self.home or self.name)
        run_dir = os.path.join(base, self.subdir) if self.subdir else base
        if not self.previous:
            return run_dir, ''
        if cfg.init_from:
            return run_dir, cfg.init_from
        prev = get(self.previous) if self.previous in SCRIPTS else None
        if prev is not None and prev.home == (self.home or self.name) and cfg.run_dir:
            # the predecessor is trained by the same script (E_1's phases): it lives beside us
            return run_dir, os.path.join(cfg.run_dir, prev.subdir) if prev.subdir else cfg.run_dir
        return run_dir, prev.default_run_dir() if prev is not None else os.path.join('runs', self.previous)

    def previous_command(self):
        prev = get(self.previous) if self.previous in SCRIPTS else None
        return prev.command if prev is not None else f'the {self.previous} stage'


def build_model(stage, cfg):
    """The stage's model parts, as the configuration sizes them (random weights from cfg.seed)."""
    import model as model_lib
    return model_lib.CrossViewModel(cfg.grd_size, cfg.sat_size, cfg.width, stage.parts, seed=cfg.seed,
                                    cholesky=cfg.cholesky, cholesky_scale=cfg.cholesky_scale,
                                    cholesky_floor=cfg.cholesky_floor, offset_zero_init=bool(cfg.offset_zero_init),
                                    localiser=cfg.localiser, decoder_init=cfg.decoder_init,
                                    skip_norm=bool(cfg.skip_norm), correlation_dim=cfg.correlation_dim)


def script_stages(script):
    """The Stage objects a stage script defines, in training order (its STAGES list)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    return list(module.STAGES)


def get(name):
    """The registered Stage called `name` (imports its script)."""
    if name not in SCRIPTS:
        raise KeyError(f'unknown stage {name!r}; known: {", ".join(ORDER)}')
    for stage in script_stages(SCRIPTS[name]):
        if stage.name == name:
            return stage
    raise KeyError(f'{SCRIPTS[name]} defines no stage {name!r}')


def main_scripts():
    """The stage scripts in training order, each once: [(script, [stage names])]."""
    out = []
    for name in ORDER:
        if out and out[-1][0] == SCRIPTS[name]:
            out[-1][1].append(name)
        else:
            out.append((SCRIPTS[name], [name]))
    return out
