"""tf.distribute helpers: the strategy, who writes, waiting for every worker, one worker's value on all."""
import os

import numpy as np
import tensorflow as tf
from geoloc.errors import DistributeError  # noqa: F401 (raised here, caught as <module>.<name>)


_MULTIWORKER = []      # the process's one MultiWorkerMirroredStrategy (make_strategy)


def make_strategy(name):
    """default: one device; mirrored: every GPU of this machine (every logical CPU when it has no GPU);
    multiworker: every machine of TF_CONFIG's cluster, each with its GPUs (or its CPU).

    A process makes one MultiWorkerMirroredStrategy and every later call returns it: its collective ops are
    configured when the first is made, and a second one made after TensorFlow ops exist (E_1's phase b after
    phase a, in one process) starts with "Enabling collective ops after program startup" and could hang both
    workers at its first collective.

    GEOLOC_LOGICAL_CPUS=N first splits the CPU into N logical devices, so a CPU-only machine can rehearse
    a multi-device run (tests, debugging); it must act before TensorFlow's runtime starts.
    """
    n_cpus = int(os.environ.get('GEOLOC_LOGICAL_CPUS') or 1)
    if n_cpus > 1:
        cpu = tf.config.list_physical_devices('CPU')[0]
        if tf.config.get_logical_device_configuration(cpu) is None:  # not yet split (E_1 builds two runs)
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n_cpus)
            except RuntimeError as e:
                raise DistributeError(f'GEOLOC_LOGICAL_CPUS={n_cpus}: TensorFlow started before the CPU could be '
                                      f'split ({e})') from None
    if name == 'mirrored':
        gpus = tf.config.list_logical_devices('GPU')
        return tf.distribute.MirroredStrategy(None if gpus else [d.name for d in tf.config.list_logical_devices('CPU')])
    if name == 'multiworker':
        if not _MULTIWORKER:
            _MULTIWORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        return _MULTIWORKER[0]
    return tf.distribute.get_strategy()


def is_multiworker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run directory (only the chief does under multiworker)."""
    return strategy.extended.should_checkpoint


def worker_name(strategy):
    return '' if is_chief(strategy) else f'worker {strategy.cluster_resolver.task_id}'


def barrier(strategy):
    """Wait for every worker (a no-op on one machine)."""
    if is_multiworker(strategy):
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def broadcast(strategy, table):
    """The chief's int32 table on every worker (tables computed apart could differ in a float tie)."""
    if not is_multiworker(strategy):
        return table

    def first(x):
        ctx = tf.distribute.get_replica_context()
        keep = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x * keep)
    out = strategy.run(first, (tf.constant(table, tf.float32),))  # ids < 2^24: exact in float32
    return strategy.experimental_local_results(out)[0].numpy().astype(np.int32)


def gather(x):
    """[b, ...] this replica's rows -> [B, ...] the global batch, in replica order (inside strategy.run)."""
    rc = tf.distribute.get_replica_context()
    if rc is None or rc.num_replicas_in_sync == 1:
        return x
    return rc.all_gather(x, axis=0)


def replica_info():
    """(number of replicas in sync, this replica's id) inside strategy.run; (1, 0) outside."""
    rc = tf.distribute.get_replica_context()
    if rc is None:
        return 1, 0
    return rc.num_replicas_in_sync, rc.replica_id_in_sync_group
