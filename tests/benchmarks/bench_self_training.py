"""Benchmark of the self-training recipe: time per student round of each method, with and
without XLA compilation of the training steps (``--jit``), and the prediction throughput on
the unlabeled pool (images/s), batch prediction through ``tf.data`` against a Python loop over
the same batches, side by side in one run."""

from __future__ import annotations

import tempfile
import time

import numpy as np
import tensorflow as tf

from common import data
from recipes import self_training as st

BATCH = 1024
STEPS_PER_ROUND = 300  # two short rounds per setting keep the benchmark to a few minutes


def prediction_throughput(model, pool: np.ndarray) -> dict[str, float]:
    """Images per second over the whole pool: tf.data + model.predict vs a Python loop of model calls."""
    st.predict_probabilities(model, pool[:BATCH])  # build the predict function once
    start = time.perf_counter()
    via_tf_data = st.predict_probabilities(model, pool, batch_size=BATCH)
    tf_data_seconds = time.perf_counter() - start

    start = time.perf_counter()
    loop = [tf.nn.softmax(model(pool[i : i + BATCH], training=False)).numpy() for i in range(0, len(pool), BATCH)]
    loop_seconds = time.perf_counter() - start
    np.testing.assert_allclose(np.concatenate(loop), via_tf_data, atol=1e-4)
    return {"tf.data": len(pool) / tf_data_seconds, "python loop": len(pool) / loop_seconds}


def main() -> None:
    dataset = data.load_dataset("fashion_mnist")
    print("prediction on the unlabeled pool (default split: 59,000 images), batch", BATCH)
    config = st.Config()
    split = st.split_data(dataset, config)
    model = st.build_model(dataset, config)
    throughput = prediction_throughput(model, split.x_unlabeled)
    for name, rate in throughput.items():
        print(f"  {name:<12} {rate:>8.0f} images/s")

    rows = []
    for method, jit in [("consistency", False), ("rounds", False), ("consistency", True)]:
        with tempfile.TemporaryDirectory() as out:
            record = st.run(st.Config(method=method, jit=jit, teacher_steps=100, rounds=2,
                                      steps_per_round=STEPS_PER_ROUND, out=out))  # fmt: skip
        seconds = [r["seconds"] for r in record["variants"]["self_training"]["rounds"]]
        rows.append((method + (" (XLA)" if jit else ""), seconds))
    print("\ntime per student round (a short teacher, two rounds each):")
    print(f"{'method':<18} {'steps/round':>11} {'s/round':>8} {'ms/step':>8}  rounds s")
    ms_per_step = {}
    for name, seconds in rows:
        per_round = float(np.mean(seconds))
        ms_per_step[name] = 1000 * per_round / STEPS_PER_ROUND
        print(f"{name:<18} {STEPS_PER_ROUND:>11} {per_round:>8.1f} {ms_per_step[name]:>8.1f}  {seconds}")
    print(f"XLA / plain time per consistency step: {ms_per_step['consistency (XLA)'] / ms_per_step['consistency']:.2f}")
    print("\nprediction throughput again:", ", ".join(f"{k} {v:.0f} images/s" for k, v in throughput.items()))
    print("(each round's time includes its test-set evaluation; rounds also predicts the whole pool)")


if __name__ == "__main__":
    main()
