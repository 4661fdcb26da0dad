"""Conversion to and from ``torch.nn.LSTM`` weights (without importing torch).

``torch.nn.LSTM`` stores ``weight_ih_l{k} [4H, in]``, ``weight_hh_l{k} [4H, H]`` and two
biases ``bias_ih_l{k}, bias_hh_l{k} [4H]``, gate order (i, f, g, o) like ours. We keep the
transposes (``x @ w_ih``) and one bias, the sum of torch's two.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_jax import _checks
from lstm_jax._types import LSTMLayerParams


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def to_torch(params) -> dict[str, np.ndarray]:
    """Returns a dict of NumPy arrays named and shaped as ``torch.nn.LSTM``'s state_dict.

    ``bias_ih_l{k}`` holds our bias and ``bias_hh_l{k}`` zeros, so the sum is exact. Load it
    with ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``; the
    torch module then computes what ``lstm(params, xs, forget_bias=0.0)`` computes.
    """
    _checks.check_params(params)
    sd = {}
    for k, p in enumerate(params):
        sd[f"weight_ih_l{k}"] = np.ascontiguousarray(np.asarray(p.w_ih).T)
        sd[f"weight_hh_l{k}"] = np.ascontiguousarray(np.asarray(p.w_hh).T)
        sd[f"bias_ih_l{k}"] = np.asarray(p.b).copy()
        sd[f"bias_hh_l{k}"] = np.zeros_like(np.asarray(p.b))
    return sd


def from_torch(sd_or_module: Any, *, dtype=None) -> tuple[LSTMLayerParams, ...]:
    """Converts a ``torch.nn.LSTM`` (or its state_dict) to a tuple of ``LSTMLayerParams``.

    ``lstm(params, xs, forget_bias=0.0)`` then matches the torch module exactly: torch has
    no separate forget bias (pass ``forget_bias=0.0``, not the TF-style default 1.0).
    Unidirectional LSTMs without ``proj_size`` only. ``dtype`` defaults to the tensors' own.
    """
    module = sd_or_module if hasattr(sd_or_module, "state_dict") else None
    if module is not None:
        if getattr(module, "bidirectional", False):
            raise ValueError("sd_or_module: expected a unidirectional LSTM, got bidirectional=True")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"sd_or_module: expected proj_size=0, got proj_size={module.proj_size}")
        sd = module.state_dict()
    elif isinstance(sd_or_module, dict):
        sd = sd_or_module
    else:
        raise TypeError(f"sd_or_module: expected a torch.nn.LSTM or its state_dict, got {type(sd_or_module).__name__}")
    if any(name.endswith("_reverse") for name in sd):
        raise ValueError("sd_or_module: expected a unidirectional LSTM, got *_reverse weights")
    if any(name.startswith("weight_hr") for name in sd):
        raise ValueError("sd_or_module: expected no projection (proj_size=0), got weight_hr_l* weights")
    layers = []
    k = 0
    while f"weight_ih_l{k}" in sd:
        if f"weight_hh_l{k}" not in sd:
            raise ValueError(f"sd_or_module: expected weight_hh_l{k} beside weight_ih_l{k}, it is missing")
        w_ih = _to_numpy(sd[f"weight_ih_l{k}"])
        w_hh = _to_numpy(sd[f"weight_hh_l{k}"])
        b = np.zeros(w_ih.shape[0], w_ih.dtype)
        for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
            if name in sd:
                b = b + _to_numpy(sd[name])
        cast = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray
        layers.append(LSTMLayerParams(cast(w_ih.T), cast(w_hh.T), cast(b)))
        k += 1
    if not layers:
        raise ValueError(f"sd_or_module: expected keys weight_ih_l0, weight_hh_l0, ..., got {sorted(sd)[:6]}")
    params = tuple(layers)
    _checks.check_params(params, "sd_or_module")
    return params
