"""Dropout masks, sampled once outside the scan (random ops inside the loop are slow).

Masks hold the scale already (inverted dropout): 0 for a dropped unit, ``1 / (1 - rate)``
for a kept one, so applying one is a single multiply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_jax import _checks
from lstm_jax._types import DropoutMasks


def _scaled_keep_mask(key, rate: float, shape, dtype) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.zeros((), dtype))


def sample_masks(key, hidden_sizes, batch_size, time_steps, dropout, recurrent_dropout, variational, dtype,
                 *, broadcast_variational: bool) -> DropoutMasks:
    """Samples the masks for every layer. Variational output masks are ``[B, 1, H]`` unless
    ``broadcast_variational``, which materialises them as ``[B, T, H]``."""
    num_layers = len(hidden_sizes)
    output = recurrent = None
    out_key, rec_key = jax.random.split(key)
    if dropout > 0:
        keys = jax.random.split(out_key, num_layers)
        output = []
        for k, hidden in zip(keys, hidden_sizes):
            steps = 1 if variational else time_steps
            m = _scaled_keep_mask(k, dropout, (batch_size, steps, hidden), dtype)
            if variational and broadcast_variational:
                m = jnp.broadcast_to(m, (batch_size, time_steps, hidden))
            output.append(m)
        output = tuple(output)
    if recurrent_dropout > 0:
        keys = jax.random.split(rec_key, num_layers)
        recurrent = tuple(
            _scaled_keep_mask(k, recurrent_dropout, (batch_size, hidden), dtype)
            for k, hidden in zip(keys, hidden_sizes)
        )
    return DropoutMasks(output=output, recurrent=recurrent)


def make_dropout_masks(
    *,
    key: jax.Array,
    params,
    batch_size: int,
    time_steps: int,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    variational: bool = False,
) -> DropoutMasks:
    """Samples the masks that :func:`lstm_jax.lstm` would draw from ``key``.

    Args:
      key: a PRNG key.
      params: the stack's parameters (gives the number of layers, sizes and dtype).
      batch_size, time_steps: B and T.
      dropout: rate of each layer's output dropout: a fresh mask per timestep, or one per
        sequence reused at every step when ``variational``.
      recurrent_dropout: rate of the dropout on the h fed back into the recurrence, one mask
        per sequence.
      variational: reuse one output mask at every timestep (Gal & Ghahramani 2016).

    Returns:
      ``DropoutMasks(output, recurrent)``: ``output`` a tuple per layer of ``[B, T, H]``
      (or None when ``dropout == 0``), ``recurrent`` a tuple per layer of ``[B, H]`` (or None).
    """
    _checks.check_params(params)
    dropout = _checks.check_rate(dropout, "dropout")
    recurrent_dropout = _checks.check_rate(recurrent_dropout, "recurrent_dropout")
    for name, v in (("batch_size", batch_size), ("time_steps", time_steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    hidden_sizes = [p.w_hh.shape[0] for p in params]
    return sample_masks(key, hidden_sizes, batch_size, time_steps, dropout, recurrent_dropout,
                        bool(variational), params[0].w_hh.dtype, broadcast_variational=True)
