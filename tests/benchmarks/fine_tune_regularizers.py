"""Does regularised fine-tuning beat the head alone? Every phase-2 variant from the same phase 1.

Per base, label budget and seed: the fine_tune recipe's split (``--labels-per-class`` B plus 10
validation images per class, Fashion-MNIST 5-9), its phase 1 (the head on the frozen base,
early stopping) run once, then each phase-2 variant from a copy of that phase-1 model, with
the recipe's defaults otherwise (20 epochs at lr 1e-4, BatchNorm frozen):

- ``head_only``: phase 1 alone (what every variant must beat);
- ``plain``: ``--schedule blocks:1``; ``plain_es``, ``all_plain_es``: with early stopping in phase 2
  too (``--fine-tune-patience 5``, the best validation epoch kept); ``l2sp_A``, ``bss_E``: the same with ``--regularizer`` at
  strength A (``--l2sp-alpha``) or E (``--bss-eta``);
- ``all_plain``, ``all_l2sp_A``, ``all_decay_D``: every block unfrozen (``blocks:N``, N = the
  base's blocks), plain, with L2-SP, or with ``--layer-lr-decay D``.

Prints test accuracy per variant (mean and range over seeds) and its gain over head_only.

    python -m tests.benchmarks.fine_tune_regularizers [--base source-cnn] [--budgets 10 50 200] [--seeds 0 1 2]
        [--alphas 0.01 1] [--etas 0.001 0.1] [--decays 0.5] [--only plain all_decay_0.5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from common import bases, evaluation
from common.cli import set_seed
from recipes import fine_tune as ft


def variants(alphas: list[float], etas: list[float], decays: list[float]) -> dict[str, dict]:
    """The phase-2 settings compared: plain, then each strength of each regulariser ("all": every block)."""
    out = {"plain": dict(schedule="blocks:1"), "all_plain": dict(schedule="all"),
           "plain_es": dict(schedule="blocks:1", fine_tune_patience=5),
           "all_plain_es": dict(schedule="all", fine_tune_patience=5)}  # fmt: skip
    for alpha in alphas:
        out[f"l2sp_{alpha:g}"] = dict(schedule="blocks:1", regularizer="l2sp", l2sp_alpha=alpha)
        out[f"all_l2sp_{alpha:g}"] = dict(schedule="all", regularizer="l2sp", l2sp_alpha=alpha)
    for eta in etas:
        out[f"bss_{eta:g}"] = dict(schedule="blocks:1", regularizer="bss", bss_eta=eta)
    for decay in decays:
        out[f"all_decay_{decay:g}"] = dict(schedule="all", layer_lr_decay=decay)
    return out


def measure(config: ft.Config, settings: dict[str, dict]) -> dict[str, float]:
    """Test accuracy of head_only and of every phase-2 variant, one seed and budget."""
    set_seed(config.seed)
    source, target = ft.load_tasks(config)
    splits = ft.split_target(target, config)
    loaded = ft.load_pretrained_base(config, source)
    set_seed(config.seed)
    base = bases.fresh_copy(loaded)
    ds = ft.pipelines(splits, base, config)
    x_test, y_test = base.prepare(splits["test"][0]), splits["test"][1]
    n = target.num_classes
    model = ft.build_model(base.model, n, config.dropout, config.learning_rate)
    ft.train_head(model, ds["train"], ds["val"], config)
    phase1 = model.get_weights()
    accuracy = {"head_only": evaluation.classification_report(model, x_test, y_test, n)["test_accuracy"]}
    blocks = len(bases.weight_blocks(loaded.model))
    for name, overrides in settings.items():
        if overrides["schedule"] == "all":
            overrides = overrides | {"schedule": f"blocks:{blocks}"}
        set_seed(config.seed)
        copy = ft.build_model(bases.fresh_copy(loaded).model, n, config.dropout, config.learning_rate)
        copy.set_weights(phase1)
        ds = ft.pipelines(splits, base, config)  # the same batches for every variant
        ft.fine_tune(copy, ds["train"], ds["val"], replace(config, **overrides))
        accuracy[name] = evaluation.classification_report(copy, x_test, y_test, n)["test_accuracy"]
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="source-cnn")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-images", type=int, default=0)
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.01, 1.0], help="L2-SP strengths")
    parser.add_argument("--etas", type=float, nargs="*", default=[1e-3, 0.1], help="BSS strengths")
    parser.add_argument("--decays", type=float, nargs="*", default=[0.5], help="layer-wise learning-rate decays")
    parser.add_argument("--only", nargs="*", default=[], help="run only these variants, e.g. plain all_decay_0.5")
    args = parser.parse_args(argv)
    settings = variants(args.alphas, args.etas, args.decays)
    unknown = sorted(set(args.only) - set(settings))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not a variant here; choose from {', '.join(settings)}")
    settings = {k: v for k, v in settings.items() if not args.only or k in args.only}
    for budget in args.budgets:
        start = time.perf_counter()
        runs = []
        for seed in args.seeds:
            config = ft.Config(base=args.base, labels_per_class=budget, seed=seed, test_images=args.test_images)
            runs.append(measure(config.resolved(), settings))
            print(f"  {args.base}, {budget} labels/class, seed {seed}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)  # fmt: skip
        print(f"\n{args.base}, {budget} labels per class, seeds {args.seeds} ({time.perf_counter() - start:.0f} s):")
        head = np.array([r["head_only"] for r in runs])
        for name in runs[0]:
            values = np.array([r[name] for r in runs])
            gain = 100 * (values - head)
            print(f"  {name:<10} {values.mean():.1%} ({values.min():.1%}-{values.max():.1%})  "
                  f"vs head_only {gain.mean():+.1f} ({gain.min():+.1f} to {gain.max():+.1f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
