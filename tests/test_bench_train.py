"""The FLOP counts behind benchmarks/bench_train.py's "% of tf.matmul" figures."""
import importlib.util
import os

import tensorflow as tf

_spec = importlib.util.spec_from_file_location(
    'bench_train', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                                'bench_train.py'))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

X = tf.TensorSpec([2, 8, 8, 3])
W = tf.TensorSpec([3, 3, 3, 4])
D = tf.TensorSpec([3, 3, 6, 4])            # a stride-2 transposed conv, 4 -> 6 channels
M = tf.TensorSpec([6, 5])


def forward(x, w, d, m):
    y = tf.nn.relu(tf.nn.conv2d(x, w, 1, 'SAME'))                                  # 2*8*8*4 * 3*3*3 MACs
    y = tf.nn.max_pool2d(y, 2, 2, 'VALID')                                         # [2, 4, 4, 4]
    y = tf.nn.conv2d_transpose(y, d, [2, 8, 8, 6], 2, 'SAME')                      # 2*4*4 * 3*3*6*4
    v = tf.reduce_mean(y, [1, 2])                                                  # [2, 6]
    a = tf.matmul(v, m)                                                            # 2*5*6
    b = tf.matmul(v, v, transpose_a=True)                                          # 6*6*2
    c = tf.linalg.matmul(v[None], tf.tile(v[None], [3, 1, 1]), adjoint_a=True)     # 3 * 6*6*2
    e = tf.einsum('bi,ij->bj', v, m)                                               # 2*6*5
    return tf.reduce_sum(a) + tf.reduce_sum(b) + tf.reduce_sum(c) + tf.reduce_sum(e)


MACS = {'Conv2D': 2 * 8 * 8 * 4 * 27, 'Conv2DBackpropInput': 2 * 4 * 4 * 9 * 6 * 4,
        'MatMul': 2 * 5 * 6 + 6 * 6 * 2, 'BatchMatMulV2': 3 * 6 * 6 * 2, 'Einsum': 2 * 6 * 5}


def test_forward_flops_counts_each_product_from_its_shapes():
    graph = tf.function(forward, autograph=False).get_concrete_function(X, W, D, M).graph
    total, by_type = bench_train.forward_flops(graph)
    assert by_type == {k: 2 * v for k, v in MACS.items()}
    assert total == 2 * sum(MACS.values())


def test_profiler_count_of_the_gradient_graph_is_three_forwards():
    """tf.profiler over forward + backward = 3 x the analytic forward count of the same op types; the
    element-wise ops, pooling and reductions in the graph must not be counted."""
    def conv_and_dense(x, w, d, m):
        with tf.GradientTape() as tape:
            tape.watch([x, w, d, m])
            y = tf.nn.relu(tf.nn.conv2d(x, w, 1, 'SAME'))
            y = tf.nn.conv2d_transpose(tf.nn.max_pool2d(y, 2, 2, 'VALID'), d, [2, 8, 8, 6], 2, 'SAME')
            loss = tf.reduce_sum(tf.square(tf.matmul(tf.reduce_mean(y, [1, 2]), m)))
        return tape.gradient(loss, [x, w, d, m])

    graph = tf.function(conv_and_dense, autograph=False).get_concrete_function(X, W, D, M).graph
    want = 3 * 2 * (MACS['Conv2D'] + MACS['Conv2DBackpropInput'] + 2 * 5 * 6)
    assert bench_train.profiler_flops(graph) == want


def test_report_prints_the_target_verdicts():
    r = {'size': 'demo', 'stage': 'E_1', 'onednn': True, 'mem_times': [0.10, 0.12], 'mem_cpu': [0.2, 0.24],
         'matmul_before': {'tf': 100e9, 'numpy': 120e9}, 'matmul_after': {'tf': 90e9, 'numpy': 110e9},
         'flops_step': 8e9, 'flops_by_type': {'Conv2D': 2e9, 'BatchMatMulV2': 1e9}, 'trained_params': 1e6,
         'peak_rss': 2 ** 30, 'cache_fits': True, 'load_start': 1.0, 'load_end': 1.0,
         'pipeline_cold_s': 0.01, 'pipeline_cold_cpu': 0.011, 'pipeline_warm_s': 0.002, 'pipeline_warm_cpu': 0.0022,
         'profiler_flops_step': 6e9,
         'rounds': [{'mem': [0.10, 0.20], 'warm': [0.104, 0.21]}, {'mem': [0.12, 0.24], 'warm': [0.11, 0.22]},
                    {'mem': [0.10, 0.20], 'warm': [0.103, 0.20]}]}
    text = '\n'.join(bench_train.report(r, 10))
    assert '80.0 GFLOP/s = 80.0 % of tf.matmul 100.0 GFLOP/s [>= 75 %: ok]' in text     # 8 GFLOP / best 0.10 s
    assert 'pipeline alone (warm): 2.0 ms wall, 2.2 ms CPU per batch = 1.0 % of' in text  # of the median 0.22 s CPU
    assert '+3.0 % [-8.3, +4.0] wall [<= 5 %: ok]' in text                              # median of 3 rounds
    assert 'pipeline-fed (cold)' not in text                                           # no cold rounds were run
    assert 'tf.profiler 6.00 G, analytic 6.00 G' in text                                # BatchMatMul left out
    r['mem_times'] = [0.2, 0.2]
    assert '[>= 75 %: MISSED]' in '\n'.join(bench_train.report(r, 10))
