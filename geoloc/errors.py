"""Every error the project raises on bad input or a stopped run, in one place. Each one's str() is one line,
which the stage scripts print as `error: <line>` with exit status 2 (cli.main); `Interrupted` ends a run that
Ctrl-C stopped after saving a checkpoint (exit status 130). Importing this module loads nothing."""


class ConfigError(ValueError):
    """A bad flag or configuration file."""


class DataError(ValueError):
    """Bad dataset input; the message names the file (and line)."""


class StateError(RuntimeError):
    """A checkpoint or run directory that cannot be used."""


class LockError(RuntimeError):
    """The run directory is another process's."""


class DistributeError(RuntimeError):
    """A distribution setting that cannot work here."""


class TrainError(RuntimeError):
    """Training cannot go on (a non-finite step, a checkpoint that cannot be written)."""


class Interrupted(Exception):
    """Ctrl-C stopped training after saving a checkpoint."""


# what cli.main turns into one line and exit status 2
ONE_LINE = (ConfigError, DataError, StateError, LockError, DistributeError, TrainError)
