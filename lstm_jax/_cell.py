"""The LSTM cell: gate equations for one timestep.

With ``z = x @ w_ih + h @ w_hh + b`` split in the order (i, f, g, o)::

    i = sigmoid(z_i)
    f = sigmoid(z_f + forget_bias)
    g = tanh(z_g)
    o = sigmoid(z_o)
    c' = f * c + i * g
    h' = o * tanh(c')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_jax import _checks
from lstm_jax._types import LSTMLayerParams, LSTMState


def gate_activations(z: jax.Array) -> jax.Array:
    """Applies sigmoid to the i, f, o chunks and tanh to the g chunk of ``z [..., 4H]``.

    One elementwise pass over the whole ``[..., 4H]`` block (tanh(x) = 2*sigmoid(2x) - 1)
    so that XLA emits a single fusion with no split or concatenation.
    """
    four_h = z.shape[-1]
    hidden = four_h // 4
    is_g = (jnp.arange(four_h) // hidden) == 2
    scale = jnp.where(is_g, 2.0, 1.0).astype(z.dtype)
    s = jax.nn.sigmoid(z * scale)
    return jnp.where(is_g, 2.0 * s - 1.0, s)


def fold_forget_bias(b: jax.Array, forget_bias) -> jax.Array:
    """Returns ``b`` with ``forget_bias`` added to its f chunk ``[H:2H]``."""
    if isinstance(forget_bias, (int, float)) and forget_bias == 0:
        return b
    hidden = b.shape[-1] // 4
    is_f = (jnp.arange(b.shape[-1]) // hidden) == 1
    return b + jnp.where(is_f, jnp.asarray(forget_bias, b.dtype), jnp.zeros((), b.dtype))


def cell_update(acts: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From gate activations ``[B, 4H]`` and ``c [B, H]``: returns ``(h', c', tanh(c'))``."""
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    c_new = f * c + i * g
    tanh_c = jnp.tanh(c_new)
    return o * tanh_c, c_new, tanh_c


def lstm_cell(
    layer_params: LSTMLayerParams,
    state: LSTMState,
    x: jax.Array,
    *,
    forget_bias: float = 1.0,
) -> tuple[LSTMState, jax.Array]:
    """One LSTM step.

    Args:
      layer_params: one layer's :class:`LSTMLayerParams`.
      state: ``LSTMState(h [B, H], c [B, H])``.
      x: input ``[B, in]``.
      forget_bias: added to the forget gate's pre-activation (1.0 as TF's BasicLSTMCell;
        0.0 reproduces ``torch.nn.LSTM``).

    Returns:
      ``(new_state, h)`` with ``h [B, H]`` equal to ``new_state.h``.
    """
    _checks.check_layer_params(layer_params, "layer_params")
    hidden = layer_params.w_hh.shape[0]
    in_size = layer_params.w_ih.shape[0]
    _checks.check_float_array(x, "x")
    if x.ndim != 2 or x.shape[1] != in_size:
        raise ValueError(f"x: expected shape [batch, {in_size}], got {tuple(x.shape)}")
    _checks.check_state(state, "state", x.shape[0], hidden)
    z = x @ layer_params.w_ih + state.h @ layer_params.w_hh + fold_forget_bias(layer_params.b, forget_bias)
    h, c, _ = cell_update(gate_activations(z), state.c)
    return LSTMState(h, c), h
