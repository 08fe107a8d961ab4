"""What a stage script calls: its TensorFlow environment, `main`, the run log and the data splits.

A stage script is short: its Stage(s) (stages.py) and

    from geoloc import cli
    if __name__ == '__main__':
        cli.setup_environment(sys.argv)   # before TensorFlow loads
    ...
    if __name__ == '__main__':
        sys.exit(cli.main(STAGES))

`main` trains the script's stages in order (loop.train) or, with --test, evaluates the last one
(testing.run_test). Bad input of any kind (a flag, data, a checkpoint, a configuration, a full disk) ends in
one line `error: ...` on stderr and exit status 2; Ctrl-C saves a checkpoint and ends in one line
`interrupted at step ...` and exit status 130 (a second Ctrl-C stops at once, without a checkpoint).
Importing this module changes nothing and does not load TensorFlow.
"""
import os
import sys
import tempfile

DEMO_SIZED = ('demo',)   # presets with the demo's input sizes and width (oneDNN on: setup_environment)


def setup_environment(argv=()):
    """The stage scripts' TensorFlow environment, set before TensorFlow loads (shell settings win).

    TF_CPP_MIN_LOG_LEVEL 2: an error stays one line. TF_ENABLE_ONEDNN_OPTS 1 for the demo-sized preset
    (`--preset demo`, DEMO_SIZED) only:
    on this project's 2-core AVX2 machine oneDNN made demo-size steps 1.4-2.3x faster and paper-size
    steps 1.4-1.6x slower (benchmarks/LOG.md), and TF 2.21 turns it on by itself only on CPUs with
    AVX-512; other presets keep TensorFlow's own choice. With oneDNN on, TensorFlow writes a notice to
    fd 2 before any log level applies, so the import runs with fd 2 on a temporary file whose other
    lines are passed on.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    argv = list(argv)
    presets = {a.split('=', 1)[1] for a in argv if a.startswith('--preset=')}
    presets |= {b for a, b in zip(argv, argv[1:]) if a == '--preset'}
    if presets & set(DEMO_SIZED):
        os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
    if 'tensorflow' in sys.modules:
        return
    notices = ('oneDNN custom operations are on', 'All log messages before absl::InitializeLog()')
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(line for line in lines if not any(n in line for n in notices)))
            sys.stderr.flush()


from geoloc import runlog


def dataset_splits(cfg, which):
    """splits.dataset_splits (imported when called: it loads the data modules)."""
    from geoloc.data import splits
    return splits.dataset_splits(cfg, which)


def configs(stages_, argv):
    """One Config per stage from the command line (config.resolve's precedence). A stage's own settings
    (Stage.settings) are flags of its script and fields of its Config only; a stage's own flags (Stage.flags,
    e.g. E_1's --epochs_a) set their setting for that stage over the shared flag; --settings FILE gives values
    per stage below the flags."""
    import config
    doc = getattr(sys.modules.get('__main__'), '__doc__', None)
    presets = dict(config.PRESETS)
    for s in stages_:
        presets.update({k: {} for k in s.presets if k not in presets})
    stage_flags = {name: spec for s in stages_ for name, spec in s.flags.items()}
    own_settings = tuple(pair for s in stages_ for pair in s.settings)
    explicit, preset, test, settings_path = config.parse_args(argv, doc, presets, stage_flags, own_settings,
                                                              stage_defaults_text(stages_))
    data = config.read_settings(settings_path) if settings_path else {}
    shared = {k: v for k, v in explicit.items() if k not in stage_flags}
    out = []
    for s in stages_:
        known = config.kinds_of(config.config_class(s.settings))
        own = {setting: explicit[name] for name, (setting, _) in s.flags.items() if name in explicit}
        given = dict({k: v for k, v in shared.items() if k in known}, **own)   # (another stage's own: not ours)
        file_values = config.stage_settings(data, s.name, settings_path, known) if data else None
        try:
            cfg = config.resolve(s.name, given, preset, s.defaults, s.presets, test, s.settings, file_values)
        except config.ConfigError as e:   # blame the flag that was given
            for name, (setting, _) in s.flags.items():
                if name in explicit and str(e).startswith(f'--{setting} '):
                    raise config.ConfigError(f'--{name} {str(e)[len(setting) + 3:]}') from None
            raise
        if s.inherits:
            run_dir, init_dir = s.run_dirs(cfg)
            cfg = config.inherit(cfg, given, s.inherits, os.path.join(run_dir, 'config.json'),
                                 init_dir and os.path.join(init_dir, 'config.json'), s.previous)
        out.append(cfg)
    return out


def stage_defaults_text(stages_):
    """{setting: text} of the defaults a script's stages set (Stage.defaults), for --help: '14' when every stage
    of the script sets 14, '14 in E_1a, 10 in E_1' when they differ (a stage that sets none: the global one)."""
    import config
    out = {}
    for name in sorted({k for s in stages_ for k in s.defaults}):
        values = [(s.name, s.defaults.get(name, config.DEFAULTS.get(name))) for s in stages_]
        if len({repr(v) for _, v in values}) == 1:
            out[name] = config._show(values[0][1])
        else:
            out[name] = ', '.join(f'{config._show(v)} in {stage}' for stage, v in values)
    return out


def main(stages_, argv=None):
    """Entry point of a stage script: train its stages in order, or --test the last one."""
    import tensorflow as tf
    from geoloc import errors
    from geoloc.eval import testing
    from geoloc.train import loop
    try:
        cfgs = configs(stages_, argv)
        if cfgs[-1].calibrate and not cfgs[-1].test:
            raise errors.ConfigError('--calibrate 1 fits the ellipses of a trained run on held-out panoramas: give '
                                     '--test too')
        if cfgs[-1].test:
            testing.run_test(stages_[-1], cfgs[-1])
            return 0
        for stage, cfg in zip(stages_, cfgs):
            loop.train(stage, cfg)
        return 0
    except errors.Interrupted as e:   # 'interrupted at step ...: checkpoint ... saved; ...'
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print('interrupted: stopped at once; what was saved before is intact (run the same command again to resume)',
              file=sys.stderr)
        return 130
    except MemoryError:
        return _error('out of memory; lower --batch, --eval_batch, --eval_block or --image_cache_mb')
    except (*errors.ONE_LINE, OSError, tf.errors.OpError) as e:   # bad input, or the machine (a full disk ...)
        msg = runlog.one_line(e, 'lower --batch, --eval_batch or --eval_block')
        if not msg:
            raise
        return _error(msg)


def _error(msg):
    print(f'error: {msg}', file=sys.stderr)
    return 2
