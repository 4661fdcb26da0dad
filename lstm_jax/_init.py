"""Parameter initialisation and zero states."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_jax import _checks
from lstm_jax._types import LSTMLayerParams, LSTMState


def init_lstm(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    dtype=jnp.float32,
) -> tuple[LSTMLayerParams, ...]:
    """Initialises a stack of LSTM layers as ``torch.nn.LSTM`` does: every weight and bias
    drawn from U(-1/sqrt(H), 1/sqrt(H)).

    Args:
      key: a PRNG key.
      input_size: features per timestep of the first layer's input.
      hidden_size: H, units per layer.
      num_layers: layers in the stack; layer k+1 reads layer k's outputs.
      dtype: a floating dtype.

    Returns:
      A tuple of ``LSTMLayerParams(w_ih [in, 4H], w_hh [H, 4H], b [4H])``, one per layer.
    """
    for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    bound = 1.0 / (hidden_size ** 0.5)
    layers = []
    for k, layer_key in enumerate(jax.random.split(key, num_layers)):
        k_ih, k_hh, k_b = jax.random.split(layer_key, 3)
        in_size = input_size if k == 0 else hidden_size
        uniform = lambda kk, shape: jax.random.uniform(kk, shape, dtype, -bound, bound)  # noqa: E731
        layers.append(
            LSTMLayerParams(
                w_ih=uniform(k_ih, (in_size, 4 * hidden_size)),
                w_hh=uniform(k_hh, (hidden_size, 4 * hidden_size)),
                b=uniform(k_b, (4 * hidden_size,)),
            )
        )
    return tuple(layers)


def zero_state(params, batch_size: int) -> tuple[LSTMState, ...]:
    """Zero ``LSTMState(h [B, H], c [B, H])`` for every layer, in the params' dtype."""
    _checks.check_params(params)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return tuple(
        LSTMState(
            jnp.zeros((batch_size, p.w_hh.shape[0]), p.w_hh.dtype),
            jnp.zeros((batch_size, p.w_hh.shape[0]), p.w_hh.dtype),
        )
        for p in params
    )
