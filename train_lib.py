"""What a stage script calls: its TensorFlow environment, `main`, the run log and the data splits.

A stage script is short: its Stage(s) (stages.py) and

    import train_lib
    if __name__ == '__main__':
        train_lib.setup_environment(sys.argv)   # before TensorFlow loads
    ...
    if __name__ == '__main__':
        sys.exit(train_lib.main(STAGES))

`main` trains the script's stages in order (loop.train) or, with --test, evaluates the last one
(testing.run_test). Bad input of any kind ends in one line `error: ...` on stderr and exit status 2.
Importing this module changes nothing and does not load TensorFlow.
"""
import itertools
import logging
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def setup_environment(argv=()):
    """The stage scripts' TensorFlow environment, set before TensorFlow loads (shell settings win).

    TF_CPP_MIN_LOG_LEVEL 2: an error stays one line. TF_ENABLE_ONEDNN_OPTS 1 for `--preset demo` only:
    on this project's 2-core AVX2 machine oneDNN made demo-size steps 1.4-2.3x faster and paper-size
    steps 1.4-1.6x slower (benchmarks/README.md), and TF 2.21 turns it on by itself only on CPUs with
    AVX-512; other presets keep TensorFlow's own choice. With oneDNN on, TensorFlow writes a notice to
    fd 2 before any log level applies, so the import runs with fd 2 on a temporary file whose other
    lines are passed on.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    argv = list(argv)
    if any(a == '--preset=demo' for a in argv) or any(a == '--preset' and b == 'demo' for a, b in zip(argv, argv[1:])):
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


class _Log:
    """log(msg): '[prefix] msg' on stdout and, with a time stamp, appended to <run_dir>/train.log."""

    def __init__(self, logger, handlers):
        self.logger, self.handlers = logger, handlers

    def __call__(self, msg):
        self.logger.info(msg)

    def close(self):
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test's captured stream, a redirected one)."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


_LOGGERS = itertools.count()


def open_log(run_dir, prefix):
    """A logger for one run directory (the standard library's logging, a new logger per call)."""
    os.makedirs(run_dir, exist_ok=True)
    logger = logging.getLogger(f'geoloc.{next(_LOGGERS)}')
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = _Stdout()
    console.setFormatter(logging.Formatter(f'[{prefix}] %(message)s'))
    handlers = [console]
    try:
        file = logging.FileHandler(os.path.join(run_dir, 'train.log'))
        file.setFormatter(logging.Formatter(f'%(asctime)s [{prefix}] %(message)s', '%Y-%m-%d %H:%M:%S'))
        handlers.append(file)
    except OSError:
        pass  # a read-only run directory (--test of someone else's run): print only
    for h in handlers:
        logger.addHandler(h)
    return _Log(logger, handlers)


def dataset_splits(cfg, which):
    """The 'train' or 'test' split of the configured dataset (generating the built-in synthetic one)."""
    import input_data
    import synthetic_data
    root = cfg.data_root
    if cfg.dataset == 'vigor':
        if not root:
            root = synthetic_data.ensure_vigor(os.path.join(HERE, 'data', 'synthetic_vigor'))
        input_data.check_prepared(root, cfg.grd_size, cfg.sat_size)   # a copy from prepare_data.py
        return input_data.load_vigor(root, which, cfg.area, cfg.labels)
    mpp = cfg.cvact_mpp or synthetic_data.CVACT_MPP_1200
    if not root:
        root = synthetic_data.ensure_cvact(os.path.join(HERE, 'data', 'synthetic_cvact'))
    resampled = cfg.cvact_resampled or os.path.join(root, 'resampled')
    if not cfg.data_root and not os.path.exists(os.path.join(resampled, 'splits', 'test.txt')):
        import samples_on_cvact
        samples_on_cvact.resample(root, resampled, seed=0)
    for folder in (root, resampled):
        input_data.check_prepared(folder, cfg.grd_size, cfg.sat_size)
    return input_data.load_cvact(root, resampled, which, mpp)


def configs(stages_, argv):
    """One Config per stage from the command line (config.resolve's precedence)."""
    import config
    doc = getattr(sys.modules.get('__main__'), '__doc__', None)
    presets = dict(config.PRESETS)
    for s in stages_:
        presets.update({k: {} for k in s.presets if k not in presets})
    explicit, preset, test = config.parse_flags(argv, doc, presets)
    return [config.resolve(s.name, explicit, preset, s.defaults, s.presets, test) for s in stages_]


def main(stages_, argv=None):
    """Entry point of a stage script: train its stages in order, or --test the last one."""
    import config
    import input_data
    import tensorflow as tf
    import loop
    import pipeline
    import testing
    import train_state
    import distribute
    errors = (config.ConfigError, input_data.DataError, train_state.StateError, loop.TrainError,
              distribute.DistributeError)
    try:
        cfgs = configs(stages_, argv)
        if cfgs[-1].test:
            testing.run_test(stages_[-1], cfgs[-1])
            return 0
        for stage, cfg in zip(stages_, cfgs):
            loop.train(stage, cfg)
        return 0
    except errors as e:
        print(f'error: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
        return 2
    except tf.errors.OpError as e:  # bad input met inside tf.data (training, mining or --test)
        msg = pipeline.unwrap_error(e)
        if not msg:
            raise
        print(f'error: {msg}', file=sys.stderr)
        return 2
