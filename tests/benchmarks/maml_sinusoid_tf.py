"""The TensorFlow side of the MAML peer benchmark: recipes/maml.py's own sinusoid meta-training, timed.

The recipe's ``MetaLearner`` with its meta-training loop (``meta_train_loop``: tasks drawn in
the graph, ``--steps-per-call`` meta-iterations per call, XLA unless ``--no-jit-compile``), the
same settings as the JAX peer (tests/benchmarks/peers/maml_sinusoid_jax.py). Prints one JSON
line: meta-iterations per second over the timed iterations, and the MSE after one SGD step on
the 600 test tasks of ``recipes.maml.sinusoid_test_tasks`` (seed 0), the same tasks the peer
scores. Run by ``bench_maml.py`` in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from recipes import maml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="timed meta-iterations")
    parser.add_argument("--warmup", type=int, default=200, help="meta-iterations before timing (tracing, compilation)")
    parser.add_argument("--steps-per-call", type=int, default=200)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra- and inter-op threads (0: default)")
    args = parser.parse_args()
    if args.threads:  # as TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS do for a whole run
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    config = maml.Config(seed=args.seed)
    keras.utils.set_random_seed(args.seed)
    learner = maml.MetaLearner(
        maml.build_sinusoid_model(), maml.mse, maml.mse, "maml", alpha=0.01, jit_compile=args.jit_compile
    )
    generator = tf.random.Generator.from_seed(args.seed)
    run = learner.meta_train_loop(lambda: maml.sinusoid_tasks_tf(generator, 25, 10, 10))
    calls = lambda n: max(1, n // args.steps_per_call)  # noqa: E731
    for _ in range(calls(args.warmup)):
        float(run(args.steps_per_call))
    start = time.perf_counter()
    for _ in range(calls(args.iterations)):
        loss = run(args.steps_per_call)
    float(loss)
    seconds = time.perf_counter() - start
    done = calls(args.iterations) * args.steps_per_call
    tasks, _ = maml.sinusoid_test_tasks(config)
    scores = learner.evaluate(tasks, [1])
    record = {
        "peer": "tensorflow",
        "tensorflow": tf.__version__,
        "jit_compile": args.jit_compile,
        "steps_per_call": args.steps_per_call,
        "iterations": done,
        "seconds": seconds,
        "iterations_per_second": done / seconds,
        "mse_after_1_step": float(np.mean(scores[:, 0])),
        "training_iterations": calls(args.warmup) * args.steps_per_call + done,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
