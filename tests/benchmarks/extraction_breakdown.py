"""Diagnostic for issue 32: where the cached-feature path's extraction time goes.

The setting of ``bench_feature_extraction`` (MobileNetV2, weights none, BatchNorm statistics from
the images, 96x96, 2,000 Fashion-MNIST images of classes 5-9). Three rounds, alternating: the
forward pass alone on batches prepared beforehand (batch 16, 32, 64, 128) and the whole
``bases.extract_features`` (a fresh extractor traced, images streamed) at batch 32 and 128; then
the one-off tracing cost and the preparation (resize, grey -> RGB, preprocessing) alone.
``python -m tests.benchmarks.extraction_breakdown``; results in docs/speed.md.
"""

from __future__ import annotations

import os
import time

import tensorflow as tf

from common import bases, data
from recipes import feature_extraction as fe
from tests.benchmarks.bench_feature_extraction import calibrate_batchnorm


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(images: int = 2000, rounds: int = 3) -> None:
    config = fe.Config(base="mobilenet_v2", weights="none", image_size=96)
    target = data.select_classes(data.load_dataset("fashion_mnist"), data.parse_classes(config.target_classes))
    x = target.x_train[data.sample_per_class(target.y_train, images // target.num_classes, 0)]
    base = fe.load_pretrained_base(config, source=None)
    calibrate_batchnorm(base.model, base.prepare(x[:256]))
    extractor = bases.feature_extractor(base)
    spec = [tf.TensorSpec((None, *base.input_shape), tf.float32)]
    embed = tf.function(lambda batch: extractor(batch, training=False), input_signature=spec)
    print(f"trace + first call: {seconds(lambda: embed(tf.zeros((1, *base.input_shape)))):.2f} s")
    prepared = {size: list(data.image_stream(x, base.input_shape, base.preprocess, size)) for size in (16, 32, 64, 128)}
    prep = seconds(lambda: list(data.image_stream(x, base.input_shape, base.preprocess, 128)))
    print(f"preparation alone (batch 128): {prep:.2f} s")
    for round_ in range(rounds):
        for size, batches in prepared.items():
            forward = seconds(lambda batches=batches: [embed(b) for b in batches])
            print(f"round {round_}: forward only, batch {size}: {forward:.2f} s (load {os.getloadavg()[0]:.1f})")
        for size in (32, 128):
            _, total = bases.extract_features(base, x, batch_size=size)
            print(f"round {round_}: extract_features, batch {size}: {total:.2f} s", flush=True)


if __name__ == "__main__":
    main()
