#!/usr/bin/env python
"""Evaluate a trained LSTM classifier on the full test set.

    python scripts/evaluate.py --workdir runs/lstm

Loads the best checkpoint (highest validation accuracy; --step for another one) from
WORKDIR/checkpoints, rebuilds the model from the configuration stored in it, prints the test
accuracy and the 10x10 confusion matrix (rows: true class, columns: predicted) and saves
WORKDIR/errors.png, a grid of misclassified test images with predicted and true labels.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Boot"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="runs/lstm", help="the training run's work directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the best)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: the one stored in the checkpoint's configuration)")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--max-errors", type=int, default=64, help="misclassified images shown in errors.png")
    return p


def _fail(message: str, code: int = 2):
    print(f"evaluate.py: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None) -> int:
    parser = build_parser()
    parser.error = lambda message: _fail(message)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        _fail(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if args.max_errors < 0:
        _fail(f"--max-errors must be an integer >= 0, got {args.max_errors}")
    if args.data_dir is not None and not args.data_dir.strip():
        _fail("--data-dir is empty")

    from lstm_jax import data
    from lstm_jax._metrics import plot_errors
    from lstm_jax._train import (MATMUL_DTYPES, ConfigError, confusion_matrix, enable_compilation_cache, evaluate,
                                 restore_run)

    enable_compilation_cache()

    try:
        state, config, step = restore_run(args.workdir, step=args.step)
        data_dir = args.data_dir if args.data_dir is not None else config.data_dir
        splits = data.load_dataset(config.dataset, data_dir=data_dir, val_size=config.val_size)
    except (ConfigError, data.DataError) as e:
        _fail(str(e))

    result = evaluate(state.params, splits.test_images, splits.test_labels, batch_size=args.batch_size,
                      forget_bias=config.forget_bias, matmul_dtype=MATMUL_DTYPES.get(config.matmul_dtype),
                      return_predictions=True)
    preds = result["predictions"]
    cm = confusion_matrix(splits.test_labels, preds, data.NUM_CLASSES)
    names = CLASS_NAMES.get(config.dataset, [str(i) for i in range(data.NUM_CLASSES)])

    print(f"checkpoint: step {step} of {os.path.abspath(args.workdir)} "
          f"({config.dataset}, {config.layers}x{config.hidden} LSTM)")
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({result['correct']}/{result['num_examples']}), "
          f"test loss {result['loss']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted class):")
    width = max(6, len(str(int(cm.max()))) + 1)
    label_w = max(len(n) for n in names) + 1
    print(" " * label_w + "".join(f"{i:>{width}d}" for i in range(data.NUM_CLASSES)) + f"{'recall':>9}")
    for i, row in enumerate(cm):
        recall = row[i] / max(row.sum(), 1)
        print(f"{names[i]:<{label_w}}" + "".join(f"{v:>{width}d}" for v in row) + f"{100 * recall:8.1f}%")
    errors_path = os.path.join(args.workdir, "errors.png")
    shown = plot_errors(errors_path, splits.test_images, splits.test_labels, preds, class_names=names,
                        max_images=args.max_errors,
                        title=f"misclassified test images ({result['num_examples'] - result['correct']} in all), "
                              f"step {step}")
    print(f"errors: {os.path.abspath(errors_path)} ({shown} misclassified images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
