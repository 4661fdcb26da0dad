"""Argument checks. They read only shapes, dtypes and Python values, so they run once at
trace time and the jitted path pays nothing."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax._types import LSTMLayerParams, LSTMState


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def is_concrete(a) -> bool:
    """True when ``a``'s values are known now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(a, jax.core.Tracer)


def check_float_array(a, name: str) -> None:
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")


def check_layer_params(p, name: str) -> None:
    if not isinstance(p, LSTMLayerParams):
        raise TypeError(f"{name}: expected LSTMLayerParams(w_ih, w_hh, b), got {type(p).__name__}")
    for field in ("w_ih", "w_hh", "b"):
        check_float_array(getattr(p, field), f"{name}.{field}")
    w_ih, w_hh, b = _shape(p.w_ih), _shape(p.w_hh), _shape(p.b)
    if len(w_hh) != 2 or w_hh[0] < 1 or w_hh[1] != 4 * w_hh[0]:
        raise ValueError(f"{name}.w_hh: expected shape [H, 4H] with H >= 1, got {w_hh}")
    hidden = w_hh[0]
    if len(w_ih) != 2 or w_ih[1] != 4 * hidden or w_ih[0] < 1:
        raise ValueError(f"{name}.w_ih: expected shape [input_size, {4 * hidden}], got {w_ih}")
    if b != (4 * hidden,):
        raise ValueError(f"{name}.b: expected shape [{4 * hidden}], got {b}")


def check_params(params, name: str = "params") -> None:
    """Checks a non-empty sequence of LSTMLayerParams whose sizes chain."""
    if isinstance(params, LSTMLayerParams) or not isinstance(params, Sequence) or len(params) == 0:
        raise TypeError(
            f"{name}: expected a non-empty tuple of LSTMLayerParams (one per layer, as init_lstm returns), "
            f"got {type(params).__name__}"
            + (" of length 0" if isinstance(params, Sequence) and len(params) == 0 else "")
        )
    prev_hidden = None
    for k, p in enumerate(params):
        check_layer_params(p, f"{name}[{k}]")
        in_size, hidden = _shape(p.w_ih)[0], _shape(p.w_hh)[0]
        if prev_hidden is not None and in_size != prev_hidden:
            raise ValueError(
                f"{name}[{k}].w_ih: layer {k} reads layer {k - 1}'s outputs, so expected input size "
                f"{prev_hidden}, got {in_size}"
            )
        prev_hidden = hidden


def check_state(state, name: str, batch: int, hidden: int) -> None:
    if not isinstance(state, LSTMState):
        raise TypeError(f"{name}: expected LSTMState(h, c), got {type(state).__name__}")
    for field in ("h", "c"):
        a = getattr(state, field)
        check_float_array(a, f"{name}.{field}")
        if _shape(a) != (batch, hidden):
            raise ValueError(f"{name}.{field}: expected shape [{batch}, {hidden}], got {_shape(a)}")


def check_rate(rate, name: str) -> float:
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(f"{name}: expected a Python float in [0, 1), got a traced value; mark it static")
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(rate).__name__} {rate!r}")
    r = float(rate)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}")
    return r
