#!/usr/bin/env python
"""Train the LSTM MNIST / Fashion-MNIST classifier and report its test accuracy.

Each 28x28 image is read as 28 timesteps of 28 pixels scaled to [0, 1]; a stack of LSTM
layers (output dropout on every layer) feeds its last step's output to a linear softmax
layer, trained with Adam on batches of 128.

    python scripts/train.py --layers 3                               # MNIST (downloads it)
    python scripts/train.py --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist
    python scripts/train.py --workdir runs/x --resume                # continue a run

The work directory gets checkpoints/ (orbax: latest few + best by validation accuracy),
metrics.jsonl and curves.png. A work directory that already holds checkpoints is refused
unless --resume (continue from the latest; flags you give explicitly override the stored
configuration, except the model/data ones: --dataset --layers --hidden --forget-bias
--val-size) or --overwrite (delete them and start over).

Exit codes: 0 success, 2 bad input (one line on stderr), 1 training diverged (NaN loss).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

DEFAULT_WORKDIR = "runs/lstm"


def build_parser() -> argparse.ArgumentParser:
    from lstm_jax._train import SCHEDULES, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the LSTM image classifier (rows as timesteps) and evaluate it on the test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default=d.dataset, help="which dataset")
    g.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the 4 IDX files (gzipped or raw); unset: download them with TFDS's checksums")
    g.add_argument("--val-size", type=int, default=d.val_size,
                   help="validation images held out from the end of the training file (for a 60,000-image "
                        "training set; smaller sets get a proportionate split; 0 = none)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=d.layers, help="stacked LSTM layers")
    g.add_argument("--hidden", type=int, default=d.hidden, help="units per LSTM layer")
    g.add_argument("--forget-bias", type=float, default=d.forget_bias, help="added to the forget gates")
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="output-dropout rate of every LSTM layer (1 - keep probability)")
    g.add_argument("--recurrent-dropout", type=float, default=d.recurrent_dropout,
                   help="dropout rate of the recurrent h (one mask per sequence)")
    g.add_argument("--variational", action=argparse.BooleanOptionalAction, default=d.variational,
                   help="reuse one output-dropout mask per sequence at every timestep")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--steps", type=int, default=d.steps, help="training steps (batches)")
    g.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default=d.matmul_dtype,
                   help="the LSTM's matmul operands: bfloat16 (float32 accumulation, float32 weights, gates and "
                        "cell state) is faster on bfloat16 matrix units: GPU, TPU, CPUs with AMX-BF16/AVX512-BF16")
    g.add_argument("--epochs", type=float, default=d.epochs, help="train this many epochs (of the training split) instead of --steps")
    g.add_argument("--lr", type=float, default=d.lr, help="peak Adam learning rate")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warmup steps of warmup_cosine; unset: min(500, steps/20)")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help="clip gradients to this global norm (optax.clip_by_global_norm); 0 = no clipping")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation, data order and dropout")
    g = p.add_argument_group("evaluation, checkpoints and output")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate on the validation set every N steps")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=d.log_every, help="fetch and show the training metrics every N steps")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size of evaluation")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="latest checkpoints kept (the best one is kept in addition)")
    g.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where checkpoints, metrics.jsonl and curves.png go")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the checkpoints and metrics already in --workdir and start over")
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations the user set on the command line."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # noqa: SLF001 - a copy with every default suppressed
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):
                probe.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            elif action.nargs == 0:
                probe.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                probe.add_argument(*action.option_strings, **kwargs)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def _fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"train.py: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # argparse's own errors are "usage: ..." + "error: ..." lines; make them one line.
    parser.error = lambda message: _fail(message)  # type: ignore[method-assign]
    args = parser.parse_args(argv)

    import lstm_jax

    # Before JAX starts its threads: each training step reuses the memory of the last one
    # instead of page-faulting it in again (lstm_jax/_memory.py).
    lstm_jax.retain_freed_memory()
    from lstm_jax import data
    from lstm_jax._train import (ConfigError, NonFiniteLossError, TrainConfig, enable_compilation_cache,
                                 train_and_evaluate)

    enable_compilation_cache()

    fields = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("clip_norm") == 0:
        values["clip_norm"] = None
    if values.get("data_dir") is not None:
        if not values["data_dir"].strip():
            _fail("--data-dir is empty")
        values["data_dir"] = os.path.abspath(os.path.expanduser(values["data_dir"]))
    explicit = _explicit_flags(parser, argv) & fields
    requested = {k: values[k] for k in explicit}
    if args.resume and "data_dir" not in explicit:
        requested.pop("data_dir", None)
    try:
        config = TrainConfig(**values)
        if not args.resume:
            config.validate()
        else:
            TrainConfig(**{**TrainConfig().to_dict(), **requested}).validate()
        result = train_and_evaluate(config, args.workdir, resume=args.resume, overwrite=args.overwrite,
                                    requested=requested)
    except (ConfigError, data.DataError) as e:
        _fail(str(e))
    except NonFiniteLossError as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        print("train.py: interrupted; resume with --resume", file=sys.stderr, flush=True)
        return 130

    best = f"best checkpoint (step {result.best_step}"
    best += f", val accuracy {100 * result.best_val_accuracy:.2f}%)" if result.best_val_accuracy is not None else ")"
    print(f"trained {result.final_step} steps in {result.wall_time / 60:.1f} min")
    if result.final_val is not None:
        print(f"final validation accuracy: {100 * result.final_val['accuracy']:.2f}%")
    print(f"final-step test accuracy: {100 * result.final_test_accuracy:.2f}%")
    print(f"workdir: {result.workdir}")
    print(f"  checkpoints: {result.files['checkpoints']}")
    print(f"  metrics:     {result.files['metrics']}")
    print(f"  curves:      {result.files['curves']}")
    print(f"test accuracy ({best}, {result.test_examples} test images): {100 * result.test_accuracy:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
