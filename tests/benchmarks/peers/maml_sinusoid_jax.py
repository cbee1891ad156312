"""The JAX peer of recipes/maml.py's sinusoid meta-training: the same computation, written as a JAX user would.

Second-order MAML on the paper's sine family (A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]),
MLP 1-40-40-1 (ReLU, Glorot-uniform kernels, zero biases as Keras initialises them), meta-batch
25, K = 10 support + 10 query points, one inner SGD step of 0.01, Adam 1e-3 outer: ``jax.vmap``
over the tasks, ``jax.grad`` through the inner step, optax Adam, tasks drawn inside the compiled
function with ``jax.random``. ``--steps-per-call 1`` is one ``jax.jit`` call per meta-iteration
(the usual JAX training loop); more runs that many meta-iterations per call in a
``jax.lax.fori_loop``.

Run in its own virtualenv (``tests/benchmarks/peers/requirements-peers.txt``, installed by
``make bench``); it prints one JSON line: meta-iterations per second over the timed iterations
and the post-adaptation MSE (one SGD step) on 600 fixed test tasks, the same tasks
``tests/benchmarks/bench_maml.py`` scores the TensorFlow side on.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

AMPLITUDE, PHASE, X_RANGE = (0.1, 5.0), (0.0, np.pi), (-5.0, 5.0)
META_BATCH, K, QUERY, ALPHA, META_LR = 25, 10, 10, 0.01, 1e-3


def init_params(key):
    """Glorot-uniform kernels, zero biases (Keras' Dense defaults): 1 -> 40 -> 40 -> 1."""
    params = []
    for fan_in, fan_out in ((1, 40), (40, 40), (40, 1)):
        key, sub = jax.random.split(key)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params.append((jax.random.uniform(sub, (fan_in, fan_out), minval=-limit, maxval=limit), jnp.zeros(fan_out)))
    return params


def forward(params, x):
    for i, (w, b) in enumerate(params):
        x = x @ w + b
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def loss(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def adapt(params, x, y):
    grads = jax.grad(loss)(params, x, y)
    return jax.tree.map(lambda p, g: p - ALPHA * g, params, grads)


def query_loss(params, xs, ys, xq, yq):
    return loss(adapt(params, xs, ys), xq, yq)


def meta_loss(params, tasks):
    return jnp.mean(jax.vmap(query_loss, in_axes=(None, 0, 0, 0, 0))(params, *tasks))


def sample_tasks(key):
    ka, kp, kx = jax.random.split(key, 3)
    amplitude = jax.random.uniform(ka, (META_BATCH, 1, 1), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(kp, (META_BATCH, 1, 1), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(kx, (META_BATCH, K + QUERY, 1), minval=X_RANGE[0], maxval=X_RANGE[1])
    y = amplitude * jnp.sin(x - phase)
    return x[:, :K], y[:, :K], x[:, K:], y[:, K:]


optimizer = optax.adam(META_LR)


def meta_iteration(state):
    params, opt_state, key, _ = state
    key, sub = jax.random.split(key)
    value, grads = jax.value_and_grad(meta_loss)(params, sample_tasks(sub))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key, value


def make_train(steps_per_call: int):
    if steps_per_call == 1:
        return jax.jit(meta_iteration)
    return jax.jit(lambda state: jax.lax.fori_loop(0, steps_per_call, lambda _, s: meta_iteration(s), state))


def test_tasks(seed: int = 0, count: int = 600, query: int = 100):
    """recipes.maml.sinusoid_test_tasks (the same numpy draws): support and query of ``count`` new tasks."""
    rng = np.random.default_rng(seed + 10_000)
    amplitude = rng.uniform(*AMPLITUDE, size=(count, 1, 1))
    phase = rng.uniform(*PHASE, size=(count, 1, 1))
    x = rng.uniform(*X_RANGE, size=(count, K + query, 1))
    y = amplitude * np.sin(x - phase)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x[:, :K], y[:, :K], x[:, K:], y[:, K:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="timed meta-iterations")
    parser.add_argument("--warmup", type=int, default=200, help="meta-iterations before timing (compilation)")
    parser.add_argument("--steps-per-call", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    key = jax.random.PRNGKey(args.seed)
    key, init_key = jax.random.split(key)
    params = init_params(init_key)
    state = (params, optimizer.init(params), key, jnp.zeros(()))
    train = make_train(args.steps_per_call)
    calls = lambda n: max(1, n // args.steps_per_call)  # noqa: E731
    for _ in range(calls(args.warmup)):
        state = train(state)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls(args.iterations)):
        state = train(state)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    done = calls(args.iterations) * args.steps_per_call
    tasks = test_tasks(args.seed)
    per_task = jax.jit(jax.vmap(query_loss, in_axes=(None, 0, 0, 0, 0)))
    record = {
        "peer": "jax",
        "jax": jax.__version__,
        "steps_per_call": args.steps_per_call,
        "iterations": done,
        "seconds": seconds,
        "iterations_per_second": done / seconds,
        "mse_after_1_step": float(jnp.mean(per_task(state[0], *tasks))),
        "training_iterations": calls(args.warmup) * args.steps_per_call + done,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
