"""Images per second of training, one process against two local workers (MultiWorkerMirroredStrategy).

The seed recipe's CNN trains on Fashion-MNIST source images, global batch 64, measured over
the epochs after the first (which traces). Side by side in one run: one process with
``fit``, one process with the shared distributed step, and two workers on 127.0.0.1 (each
its own process, CPU only). On one machine the workers share its cores, so expect no
speed-up: the figure shows the overhead of the all-reduce and is there to be re-run on real
hosts (``python -m tests.benchmarks.bench_multi_worker``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES, EPOCHS, BATCH = 4000, 3, 64


def worker(path: str) -> None:
    """One process's measurement: train, then the chief writes ``{"images_per_second": ...}`` to ``path``."""
    import os

    import tensorflow as tf

    from common import data, distributed, models
    from common.cli import make_strategy, set_seed

    name = os.environ.get("BENCH_STRATEGY", "default")
    strategy = make_strategy(name)
    set_seed(0)
    source = data.select_classes(data.load_dataset("fashion_mnist"), list(range(5)))
    x, y = source.x_train[:IMAGES], source.y_train[:IMAGES]
    with strategy.scope():
        model = models.compile_classifier(models.build_cnn(source.input_shape, source.num_classes), 1e-3)
    train = data.make_pipeline(x, y, BATCH, shuffle=True, seed=0)
    if os.environ.get("BENCH_PATH") == "step":
        history = distributed.distributed_fit(model, train, EPOCHS, strategy, verbose=0)
    else:
        history = distributed.train(model, train, EPOCHS, strategy, verbose=0)
    seconds = sum(history["epoch_seconds"][1:])
    if distributed.is_chief():
        Path(path).write_text(json.dumps({"images_per_second": IMAGES * (EPOCHS - 1) / seconds}))
    del tf


def measure(env: dict, workers: int = 1) -> float:
    import os

    from common import distributed

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "tests.benchmarks.bench_multi_worker", "--worker", str(out)]
        environment = dict(os.environ, **env, CUDA_VISIBLE_DEVICES="")
        if workers == 1:
            subprocess.run(command, env=environment, check=True, timeout=900, capture_output=True)
        else:
            processes = distributed.launch_local(command, workers, log_dir=folder, env=env)
            try:
                codes = [p.wait(timeout=900) for p in processes]
            finally:
                for p in processes:
                    p.kill()
            if any(codes):
                raise RuntimeError(f"a worker failed: {(Path(folder) / 'worker-0.log').read_text()[-2000:]}")
        return json.loads(out.read_text())["images_per_second"]


def main() -> None:
    rows = [
        ("1 process, fit", measure({})),
        ("1 process, shared distributed step", measure({"BENCH_PATH": "step"})),
        ("2 local workers, multi_worker", measure({"BENCH_STRATEGY": "multi_worker"}, workers=2)),
    ]
    print(f"CNN training, {IMAGES} images x {EPOCHS - 1} timed epochs, global batch {BATCH}, CPU")
    base = rows[0][1]
    for name, rate in rows:
        print(f"  {name:<36} {rate:8.0f} images/s  ({rate / base:.2f}x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
