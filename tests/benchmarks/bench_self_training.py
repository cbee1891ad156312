"""Benchmark of the self-training recipe: time per student round of each method, with and
without XLA compilation of the training steps (``--jit``); the consistency step as one graph
against the same work in four calls, and in float32 against mixed_bfloat16 (``--precision``);
and the prediction throughput on the unlabeled pool
(images/s), batch prediction through ``tf.data`` against a Python loop over the same batches,
side by side in one run."""

from __future__ import annotations

import dataclasses
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from common import data
from recipes import self_training as st

BATCH = 1024
STEPS_PER_ROUND = 300  # two short rounds per setting keep the benchmark to a few minutes
DISPATCH_STEPS = 200


def prediction_throughput(model, pool: np.ndarray) -> dict[str, float]:
    """Images per second over the whole pool: tf.data + model.predict vs a Python loop of model calls."""
    st.predict_probabilities(model, pool[:BATCH])  # build the predict function once
    start = time.perf_counter()
    via_tf_data = st.predict_probabilities(model, pool, batch_size=BATCH)
    tf_data_seconds = time.perf_counter() - start

    start = time.perf_counter()
    loop = [
        tf.nn.softmax(st.float32_logits(model, pool[i : i + BATCH], False)).numpy() for i in range(0, len(pool), BATCH)
    ]
    loop_seconds = time.perf_counter() - start
    np.testing.assert_allclose(np.concatenate(loop), via_tf_data, atol=1e-4)
    return {"tf.data": len(pool) / tf_data_seconds, "python loop": len(pool) / loop_seconds}


def consistency_step_in_four_calls(trainer: st.Trainer):
    """The consistency step as the recipe ran it before: weak views, teacher, strong view and
    update as four separately dispatched functions (the same layers, so the same random draws)."""
    teach = tf.function(lambda u: tf.nn.softmax(st.float32_logits(trainer.ema_model, u, training=False)))

    def step(x, y, u):
        x = trainer.augment_weak(x)
        probabilities = teach(trainer.augment_weak(u))
        pseudo_labels = tf.argmax(probabilities, axis=1)
        mask = tf.cast(tf.reduce_max(probabilities, axis=1) >= trainer.config.threshold, tf.float32)
        return (*trainer.pseudo_step(x, y, trainer.augment_strong(u), pseudo_labels, mask), pseudo_labels, mask)

    return step


def consistency_step_dispatch(dataset: data.Dataset, split: st.Split, config: st.Config,
                              steps: int = DISPATCH_STEPS, block: int = 25) -> dict[str, float]:  # fmt: skip
    """ms per consistency step, one graph vs four calls, from the same weights on the same batches,
    timed in alternating blocks of ``block`` steps (so both see the same machine); both must end
    at the same weights."""
    model = st.build_model(dataset, config)
    steppers, trainers = {}, {}
    for name in ("one graph", "four calls"):
        keras.utils.set_random_seed(config.seed)  # the clones' dropout layers draw their seeds from it
        student, ema = st.copy_model(model, "student"), st.copy_model(model, "ema")
        trainer = st.Trainer(student, ema, 1000, config, dataset.input_shape[0])
        trainers[name] = trainer
        steppers[name] = trainer.consistency_step if name == "one graph" else consistency_step_in_four_calls(trainer)
    ms = time_alternating(steppers, split, config, steps, block)
    for one, four in zip(trainers["one graph"].model.get_weights(), trainers["four calls"].model.get_weights()):
        np.testing.assert_allclose(one, four, rtol=1e-4, atol=1e-5)
    return ms


def consistency_step_precision(dataset: data.Dataset, split: st.Split, config: st.Config,
                               steps: int = DISPATCH_STEPS, block: int = 25) -> dict[str, float]:  # fmt: skip
    """ms per consistency step of the same network computing in float32 and in mixed_bfloat16,
    timed in alternating blocks of ``block`` steps on the same batches."""
    steppers = {}
    for precision in ("float32", "mixed_bfloat16"):
        precise = dataclasses.replace(config, precision=precision)
        model = st.build_model(dataset, precise)
        trainer = st.Trainer(model, st.copy_model(model, "ema"), 1000, precise, dataset.input_shape[0])
        steppers[precision] = trainer.consistency_step
    return time_alternating(steppers, split, config, steps, block)


def time_alternating(steppers: dict, split: st.Split, config: st.Config, steps: int, block: int) -> dict[str, float]:
    """ms per step of each consistency step function on the same random batches, timed in
    alternating blocks of ``block`` steps so that every one sees the same machine."""
    rng = np.random.default_rng(0)
    n_unlabeled = config.batch_size * config.unlabeled_ratio
    batches = [(rng.choice(len(split.x_labeled), config.batch_size), rng.choice(len(split.x_unlabeled), n_unlabeled))
               for _ in range(steps + 10)]  # fmt: skip
    seconds = dict.fromkeys(steppers, 0.0)

    def run(name, chunk):
        for idx, uidx in chunk:
            loss, *_ = steppers[name](split.x_labeled[idx], split.y_labeled[idx], split.x_unlabeled[uidx])
            float(loss)  # the recipe's loop reads the loss every step, which waits for it

    for name in steppers:  # the first steps trace the functions
        run(name, batches[:10])
    for first in range(10, len(batches), block):
        for name in steppers:
            start = time.perf_counter()
            run(name, batches[first : first + block])
            seconds[name] += time.perf_counter() - start
    return {name: 1000 * total / steps for name, total in seconds.items()}


def main() -> None:
    dataset = data.load_dataset("fashion_mnist")
    print("prediction on the unlabeled pool (default split: 59,000 images), batch", BATCH)
    config = st.Config()
    split = st.split_data(dataset, config)
    model = st.build_model(dataset, config)
    throughput = prediction_throughput(model, split.x_unlabeled)
    for name, rate in throughput.items():
        print(f"  {name:<12} {rate:>8.0f} images/s")

    for ratio in (config.unlabeled_ratio, 1):  # the default batch, and one unlabeled image per labeled one
        step_config = st.Config(unlabeled_ratio=ratio)
        print(
            f"\nconsistency step ({step_config.batch_size} labeled + {step_config.batch_size * ratio} unlabeled images):"
        )
        dispatch = consistency_step_dispatch(dataset, split, step_config)
        for name, ms in dispatch.items():
            print(f"  {name:<12} {ms:>8.1f} ms/step")
        print(f"four calls / one graph time per step: {dispatch['four calls'] / dispatch['one graph']:.2f}")

    for width in (config.width, 24):  # the default network, and the 1.5-times wider one of the docstring
        print(f"\nconsistency step by --precision, width {width} (auto here: {st.resolve_precision('auto')}):")
        by_precision = consistency_step_precision(dataset, split, dataclasses.replace(config, width=width))
        for name, ms in by_precision.items():
            print(f"  {name:<15} {ms:>8.1f} ms/step")
        print(f"float32 / mixed_bfloat16 time per step: {by_precision['float32'] / by_precision['mixed_bfloat16']:.2f}")

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
