"""Sequence classifier: an LSTM stack whose last valid top-layer output feeds a linear
softmax layer (the "MNIST as 28 timesteps of 28 pixels" model of the TF LSTM tutorials).

::

    ys, _ = lstm(params.lstm, xs, dropout=..., ...)      # [B, T, H], output dropout applied
    last = ys[b, lengths[b] - 1]                          # [B, H]
    logits = last @ w_out + b_out                         # [B, C]
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax import _checks
from lstm_jax._init import init_lstm
from lstm_jax._stack import lstm
from lstm_jax._types import LSTMLayerParams


class ClassifierParams(NamedTuple):
    """Parameters of :func:`classify`.

    Attributes:
      lstm: tuple of :class:`LSTMLayerParams`, one per layer.
      w_out: ``[H, C]`` weights of the softmax layer.
      b_out: ``[C]`` its bias.
    """

    lstm: tuple[LSTMLayerParams, ...]
    w_out: jax.Array
    b_out: jax.Array


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def init_classifier(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    num_classes: int,
    *,
    dtype=jnp.float32,
) -> ClassifierParams:
    """Initialises an LSTM classifier.

    The LSTM layers are initialised as :func:`init_lstm` does (``torch.nn.LSTM``'s
    U(-1/sqrt(H), 1/sqrt(H))); the softmax layer's weights are drawn from a truncated
    normal with standard deviation ``1/sqrt(H)`` (Glorot-like fan-in scaling) and its bias is zero.

    Args:
      key: a PRNG key.
      input_size: features per timestep (28 for MNIST rows).
      hidden_size: H, units per LSTM layer.
      num_layers: number of stacked LSTM layers.
      num_classes: C, number of classes.
      dtype: a floating dtype for every parameter.

    Returns:
      ``ClassifierParams(lstm=tuple of LSTMLayerParams, w_out [H, C], b_out [C])``.
    """
    input_size = _positive_int(input_size, "input_size")
    hidden_size = _positive_int(hidden_size, "hidden_size")
    num_layers = _positive_int(num_layers, "num_layers")
    num_classes = _positive_int(num_classes, "num_classes")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    # One compiled program instead of a dozen eagerly dispatched random ops.
    return _init_jit(key, input_size, hidden_size, num_layers, num_classes, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_jit(key, input_size, hidden_size, num_layers, num_classes, dtype):
    k_lstm, k_out = jax.random.split(key)
    layers = init_lstm(k_lstm, input_size, hidden_size, num_layers, dtype=dtype)
    std = 1.0 / np.sqrt(hidden_size)
    w_out = (std * jax.random.truncated_normal(k_out, -2.0, 2.0, (hidden_size, num_classes), jnp.float32)).astype(dtype)
    b_out = jnp.zeros((num_classes,), dtype)
    return ClassifierParams(lstm=layers, w_out=w_out, b_out=b_out)


def check_classifier_params(params, name: str = "params") -> None:
    """Raises TypeError/ValueError unless ``params`` is a well-formed :class:`ClassifierParams`."""
    if not isinstance(params, ClassifierParams):
        raise TypeError(f"{name}: expected ClassifierParams(lstm, w_out, b_out) (see init_classifier), "
                        f"got {type(params).__name__}")
    _checks.check_params(params.lstm, f"{name}.lstm")
    hidden = params.lstm[-1].w_hh.shape[0]
    _checks.check_float_array(params.w_out, f"{name}.w_out")
    _checks.check_float_array(params.b_out, f"{name}.b_out")
    if params.w_out.ndim != 2 or params.w_out.shape[0] != hidden or params.w_out.shape[1] < 1:
        raise ValueError(f"{name}.w_out: expected shape [{hidden}, num_classes], got {tuple(params.w_out.shape)}")
    if tuple(params.b_out.shape) != (params.w_out.shape[1],):
        raise ValueError(f"{name}.b_out: expected shape [{params.w_out.shape[1]}], got {tuple(params.b_out.shape)}")


def classify(
    params: ClassifierParams,
    xs: jax.Array,
    *,
    lengths: Optional[jax.Array] = None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    variational: bool = False,
    key: Optional[jax.Array] = None,
    forget_bias: float = 1.0,
    impl: Literal["fused", "scan"] = "fused",
    unroll: int = 1,
    matmul_dtype=None,
) -> jax.Array:
    """Class logits of batch-first sequences.

    Args:
      params: :class:`ClassifierParams` (see :func:`init_classifier`).
      xs: inputs ``[B, T, in]``, floating point (e.g. images ``[B, 28, 28]`` in [0, 1]).
      lengths: ``[B]`` ints in [1, T]: the logits read the top layer's output at step
        ``lengths[b] - 1``. None means every sequence has all T steps.
      dropout: rate of each LSTM layer's output dropout, including the top layer's output
        that feeds the softmax layer (TF ``DropoutWrapper(output_keep_prob=1 - dropout)``).
        0 at evaluation.
      recurrent_dropout: rate of the dropout on the recurrent h (see :func:`lstm`).
      variational: one output mask per sequence, reused at every timestep.
      key: PRNG key for the dropout masks; required when a rate is positive.
      forget_bias: added to the forget gates' pre-activation.
      impl: ``"fused"`` or ``"scan"`` (see :func:`lstm`).
      unroll: timesteps per scan iteration.
      matmul_dtype: None, or ``jnp.bfloat16`` for the LSTM's matmuls with bfloat16 operands
        and float32 accumulation (see :func:`lstm`); the softmax layer stays in the
        parameters' dtype.

    Returns:
      logits ``[B, C]`` (unnormalised; apply ``jax.nn.log_softmax`` for log-probabilities).
    """
    check_classifier_params(params)
    _checks.check_float_array(xs, "xs")
    if xs.ndim != 3:
        raise ValueError(f"xs: expected rank 3 [batch, time, features], got shape {tuple(xs.shape)}")
    batch, time_steps, _ = xs.shape
    if time_steps < 1:
        raise ValueError(f"xs: expected at least one timestep, got shape {tuple(xs.shape)}")
    if lengths is not None:
        if not hasattr(lengths, "shape") or tuple(np.shape(lengths)) != (batch,):
            raise ValueError(f"lengths: expected shape [{batch}] (one per sequence), got {tuple(np.shape(lengths))}")
        if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
            raise TypeError(f"lengths: expected an integer array, got dtype {jnp.asarray(lengths).dtype}")
        if _checks.is_concrete(lengths) and batch > 0:
            lo, hi = int(np.min(lengths)), int(np.max(lengths))
            if lo < 1 or hi > time_steps:
                raise ValueError(f"lengths: expected values in [1, {time_steps}] (a classifier needs at least "
                                 f"one step), got values in [{lo}, {hi}]")
    ys, _ = lstm(params.lstm, xs, lengths=lengths, forget_bias=forget_bias, dropout=dropout,
                 recurrent_dropout=recurrent_dropout, variational=variational, key=key,
                 unroll=unroll, impl=impl, matmul_dtype=matmul_dtype)
    if lengths is None:
        last = ys[:, -1, :]
    else:
        idx = jnp.clip(jnp.asarray(lengths) - 1, 0, time_steps - 1)
        last = jnp.take_along_axis(ys, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0, :]
    return last.astype(params.w_out.dtype) @ params.w_out + params.b_out
