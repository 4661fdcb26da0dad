"""Training the sequence classifier: train state, optimizer, the jitted train step and
batched evaluation.

The pieces are pure and composable (Flax-examples style)::

    optimizer = make_optimizer(1e-3, steps=4000, clip_norm=5.0, schedule="cosine")
    state = create_train_state(jax.random.PRNGKey(0), params, optimizer)
    train_step = make_train_step(optimizer, dropout=0.5)   # jitted once, state donated
    for images, labels in batches:
        state, metrics = train_step(state, images, labels)  # metrics stay on the device
    results = evaluate(state.params, val_images, val_labels, batch_size=1000)

Images may be given as uint8 pixels ``[B, T, in]`` (scaled to [0, 1] inside the step,
exactly as :func:`lstm_jax.data.to_sequences` does) or as floating-point sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lstm_jax import _checks
from lstm_jax._classifier import ClassifierParams, check_classifier_params, classify

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")
# --matmul-dtype: the LSTM's matmul operands (None: the parameters' float32). bfloat16 pays on
# bfloat16 matrix units (GPU, TPU, CPUs with AMX-BF16/AVX512-BF16); the weights, the optimiser
# state, the gate math and the cell state stay float32 either way, so a run may switch on resume.
MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
      params: the model's parameters (:class:`ClassifierParams`).
      opt_state: the optax optimizer state.
      step: int32 scalar array, the number of steps taken.
      key: PRNG key (``jax.random.PRNGKey`` layout, uint32 ``[2]``) from which each step's
        dropout key is split, so that the randomness is part of the state (exact resume).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def _check_positive_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return int(v)


def _check_positive_float(v, name: str, allow_none: bool = False) -> Optional[float]:
    if v is None and allow_none:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {v!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    return f


def make_schedule(
    lr: float,
    steps: int,
    schedule: str = "warmup_cosine",
    *,
    warmup_steps: Optional[int] = None,
    final_lr_fraction: float = 0.0,
) -> optax.Schedule:
    """The learning-rate schedule ``step -> lr``.

    Args:
      lr: peak learning rate.
      steps: total training steps (the decay ends there).
      schedule: ``"constant"``; ``"cosine"`` (cosine decay from ``lr`` to
        ``final_lr_fraction * lr``); ``"warmup_cosine"`` (linear warmup from 0 over
        ``warmup_steps``, then cosine decay); ``"linear"`` (linear decay to
        ``final_lr_fraction * lr``).
      warmup_steps: for ``"warmup_cosine"``; default ``min(500, steps // 20)``.
      final_lr_fraction: the decayed schedules end at this fraction of ``lr``.
    """
    lr = _check_positive_float(lr, "lr")
    steps = _check_positive_int(steps, "steps")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= float(final_lr_fraction) <= 1.0:
        raise ValueError(f"final_lr_fraction: expected a number in [0, 1], got {final_lr_fraction!r}")
    end = lr * float(final_lr_fraction)
    if schedule == "constant":
        return optax.constant_schedule(lr)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps, alpha=float(final_lr_fraction))
    if schedule == "linear":
        return optax.linear_schedule(lr, end, steps)
    if warmup_steps is None:
        warmup_steps = min(500, steps // 20)
    warmup_steps = _check_positive_int(warmup_steps, "warmup_steps", minimum=0)
    if warmup_steps >= steps:
        raise ValueError(f"warmup_steps: expected fewer than steps ({steps}), got {warmup_steps}")
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(lr, steps, alpha=float(final_lr_fraction))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, end_value=end)


def make_optimizer(
    lr: float = 1e-3,
    steps: int = 1,
    clip_norm: Optional[float] = None,
    schedule: str = "warmup_cosine",
    *,
    warmup_steps: Optional[int] = None,
    final_lr_fraction: float = 0.0,
) -> optax.GradientTransformation:
    """Adam with an optional global-norm gradient clip and a learning-rate schedule.

    Args:
      lr: peak learning rate (1e-3 in the tutorials).
      steps: total training steps (length of the schedule).
      clip_norm: if not None, ``optax.clip_by_global_norm(clip_norm)`` before Adam.
      schedule: see :func:`make_schedule` (``"constant"`` is the tutorials' fixed lr).
      warmup_steps, final_lr_fraction: see :func:`make_schedule`.

    Returns:
      An ``optax.GradientTransformation``.
    """
    clip_norm = _check_positive_float(clip_norm, "clip_norm", allow_none=True)
    sched = make_schedule(lr, steps, schedule, warmup_steps=warmup_steps, final_lr_fraction=final_lr_fraction)
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adam(sched))
    return optax.chain(*parts)


def create_train_state(key: jax.Array, params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` at step 0.

    Args:
      key: PRNG key for the dropout masks of every future step (uint32 ``[2]``, as
        ``jax.random.PRNGKey`` returns; new-style typed keys are converted).
      params: the initial parameters.
      optimizer: the optax optimizer (its ``init`` builds ``opt_state``).
    """
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"key: expected a PRNG key (uint32 [2], jax.random.PRNGKey), got {key.dtype} {tuple(key.shape)}")
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), key=key)


def as_sequences(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1] (``x * (1/255)``, as :func:`data.to_sequences`);
    floating inputs are returned unchanged."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8:
        raise TypeError(f"images: expected uint8 pixels or a floating array, got dtype {images.dtype}")
    return images.astype(jnp.float32) * jnp.float32(1.0 / 255.0)


def _check_batch(images, labels, name_images="images", name_labels="labels"):
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"{name_images}: expected an array [batch, time, features], got {type(images).__name__}")
    if len(images.shape) != 3:
        raise ValueError(f"{name_images}: expected rank 3 [batch, time, features], got shape {tuple(images.shape)}")
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        raise TypeError(f"{name_labels}: expected an int array [batch], got {type(labels).__name__}")
    if tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"{name_labels}: expected shape [{images.shape[0]}] (one per image), got {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name_labels}: expected an integer array, got dtype {labels.dtype}")


def loss_and_metrics(logits: jax.Array, labels: jax.Array, weights: Optional[jax.Array] = None) -> dict:
    """Summed cross-entropy and correct predictions (sums, so batches add up exactly).

    Returns a dict of scalars: ``loss_sum``, ``correct`` (float32) and ``count``.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if weights is None:
        weights = jnp.ones_like(losses)
    return {
        "loss_sum": jnp.sum(losses * weights),
        "correct": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    dropout: float = 0.5,
    recurrent_dropout: float = 0.0,
    variational: bool = False,
    forget_bias: float = 1.0,
    impl: Literal["fused", "scan"] = "fused",
    unroll: int = 1,
    matmul_dtype=None,
    donate: bool = True,
):
    """Builds the training step, jitted once.

    Args:
      optimizer: the optax optimizer whose state is in ``TrainState.opt_state``.
      dropout: output-dropout rate of every LSTM layer (1 - keep probability; 0.5 in the
        tutorials).
      recurrent_dropout, variational, forget_bias, impl, unroll, matmul_dtype: see
        :func:`classify`.
      donate: donate the input state's buffers (``donate_argnums=(0,)``); the state passed
        in must not be used again.

    Returns:
      ``train_step(state, images, labels) -> (state, metrics)``: one Adam step on the mean
      cross-entropy of the batch. ``images`` ``[B, T, in]`` (uint8 pixels or floats),
      ``labels`` ``[B]`` ints. The step splits ``state.key`` into the next state's key
      and this step's dropout key. ``metrics`` is a dict of device scalars: ``loss``
      (mean), ``loss_sum``, ``correct``, ``count``, ``grad_norm`` -- fetch them lazily.
      The function has a ``trace_count()`` attribute (number of times it was traced).
    """
    dropout = _checks.check_rate(dropout, "dropout")
    recurrent_dropout = _checks.check_rate(recurrent_dropout, "recurrent_dropout")
    if not hasattr(optimizer, "update") or not hasattr(optimizer, "init"):
        raise TypeError(f"optimizer: expected an optax.GradientTransformation, got {type(optimizer).__name__}")
    traces = [0]

    def train_step(state: TrainState, images, labels):
        traces[0] += 1
        if not isinstance(state, TrainState):
            raise TypeError(f"state: expected TrainState(params, opt_state, step, key), got {type(state).__name__}")
        _check_batch(images, labels)
        next_key, dropout_key = jax.random.split(state.key)
        xs = as_sequences(images)

        def loss_fn(params):
            logits = classify(params, xs, dropout=dropout, recurrent_dropout=recurrent_dropout,
                              variational=variational, key=dropout_key, forget_bias=forget_bias,
                              impl=impl, unroll=unroll, matmul_dtype=matmul_dtype)
            m = loss_and_metrics(logits, labels)
            return m["loss_sum"] / m["count"], m

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(m, loss=loss, grad_norm=_global_norm(grads))
        return TrainState(params, opt_state, state.step + 1, next_key), metrics

    jitted = jax.jit(train_step, donate_argnums=(0,) if donate else ())
    jitted.trace_count = lambda: traces[0]  # type: ignore[attr-defined]
    return jitted


@functools.partial(jax.jit, static_argnames=("forget_bias", "impl", "unroll", "matmul_dtype"))
def _eval_batch(params, images, labels, weights, *, forget_bias, impl, unroll, matmul_dtype):
    logits = classify(params, as_sequences(images), forget_bias=forget_bias, impl=impl, unroll=unroll,
                      matmul_dtype=matmul_dtype)
    return loss_and_metrics(logits, labels, weights), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def evaluate(
    params: ClassifierParams,
    images,
    labels,
    *,
    batch_size: int = 1000,
    forget_bias: float = 1.0,
    impl: Literal["fused", "scan"] = "fused",
    unroll: int = 1,
    matmul_dtype=None,
    return_predictions: bool = False,
) -> dict:
    """Loss and accuracy of ``params`` over a whole split, without dropout or randomness.

    Every batch has ``batch_size`` rows (one compilation): the last partial batch is
    padded with zeros and its padding is masked out, so the numbers are exact over all N
    examples. Sums accumulate on the device and are fetched once at the end.

    Args:
      params: :class:`ClassifierParams`.
      images: ``[N, T, in]`` uint8 pixels or floats (host or device arrays).
      labels: ``[N]`` ints.
      batch_size: examples per forward pass; every batch (including a last partial one,
        or a split smaller than ``batch_size``) is padded to this size so that each size
        compiles once.
      forget_bias, impl, unroll, matmul_dtype: as in training (see :func:`classify`).
      return_predictions: also return the predicted class of every example.

    Returns:
      ``{"loss": mean cross-entropy, "accuracy": fraction correct, "correct": int,
      "num_examples": N}`` plus ``"predictions"`` (int32 ``[N]`` NumPy) when asked.
    """
    check_classifier_params(params)
    _check_batch(images, labels)
    batch_size = _check_positive_int(batch_size, "batch_size")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("images: expected at least one example, got 0")
    forget_bias = float(forget_bias)
    if matmul_dtype is not None:  # a hashable static argument of the jitted batch
        try:
            matmul_dtype = jnp.dtype(matmul_dtype)
        except TypeError:
            raise TypeError(f"matmul_dtype: expected None or a floating dtype such as jnp.bfloat16, "
                            f"got {matmul_dtype!r}") from None
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int32)
    # Every batch is padded to ``batch_size`` rows: one compilation for every split.
    totals = None
    preds = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x, y = images[start:stop], labels[start:stop]
        w = np.ones((stop - start,), np.float32)
        pad = batch_size - (stop - start)
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((pad,), np.int32)])
            w = np.concatenate([w, np.zeros((pad,), np.float32)])
        m, p = _eval_batch(params, x, y, w, forget_bias=forget_bias, impl=impl, unroll=unroll,
                           matmul_dtype=matmul_dtype)
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
        if return_predictions:
            preds.append(p[: stop - start])
    totals = jax.device_get(totals)
    correct = int(round(float(totals["correct"])))
    out = {
        "loss": float(totals["loss_sum"]) / n,
        "accuracy": correct / n,
        "correct": correct,
        "num_examples": n,
    }
    if return_predictions:
        out["predictions"] = np.asarray(jax.device_get(jnp.concatenate(preds)))
    return out


# ======================================================================================
# The training run: configuration -> state -> jitted step -> evaluation -> checkpoints.
# ======================================================================================


class ConfigError(ValueError):
    """A bad run configuration or work directory (a one-line message naming the flag)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    Defaults are the ones ``scripts/train.py`` uses; see its ``--help``.
    """

    dataset: str = "mnist"
    data_dir: Optional[str] = None
    val_size: int = 5000
    layers: int = 3
    hidden: int = 256
    batch_size: int = 128
    steps: int = 6000
    epochs: Optional[float] = None
    lr: float = 2e-3
    schedule: str = "warmup_cosine"
    warmup_steps: Optional[int] = None
    clip_norm: Optional[float] = 5.0
    dropout: float = 0.3
    recurrent_dropout: float = 0.0
    variational: bool = False
    forget_bias: float = 1.0
    matmul_dtype: str = "float32"
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    eval_batch_size: int = 1000
    keep_checkpoints: int = 3

    #: Fields that define the model or its data: a checkpoint can only be resumed with
    #: the same values.
    ARCHITECTURE_FIELDS = ("dataset", "layers", "hidden", "forget_bias", "val_size")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "TrainConfig":
        """Raises :class:`ConfigError` (naming the flag) for nonsensical values."""
        from lstm_jax import data

        def flag(name):
            return "--" + name.replace("_", "-")

        def int_at_least(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"{flag(name)} must be an integer >= {lo}, got {v!r}")

        def positive_float(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{flag(name)} must be a finite number > 0, got {v!r}")

        def rate(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1.0):
                raise ConfigError(f"{flag(name)} must be a drop rate in [0, 1) (1 - keep probability), got {v!r}")

        if self.dataset not in data.DATASETS:
            raise ConfigError(f"--dataset must be one of {', '.join(data.DATASETS)}, got {self.dataset!r}")
        int_at_least("val_size", 0)
        for name in ("layers", "hidden", "batch_size", "steps", "eval_every", "checkpoint_every", "log_every",
                     "eval_batch_size", "keep_checkpoints"):
            int_at_least(name, 1)
        if self.hidden > 65536:
            raise ConfigError(f"--hidden must be at most 65536, got {self.hidden}")
        if self.layers > 64:
            raise ConfigError(f"--layers must be at most 64, got {self.layers}")
        int_at_least("seed", 0)
        if self.epochs is not None:
            positive_float("epochs")
        positive_float("lr")
        positive_float("clip_norm", allow_none=True)
        rate("dropout")
        rate("recurrent_dropout")
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)) \
                or not math.isfinite(self.forget_bias):
            raise ConfigError(f"--forget-bias must be a finite number, got {self.forget_bias!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"--matmul-dtype must be one of {', '.join(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps is not None:
            int_at_least("warmup_steps", 0)
            if self.epochs is None and self.warmup_steps >= self.steps:
                raise ConfigError(f"--warmup-steps must be smaller than --steps ({self.steps}), got {self.warmup_steps}")
        return self


def resume_config(stored: dict, requested: dict) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's, with ``requested`` (the flags
    given explicitly on the command line) applied on top.

    Raises:
      ConfigError: a requested value of an architecture/data field
        (:attr:`TrainConfig.ARCHITECTURE_FIELDS`) differs from the checkpoint's.
    """
    base = TrainConfig.from_dict(stored)
    for name in TrainConfig.ARCHITECTURE_FIELDS:
        if name in requested and requested[name] != getattr(base, name):
            raise ConfigError(
                f"--resume: the checkpoint was trained with --{name.replace('_', '-')} {getattr(base, name)!r}, "
                f"incompatible with --{name.replace('_', '-')} {requested[name]!r}; use another --workdir"
            )
    merged = dataclasses.replace(base, **{k: v for k, v in requested.items() if hasattr(base, k)})
    return merged


def check_workdir(workdir: os.PathLike | str) -> Path:
    """Creates ``workdir`` if needed and checks that it is a writable folder."""
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {str(path)!r} cannot be created: {e.strerror or e}") from None
    if not path.is_dir():
        raise ConfigError(f"--workdir {str(path)!r} is not a directory")
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {str(path)!r} is not writable: {e.strerror or e}") from None
    return path


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Holds an exclusive lock on ``workdir`` (``fcntl.flock`` on ``WORKDIR/.lock``, which
    records the holder's pid) for the duration, so that two training runs cannot write the
    same checkpoints and metrics. The lock goes with the process, also when it is killed.

    Raises:
      ConfigError: another process holds it. Where the file system or platform has no
        ``flock`` (Windows, some network file systems), runs without a lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    with open(workdir / LOCK_FILE, "a+") as f:  # closing it releases the lock
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    f.seek(0)
                    holder = f.read().strip()
                    raise ConfigError(f"--workdir {str(workdir)!r} is in use by another training run"
                                      f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish "
                                      "or use another --workdir") from None
                # Any other error: this file system has no flock; run without a lock.
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


@dataclasses.dataclass
class RunResult:
    """What :func:`train_and_evaluate` returns."""

    workdir: Path
    final_step: int
    test_accuracy: float
    test_loss: float
    test_examples: int
    best_step: int
    best_val_accuracy: Optional[float]
    final_test_accuracy: float
    final_val: Optional[dict]
    wall_time: float
    files: dict


def _data_position(step: int, batches_per_epoch: int) -> dict:
    epoch, batch = divmod(int(step), batches_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": batch}


def train_and_evaluate(
    config: TrainConfig,
    workdir: os.PathLike | str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    requested: Optional[dict] = None,
    stream=None,
    use_bar: Optional[bool] = None,
) -> RunResult:
    """Trains the classifier and evaluates it on the test set.

    Flow: validate config -> load data -> create (or restore) the train state -> jitted
    train step -> evaluation every ``eval_every`` steps (``metrics.jsonl``, ``curves.png``)
    -> checkpoint every ``checkpoint_every`` steps and at the end -> test accuracy of the
    best-validation checkpoint.

    Determinism: the batch of step ``s`` is ``data.batch_indices(n, B, seed, epoch)[b]``
    with ``(epoch, b) = divmod(s, n // B)``; the dropout key lives in the state; evaluation
    uses no randomness. So a run resumed from any checkpoint ends with exactly the
    parameters of an uninterrupted run (on the same machine).

    Args:
      config: the run's :class:`TrainConfig` (with ``resume``, the checkpoint's config is
        used and ``requested`` -- explicitly chosen values -- is applied on top).
      workdir: folder for ``checkpoints/``, ``metrics.jsonl``, ``curves.png``.
      resume: continue from the latest checkpoint in ``workdir``.
      overwrite: delete existing checkpoints and metrics in ``workdir`` and start over.
      requested: with ``resume``, the fields the user set explicitly.
      stream: where progress goes (default stdout).
      use_bar: force the tqdm bar on/off (default: when ``stream`` is a terminal).

    Raises:
      ConfigError: bad configuration; a work directory that cannot be used (not writable, or
        in use by another run); missing/incompatible checkpoint.
      lstm_jax.data.DataError: missing or malformed data.
      NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    config.validate()
    workdir = check_workdir(workdir)
    with workdir_lock(workdir):
        return _train_and_evaluate(config, workdir, resume=resume, overwrite=overwrite, requested=requested,
                                   stream=stream if stream is not None else sys.stdout, use_bar=use_bar)


def _train_and_evaluate(config, workdir, *, resume, overwrite, requested, stream, use_bar) -> RunResult:
    """:func:`train_and_evaluate` in a checked and locked ``workdir``."""
    from lstm_jax import data
    from lstm_jax._checkpoint import CHECKPOINT_DIR, Checkpoints, has_checkpoints
    from lstm_jax._classifier import init_classifier
    from lstm_jax._metrics import CURVES_FILE, METRICS_FILE, Progress, plot_curves, read_metrics, write_metrics

    ckpt_dir = workdir / CHECKPOINT_DIR
    metrics_path = workdir / METRICS_FILE
    curves_path = workdir / CURVES_FILE

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite are mutually exclusive")
    existing = has_checkpoints(workdir)
    if resume and not existing:
        raise ConfigError(f"--resume: no checkpoint found in {ckpt_dir}")
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"--workdir {str(workdir)!r} already has checkpoints; pass --resume to continue or --overwrite to start over"
        )
    if overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for p in (metrics_path, curves_path):
            if p.exists():
                p.unlink()

    start_meta = None
    if resume:
        probe = Checkpoints(ckpt_dir, read_only=True)
        latest = probe.latest_step()
        if latest is None:
            raise ConfigError(f"--resume: no finished checkpoint in {ckpt_dir}")
        try:
            start_meta = probe.restore_meta(latest)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user-facing error
            raise ConfigError(f"--resume: cannot read checkpoint {latest} in {ckpt_dir}: {type(e).__name__}") from None
        probe.close()
        if "config" not in start_meta:
            raise ConfigError(f"--resume: checkpoint {latest} in {ckpt_dir} has no stored configuration")
        config = resume_config(start_meta["config"], dict(requested or {})).validate()

    splits = data.load_dataset(config.dataset, data_dir=config.data_dir, val_size=config.val_size)
    n_train = len(splits.train_images)
    if config.batch_size > n_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {n_train} training examples")
    batches_per_epoch = n_train // config.batch_size
    if config.epochs is not None and (not resume or "epochs" in (requested or {})):
        config = dataclasses.replace(config, steps=max(1, int(round(config.epochs * batches_per_epoch))))
        config.validate()
    time_steps, features = splits.train_images.shape[1:]

    optimizer = make_optimizer(config.lr, config.steps, config.clip_norm, config.schedule,
                               warmup_steps=config.warmup_steps)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_classifier(init_key, int(features), config.hidden, config.layers, data.NUM_CLASSES)
    state = create_train_state(dropout_key, params, optimizer)

    ckpts = Checkpoints(ckpt_dir, keep=config.keep_checkpoints)
    records: list[dict] = []
    wall_before = 0.0
    if resume:
        latest = ckpts.latest_step()
        try:
            state, meta = ckpts.restore(latest, state)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--resume: cannot restore checkpoint {latest} in {ckpt_dir} with this "
                              f"configuration ({type(e).__name__}); use another --workdir") from None
        wall_before = float(meta.get("wall_time", 0.0))
        # Records written after the checkpoint came from the interrupted run's future.
        records = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= latest]
        write_metrics(metrics_path, records)
    start_step = int(state.step)

    matmul_dtype = MATMUL_DTYPES[config.matmul_dtype]
    train_step = make_train_step(optimizer, dropout=config.dropout, recurrent_dropout=config.recurrent_dropout,
                                 variational=config.variational, forget_bias=config.forget_bias,
                                 matmul_dtype=matmul_dtype)
    schedule_fn = make_schedule(config.lr, config.steps, config.schedule, warmup_steps=config.warmup_steps)
    eval_kw = dict(batch_size=config.eval_batch_size, forget_bias=config.forget_bias, matmul_dtype=matmul_dtype)
    has_val = len(splits.val_images) > 0
    title = (f"{config.dataset} {config.layers}x{config.hidden} LSTM, batch {config.batch_size}, "
             f"lr {config.lr:g} ({config.schedule}), dropout {config.dropout:g}"
             + (f", {config.matmul_dtype} matmuls" if matmul_dtype is not None else ""))

    def meta_for(step, wall):
        return {"config": config.to_dict(), "seed": config.seed, "step": int(step),
                "batches_per_epoch": batches_per_epoch, **_data_position(step, batches_per_epoch),
                "wall_time": wall, "num_train": n_train}

    progress = Progress(config.steps, start_step, stream=stream, use_bar=use_bar)
    if resume:
        progress.write(f"resumed from step {start_step} in {ckpt_dir}")
    t_start = time.perf_counter()
    interval = []  # per-step device metrics since the last fetch
    since_eval = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    last_saved = start_step if resume else None
    perm_epoch, perm = None, None
    step = start_step

    def fetch(step_now):
        """Fetches the pending per-step metrics once; raises on a non-finite loss."""
        nonlocal interval
        if not interval:
            return None
        host = jax.device_get(interval)
        first = step_now - len(host) + 1
        for i, m in enumerate(host):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(
                    f"non-finite training loss ({float(m['loss'])}) at step {first + i}; stopping. The last good "
                    f"checkpoint (step {ckpts.latest_step()}) is in {ckpt_dir}")
        for m in host:
            for k in since_eval:
                since_eval[k] += float(m[k])
        interval = []
        return host[-1]

    try:
        while step < config.steps:
            epoch, b = divmod(step, batches_per_epoch)
            if perm_epoch != epoch:
                perm = data.batch_indices(n_train, config.batch_size, seed=config.seed, epoch=epoch)
                perm_epoch = epoch
            idx = perm[b]
            state, m = train_step(state, splits.train_images[idx], splits.train_labels[idx])
            step += 1
            interval.append({k: m[k] for k in ("loss", "loss_sum", "correct", "count")})
            if step == start_step + 1:
                jax.block_until_ready(m["loss"])
                progress.restart_clock()  # don't count the compilation in steps/s
            do_eval = step % config.eval_every == 0 or step == config.steps
            do_ckpt = step % config.checkpoint_every == 0 or step == config.steps
            if step % config.log_every == 0 or do_eval or do_ckpt:
                last = fetch(step)
                if last is not None:
                    count = max(since_eval["count"], 1.0)
                    progress.update(step, loss=float(last["loss"]), acc=since_eval["correct"] / count)
            metrics = None
            if do_eval:
                wall = wall_before + time.perf_counter() - t_start
                count = max(since_eval["count"], 1.0)
                rec = {"step": step, "train_loss": since_eval["loss_sum"] / count,
                       "train_accuracy": since_eval["correct"] / count,
                       "val_loss": None, "val_accuracy": None,
                       "learning_rate": float(schedule_fn(step - 1)),
                       "steps_per_sec": progress.steps_per_sec(), "wall_time": wall}
                if has_val:
                    v = evaluate(state.params, splits.val_images, splits.val_labels, **eval_kw)
                    rec["val_loss"], rec["val_accuracy"] = v["loss"], v["accuracy"]
                    metrics = {"val_accuracy": v["accuracy"], "val_loss": v["loss"]}
                records.append(rec)
                write_metrics(metrics_path, records)
                plot_curves(curves_path, records, title)
                progress.write(
                    f"step {step}: train loss {rec['train_loss']:.4f} acc {100 * rec['train_accuracy']:.2f}%"
                    + (f", val loss {rec['val_loss']:.4f} acc {100 * rec['val_accuracy']:.2f}%" if has_val else "")
                    + f", {rec['steps_per_sec']:.2f} steps/s")
                since_eval = {k: 0.0 for k in since_eval}
            if do_ckpt or metrics is not None:
                ckpts.save(step, state, meta_for(step, wall_before + time.perf_counter() - t_start), metrics)
                last_saved = step
    finally:
        progress.close()

    total_wall = wall_before + time.perf_counter() - t_start
    if last_saved != step:
        ckpts.save(step, state, meta_for(step, total_wall), None)
    final_val = evaluate(state.params, splits.val_images, splits.val_labels, **eval_kw) if has_val else None
    final_test = evaluate(state.params, splits.test_images, splits.test_labels, **eval_kw)
    best = ckpts.best_step()
    best_metrics = ckpts.metrics(best) if best is not None else None
    if best is not None and best != step:
        best_state, _ = ckpts.restore(best, state)
        test = evaluate(best_state.params, splits.test_images, splits.test_labels, **eval_kw)
    else:
        best = step
        test = final_test
    ckpts.close()
    return RunResult(
        workdir=workdir, final_step=step, test_accuracy=test["accuracy"], test_loss=test["loss"],
        test_examples=test["num_examples"], best_step=int(best),
        best_val_accuracy=None if not best_metrics else float(best_metrics["val_accuracy"]),
        final_test_accuracy=final_test["accuracy"], final_val=final_val, wall_time=total_wall,
        files={"checkpoints": ckpt_dir, "metrics": metrics_path, "curves": curves_path},
    )


def restore_run(workdir: os.PathLike | str, *, step: Optional[int] = None, which: str = "best",
                input_size: int = 28, num_classes: int = 10):
    """Loads a trained model from ``WORKDIR/checkpoints``.

    Args:
      workdir: a run's work directory.
      step: a specific checkpoint step; default the ``which`` one.
      which: ``"best"`` (highest validation accuracy) or ``"latest"``.
      input_size, num_classes: the model's input features and classes (28 and 10 for MNIST).

    Returns:
      ``(state, config, step)``: the :class:`TrainState`, the :class:`TrainConfig` stored in
      the checkpoint (which rebuilt the model), and the step restored.

    Raises:
      ConfigError: no such work directory, checkpoint or step, or an unreadable checkpoint.
    """
    from lstm_jax._checkpoint import CHECKPOINT_DIR, Checkpoints, has_checkpoints
    from lstm_jax._classifier import init_classifier

    workdir = Path(workdir).expanduser()
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {str(workdir)!r} does not exist")
    if not has_checkpoints(workdir):
        raise ConfigError(f"no checkpoint found in {workdir / CHECKPOINT_DIR}")
    if which not in ("best", "latest"):
        raise ValueError(f"which: expected 'best' or 'latest', got {which!r}")
    ckpts = Checkpoints(workdir / CHECKPOINT_DIR, read_only=True)
    try:
        steps = ckpts.all_steps()
        if step is None:
            step = ckpts.best_step() if which == "best" else ckpts.latest_step()
        elif step not in steps:
            raise ConfigError(f"--step {step}: no such checkpoint in {workdir / CHECKPOINT_DIR} "
                              f"(available: {', '.join(map(str, steps))})")
        try:
            meta = ckpts.restore_meta(step)
            config = TrainConfig.from_dict(meta["config"])
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"checkpoint {step} in {workdir / CHECKPOINT_DIR} is unreadable "
                              f"({type(e).__name__})") from None
        optimizer = make_optimizer(config.lr, config.steps, config.clip_norm, config.schedule,
                                   warmup_steps=config.warmup_steps)
        params = init_classifier(jax.random.PRNGKey(0), input_size, config.hidden, config.layers, num_classes)
        template = create_train_state(jax.random.PRNGKey(0), params, optimizer)
        try:
            state, _ = ckpts.restore(step, template)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"checkpoint {step} in {workdir / CHECKPOINT_DIR} cannot be restored "
                              f"({type(e).__name__})") from None
    finally:
        ckpts.close()
    return state, config, int(step)


def confusion_matrix(labels, predictions, num_classes: int = 10) -> np.ndarray:
    """``[C, C]`` int64 counts: row = true class, column = predicted class."""
    labels = np.asarray(labels).astype(np.int64)
    predictions = np.asarray(predictions).astype(np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def enable_compilation_cache(directory: Optional[os.PathLike | str] = None) -> Optional[Path]:
    """Turns on JAX's persistent compilation cache so that a second run (or a resumed one)
    skips XLA compilation.

    Uses ``directory``, else ``$JAX_COMPILATION_CACHE_DIR`` if set, else
    ``<lstm_jax cache dir>/jax`` (see :func:`lstm_jax.data.default_cache_dir`). Returns the
    folder, or None when it cannot be created (the cache is then left off).
    """
    from lstm_jax import data

    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (data.default_cache_dir() / "jax")
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    except (OSError, AttributeError):
        return None
    return path
