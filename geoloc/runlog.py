"""The run log (one per run directory: stdout and <run_dir>/train.log) and the few words that say why an
operation failed. Importing this module loads no TensorFlow."""
import itertools
import logging
import os
import re
import sys


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


class _QuietFile(logging.FileHandler):
    """train.log; a write that fails (a full disk) drops the file copy instead of printing a traceback
    (stdout keeps every line; the checkpoint that then fails says so in one line)."""

    def handleError(self, record):
        self.close()
        self.emit = lambda record: None


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
        file = _QuietFile(os.path.join(run_dir, 'train.log'))
        file.setFormatter(logging.Formatter(f'%(asctime)s [{prefix}] %(message)s', '%Y-%m-%d %H:%M:%S'))
        handlers.append(file)
    except OSError:
        pass  # a read-only run directory (--test of someone else's run): print only
    for h in handlers:
        logger.addHandler(h)
    return _Log(logger, handlers)


MACHINE_ERRORS = ('No space left on device', 'File too large', 'Disk quota exceeded', 'Read-only file system',
                  'Permission denied')


def error_reason(e):
    """Why an operation failed, in a few words: the system's reason (a full disk...) or the first line of
    TensorFlow's message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return next((known for known in MACHINE_ERRORS if known in str(e)), _first_line(e))


def _first_line(e):
    """An exception's first line, without TensorFlow's op decorations ({{function_node ...}}, [Op:...])."""
    text = str(getattr(e, 'message', e)).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:\w+\]', '', first)[:200]


def one_line(e, memory_hint=''):
    """The line `error: ...` gives for an exception that bad input or the machine caused, else None (a bug: let
    it raise). The project's errors (errors.ONE_LINE): their first line; an OSError naming a file: the file and
    the system's reason; a TensorFlow error: the bad item tf.data met (pipeline.unwrap_error), a full disk or
    such (MACHINE_ERRORS), or memory (with memory_hint: which flags to lower)."""
    from geoloc import errors
    if isinstance(e, errors.ONE_LINE):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError):
        return f'{e.filename}: {e.strerror}' if e.filename and e.strerror else None
    import tensorflow as tf
    if not isinstance(e, tf.errors.OpError):
        return None
    from geoloc.data import pipeline
    msg = pipeline.unwrap_error(e)
    if msg:
        return msg
    if error_reason(e) in MACHINE_ERRORS:
        return _first_line(e)
    if isinstance(e, tf.errors.ResourceExhaustedError):
        return f'out of memory ({_first_line(e)})' + (f'; {memory_hint}' if memory_hint else '')
    return None
