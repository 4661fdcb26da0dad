"""The multi-layer stack: :func:`lstm` runs every layer over the whole sequence."""

from __future__ import annotations

import functools
import glob
import os
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import _checks
from lstm_jax._cell import fold_forget_bias
from lstm_jax._dropout import sample_masks
from lstm_jax._layer import layer_fused, layer_scan
from lstm_jax._types import DropoutMasks, LSTMState

_IMPLS = {"fused": layer_fused, "scan": layer_scan}

# XLA:CPU (jaxlib 0.10) runs a float32 dot on its thread pool only above 2**23 multiply-adds,
# below that on one core. The recurrence's per-step [B, H] x [H, 4H] dot at B=128, H=128 sits
# exactly on that line: with one more (zero) batch row it runs 1.7x faster per step on 2 cores
# (bench/results/gemm-threads-cpu-AMD-EPYC-2c.md). So such a batch is padded by a few rows,
# at most 1/8 of it; the padded rows are sliced off, and their gradients are exactly zero.
_CPU_DOT_THREADS_MACS = 2**23
_MAX_PAD_FRACTION = 1 / 8


def _cpu_batch_pad(batch: int, hidden: int, dtype, matmul_dtype) -> int:
    """Rows to add so that the per-step dot crosses XLA:CPU's threading threshold (or 0)."""
    if (jax.default_backend() != "cpu" or (os.cpu_count() or 1) < 2 or batch == 0 or hidden == 0
            or jnp.dtype(dtype) != jnp.float32 or matmul_dtype is not None):
        return 0
    macs_per_row = 4 * hidden * hidden
    if batch * macs_per_row > _CPU_DOT_THREADS_MACS:
        return 0
    pad = _CPU_DOT_THREADS_MACS // macs_per_row + 1 - batch
    return pad if pad <= batch * _MAX_PAD_FRACTION else 0


# Where the fused layer's inference forward projects its inputs, by measurement on XLA:CPU
# (2-vCPU Xeon, 2 MiB L2 per core; `python bench/projection.py`,
# bench/results/projection-cpu-Intel-Xeon-2c.md). In the loop (each step x_t @ w_ih):
# * a narrow input (in <= 8, e.g. pixel-by-pixel MNIST): a few multiply-adds per gate, not
#   worth writing and reading back a [T, B, 4H] array (T=784, B=128, H=128, in=1: 0.66-0.77x);
# * a wide float32 input (in >= 64) at batch >= 64 whose two weight matrices fit in one core's
#   L2 cache, which each step then reads from there (the tutorial's layers 2-3 at H=256);
# * any other input where one step's projection alone is half the L2 or more (B=1000, H=256).
# Otherwise K steps at a time, K*B*4H*itemsize <= 2 * L2 (B=128, H=256: K=8): one matmul per
# chunk, whose output the inner loop reads back from cache, where the hoisted [T, B, 4H] array
# goes to memory and, beyond glibc's mmap threshold (32 MiB at most), is page-faulted in anew at
# every call unless `retain_freed_memory()` was called. All steps at once where K >= T.
# Against the previous rule (which hoisted all these but the wide in-loop case), in one process:
# 0.75-0.99x the time with glibc as it is (B=128, in=28: T=64 0.75x, T=128 0.76x; the test-set
# batch B=1000 0.93x; the tutorial 0.99x), 0.98-1.02x with freed memory retained; XLA's scratch
# memory 0.27-0.70x (test-set batch 201 -> 99 MiB, T=128 82 -> 23 MiB).
_IN_LOOP_MAX_NARROW = 8
_IN_LOOP_MIN_WIDE = 64
_IN_LOOP_MIN_BATCH = 64
_CHUNK_L2_MULTIPLE = 2
_L2_BYTES_IF_UNKNOWN = 1 << 20


@functools.lru_cache(maxsize=None)
def _l2_cache_bytes() -> Optional[int]:
    """One core's level-2 (data or unified) cache in bytes, from Linux's sysfs; None if unknown."""
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Data", "Unified"):
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            try:
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            except ValueError:
                return None
    return None


class _Projection(NamedTuple):
    """Where a fused layer's inference forward projects its inputs (``layer_fused``'s arguments)."""

    project_in_loop: bool  # each step projects its own input, inside the loop
    project_chunk: Optional[int]  # else: this many steps at a time (None: all before the loop)


def _cpu_projection(batch: int, in_size: int, hidden: int, time_steps: int, dtype, matmul_dtype,
                    l2_bytes: Optional[int] = None) -> _Projection:
    """Where the fused layer's inference forward should project its input (see the
    measurements above). ``l2_bytes``: one core's L2 cache (default: this machine's)."""
    if jax.default_backend() != "cpu":
        return _Projection(False, None)
    if in_size <= _IN_LOOP_MAX_NARROW:
        return _Projection(True, None)
    if l2_bytes is None:
        l2_bytes = _l2_cache_bytes() or _L2_BYTES_IF_UNKNOWN
    itemsize = jnp.dtype(dtype).itemsize
    weight_bytes = (in_size + hidden) * 4 * hidden * itemsize
    if (in_size >= _IN_LOOP_MIN_WIDE and batch >= _IN_LOOP_MIN_BATCH and weight_bytes <= l2_bytes
            and matmul_dtype is None):
        return _Projection(True, None)
    step_bytes = max(batch * 4 * hidden * itemsize, 1)
    chunk = _CHUNK_L2_MULTIPLE * l2_bytes // step_bytes
    if chunk <= 1:
        return _Projection(True, None)
    return _Projection(False, chunk if chunk < time_steps else None)


# XLA:CPU gives a dot to YNNPACK, whose bfloat16 kernels use the CPU's matrix units (AMX),
# only when its left-hand side is row-major with the contraction on its last axis. The weight
# gradients contract the T*B rows of two arrays (a transposed-LHS GEMM), which XLA:CPU runs on
# Eigen instead: in bfloat16 at 250 GFLOP/s, where YNNPACK's row-major GEMM of the same size
# reaches 1300 on the 2-vCPU Xeon of bench/results/. So with bfloat16 matmuls the fused layer
# transposes the left-hand sides first (``row_major_weight_grads``). In float32 both reach
# 280-330 GFLOP/s and the transposes cost what they save: unchanged. Training step, row-major /
# transposed (`python bench/weight_grads.py`, bench/results/weight-grads-cpu-Intel-Xeon-2c.md):
# bfloat16 0.75-0.96, float32 0.98-1.02.
def _cpu_row_major_weight_grads(matmul_dtype) -> bool:
    """Whether the fused layer should compute its weight gradients as row-major GEMMs."""
    return jax.default_backend() == "cpu" and matmul_dtype is not None


def _fit_batch(a, axis, rows, value=0):
    """``a`` with exactly ``rows`` rows along ``axis``: sliced, or padded with ``value``."""
    if a is None or a.shape[axis] == rows:
        return a
    if a.shape[axis] > rows:
        return jax.lax.slice_in_dim(a, 0, rows, axis=axis)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, rows - a.shape[axis])
    return jnp.pad(a, widths, constant_values=value)


def _check_masks(masks, field, num_layers, batch, time_steps, hidden_sizes):
    per_layer = getattr(masks, field)
    if per_layer is None:
        return (None,) * num_layers
    if not isinstance(per_layer, (tuple, list)) or len(per_layer) != num_layers:
        raise ValueError(f"masks.{field}: expected a tuple of {num_layers} masks (one per layer), got {per_layer!r:.80}")
    for k, (m, hidden) in enumerate(zip(per_layer, hidden_sizes)):
        if m is None:
            continue
        _checks.check_float_array(m, f"masks.{field}[{k}]")
        ok = ((batch, time_steps, hidden), (batch, 1, hidden)) if field == "output" else ((batch, hidden),)
        if tuple(m.shape) not in ok:
            want = " or ".join(str(list(s)) for s in ok)
            raise ValueError(f"masks.{field}[{k}]: expected shape {want}, got {tuple(m.shape)}")
    return tuple(per_layer)


def lstm(
    params,
    xs: jax.Array,
    *,
    initial_state: Optional[tuple[LSTMState, ...]] = None,
    lengths: Optional[jax.Array] = None,
    forget_bias: float = 1.0,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    variational: bool = False,
    key: Optional[jax.Array] = None,
    masks: Optional[DropoutMasks] = None,
    unroll: int = 1,
    impl: Literal["fused", "scan"] = "fused",
    remat_chunk: Optional[int] = None,
    matmul_dtype=None,
) -> tuple[jax.Array, tuple[LSTMState, ...]]:
    """Runs a stack of LSTM layers over batch-first sequences.

    Args:
      params: tuple of ``LSTMLayerParams``, one per layer (see :func:`init_lstm`).
      xs: inputs ``[B, T, in]``, floating point.
      initial_state: tuple of ``LSTMState(h [B, H], c [B, H])`` per layer; zeros by default.
      lengths: ``[B]`` ints in [0, T], the valid steps of each sequence. Steps
        ``t >= lengths[b]`` leave that sequence's state unchanged and output zeros, so the
        final state is the state at the last valid step (TF ``dynamic_rnn(sequence_length)``).
        Values are range-checked when concrete; under ``jit`` they are not.
      forget_bias: added to the forget gate's pre-activation (0.0 reproduces ``torch.nn.LSTM``).
      dropout: rate of each layer's output dropout (what the next layer and a head see).
      recurrent_dropout: rate of the dropout on the h fed back into the recurrence, one mask
        per sequence; the state itself is not dropped.
      variational: one output mask per sequence, reused at every timestep.
      key: PRNG key for the masks; required when a rate is positive and ``masks`` is None.
      masks: explicit :class:`DropoutMasks` (e.g. from :func:`make_dropout_masks`); when given,
        the rates and ``key`` are ignored.
      unroll: timesteps per iteration of the scan loop.
      impl: ``"fused"`` (hand-written VJP, fast, reverse mode only) or ``"scan"`` (autodiff
        through ``lax.scan``; forward and reverse mode).
      remat_chunk: keep only every ``remat_chunk``-th state for the backward pass and
        recompute each chunk of steps when it is differentiated (less memory for long
        sequences, about one extra forward pass of compute). None keeps everything.
      matmul_dtype: e.g. ``jnp.bfloat16``: matmul operands in that dtype with accumulation,
        gate math and cell state in the parameters' dtype (for GPU/TPU matrix units).

    Returns:
      ``(ys, final_state)``: ``ys [B, T, H]`` the top layer's outputs (after its output
      dropout, zeros past ``lengths``) and a tuple of ``LSTMState`` per layer (never dropped).
    """
    _checks.check_params(params)
    num_layers = len(params)
    hidden_sizes = [p.w_hh.shape[0] for p in params]
    _checks.check_float_array(xs, "xs")
    if xs.ndim != 3:
        raise ValueError(f"xs: expected rank 3 [batch, time, features], got rank {xs.ndim} with shape {tuple(xs.shape)}")
    batch, time_steps, features = xs.shape
    if features != params[0].w_ih.shape[0]:
        raise ValueError(f"xs: expected {params[0].w_ih.shape[0]} features (params[0].w_ih's input_size), got shape {tuple(xs.shape)}")
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {sorted(_IMPLS)}, got {impl!r}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll: expected a positive int, got {unroll!r}")
    if remat_chunk is not None and (isinstance(remat_chunk, bool) or not isinstance(remat_chunk, int) or remat_chunk < 1):
        raise ValueError(f"remat_chunk: expected None or a positive int, got {remat_chunk!r}")
    if matmul_dtype is not None and not jnp.issubdtype(matmul_dtype, jnp.floating):
        raise TypeError(f"matmul_dtype: expected None or a floating dtype such as jnp.bfloat16, got {matmul_dtype!r}")
    dtype = params[0].w_hh.dtype

    if initial_state is None:
        initial_state = tuple(
            LSTMState(jnp.zeros((batch, h), dtype), jnp.zeros((batch, h), dtype)) for h in hidden_sizes
        )
    else:
        if not isinstance(initial_state, (tuple, list)) or isinstance(initial_state, LSTMState) or len(initial_state) != num_layers:
            got = f"{type(initial_state).__name__}" + (f" of length {len(initial_state)}" if isinstance(initial_state, (tuple, list)) else "")
            raise ValueError(f"initial_state: expected a tuple of {num_layers} LSTMState (one per layer), got {got}")
        for k, (s, h) in enumerate(zip(initial_state, hidden_sizes)):
            _checks.check_state(s, f"initial_state[{k}]", batch, h)
        initial_state = tuple(LSTMState(s.h.astype(dtype), s.c.astype(dtype)) for s in initial_state)

    valid = None
    if lengths is not None:
        if isinstance(lengths, (list, tuple)):
            lengths = np.asarray(lengths)
        if not hasattr(lengths, "shape"):
            raise TypeError(f"lengths: expected an integer array of shape [{batch}], got {type(lengths).__name__}")
        if tuple(np.shape(lengths)) != (batch,):
            raise ValueError(f"lengths: expected shape [{batch}] (one per sequence), got {tuple(np.shape(lengths))}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths: expected an integer array, got dtype {lengths.dtype}")
        if _checks.is_concrete(lengths) and batch > 0:
            concrete = np.asarray(lengths)  # np.min(jax_array) would trace under jit
            lo, hi = int(concrete.min()), int(concrete.max())
            if lo < 0 or hi > time_steps:
                raise ValueError(f"lengths: expected values in [0, {time_steps}], got values in [{lo}, {hi}]")
        valid = jnp.arange(time_steps)[:, None] < jnp.asarray(lengths)[None, :]  # [T, B]

    if masks is None:
        dropout = _checks.check_rate(dropout, "dropout")
        recurrent_dropout = _checks.check_rate(recurrent_dropout, "recurrent_dropout")
        if (dropout > 0 or recurrent_dropout > 0) and key is None:
            raise ValueError(
                f"key: a PRNG key is required when dropout ({dropout}) or recurrent_dropout "
                f"({recurrent_dropout}) is positive, got None"
            )
        if dropout > 0 or recurrent_dropout > 0:
            masks = sample_masks(key, hidden_sizes, batch, time_steps, dropout, recurrent_dropout,
                                 bool(variational), dtype, broadcast_variational=False)
        else:
            masks = DropoutMasks(None, None)
    elif not isinstance(masks, DropoutMasks):
        raise TypeError(f"masks: expected DropoutMasks(output, recurrent), got {type(masks).__name__}")
    out_masks = _check_masks(masks, "output", num_layers, batch, time_steps, hidden_sizes)
    rec_masks = _check_masks(masks, "recurrent", num_layers, batch, time_steps, hidden_sizes)

    layer = _IMPLS[impl]
    x = jnp.swapaxes(xs.astype(dtype), 0, 1)  # time-major inside: scan slices the leading axis
    final_state = []
    for p, state, out_mask, rec_mask, hidden in zip(params, initial_state, out_masks, rec_masks, hidden_sizes):
        # x keeps the previous layer's padded rows; it is padded or sliced only where the
        # padding changes, and the padded rows (not valid) are sliced off once, at the end.
        rows = batch + _cpu_batch_pad(batch, hidden, dtype, matmul_dtype)
        x = _fit_batch(x, 1, rows)
        rmask = None if rec_mask is None else _fit_batch(rec_mask.astype(dtype), 0, rows, 1)
        extra = {}
        if impl == "fused":
            extra.update(_cpu_projection(rows, x.shape[-1], hidden, time_steps, dtype, matmul_dtype)._asdict())
            extra["row_major_weight_grads"] = _cpu_row_major_weight_grads(matmul_dtype)
        ys, h_t, c_t = layer(p.w_ih, p.w_hh, fold_forget_bias(p.b, forget_bias), x, _fit_batch(state.h, 0, rows),
                             _fit_batch(state.c, 0, rows), _fit_batch(valid, 1, rows, False), rmask, unroll=unroll,
                             remat_chunk=remat_chunk, matmul_dtype=matmul_dtype, **extra)
        if out_mask is not None:
            ys = ys * _fit_batch(jnp.swapaxes(out_mask.astype(dtype), 0, 1), 1, rows, 1)
        final_state.append(LSTMState(_fit_batch(h_t, 0, batch), _fit_batch(c_t, 0, batch)))
        x = ys
    return jnp.swapaxes(_fit_batch(x, 1, batch), 0, 1), tuple(final_state)
