"""Pytrees shared by the cell, the scan and the stack."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class LSTMLayerParams(NamedTuple):
    """Weights of one LSTM layer, gate order (i, f, g, o) along the last axis.

    ``z = x @ w_ih + h @ w_hh + b`` is split into four equal chunks of size H.
    """

    w_ih: jax.Array  # [input_size, 4 * hidden_size]
    w_hh: jax.Array  # [hidden_size, 4 * hidden_size]
    b: jax.Array  # [4 * hidden_size]


class LSTMState(NamedTuple):
    """Recurrent state of one layer."""

    h: jax.Array  # [batch, hidden_size]
    c: jax.Array  # [batch, hidden_size]


class DropoutMasks(NamedTuple):
    """Explicit dropout masks for :func:`lstm_jax.lstm`, one entry per layer.

    Values are already scaled (inverted dropout): 0 for a dropped unit and
    ``1 / (1 - rate)`` for a kept one. ``None`` (for the whole field or for one
    layer) means no dropout there.
    """

    output: Optional[tuple[Optional[jax.Array], ...]]  # per layer: [batch, time, H] or [batch, 1, H]
    recurrent: Optional[tuple[Optional[jax.Array], ...]]  # per layer: [batch, H]
