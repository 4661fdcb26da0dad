"""A persistent-style LSTM forward in Pallas (Triton backend): one kernel launch for all T steps.

The candidate that ``bench/persistent.py`` times against XLA's scan on a GPU; not part of the
library until a GPU measurement says it pays (the issue's order: measure, then write it into
the layer). Inference only (no residuals for a backward pass).

Each program of the grid owns ``batch_tile`` rows of the batch for the whole sequence: batch
rows are independent, so no program waits for another, and the loop over T runs inside the
kernel, with ``h`` and ``c`` in registers. ``w_hh`` is either loaded once before the loop and
kept on chip (``hold_weights=True``: the persistent-RNN idea; it fits one SM only for small
H, e.g. H=128 with bfloat16 operands, 128 KiB) or re-read at every step from L2
(``hold_weights=False``: one launch, no on-chip residency).

Layout inside the kernel is gate-major, so that no register tensor is ever sliced (Triton
cannot): ``zx [T, 4, B, H]``, ``w [4, H, H]``, ``b [4, 1, H]``, gate order (i, f, g, o) as in
:mod:`lstm_jax._cell`. The wrapper converts from the library's ``zx [T, B, 4H]`` (without the
bias), ``w_hh [H, 4H]``, ``b [4H]`` and pads the batch to a multiple of ``batch_tile``.

Triton's constraints, checked up front: ``H`` a power of two ≥ 16 and ``batch_tile`` a power
of two ≥ 16 (its ``dot`` needs every dimension ≥ 16). ``interpret=True`` runs the kernel on
any backend (the tests compare it with ``lstm_jax._layer._recurrence`` on the CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_sizes(hidden: int, batch_tile: int) -> None:
    if not _is_pow2(hidden) or hidden < 16:
        raise ValueError(f"hidden: expected a power of two >= 16 (Triton's dot), got {hidden}")
    if not _is_pow2(batch_tile) or batch_tile < 16:
        raise ValueError(f"batch_tile: expected a power of two >= 16 (Triton's dot), got {batch_tile}")


@functools.lru_cache(maxsize=None)
def _pallas_forward(steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret):
    f32 = jnp.float32

    def kernel(zx_ref, b_ref, w_ref, h0_ref, c0_ref, ys_ref, h_t_ref, c_t_ref):
        rows = pl.ds(pl.program_id(0) * batch_tile, batch_tile)
        biases = [b_ref[k] for k in range(4)]  # 4 x [1, H]
        held = [w_ref[k] for k in range(4)] if hold_weights else None  # 4 x [H, H], on chip

        def step(t, carry):
            h, c = carry
            h_mm = h.astype(matmul_dtype)
            z = []
            for k in range(4):
                w_k = held[k] if hold_weights else w_ref[k]
                z.append(zx_ref[t, k, rows, :] + jnp.dot(h_mm, w_k, preferred_element_type=f32) + biases[k])
            i, f, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
            c = f * c + i * jnp.tanh(z[2])
            h = o * jnp.tanh(c)
            ys_ref[t, rows, :] = h
            return h, c

        h, c = jax.lax.fori_loop(0, steps, step, (h0_ref[rows, :], c0_ref[rows, :]))
        h_t_ref[rows, :] = h
        c_t_ref[rows, :] = c

    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)  # whole arrays; each program indexes its rows
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((steps, batch, hidden), f32),
                   jax.ShapeDtypeStruct((batch, hidden), f32),
                   jax.ShapeDtypeStruct((batch, hidden), f32)),
        grid=(batch // batch_tile,),
        in_specs=[anywhere] * 5,
        out_specs=[anywhere] * 3,
        compiler_params=compiler_params,
        interpret=interpret,
    )


def lstm_forward(zx, b, w_hh, h0, c0, *, batch_tile=16, hold_weights=False, matmul_dtype=None, num_warps=4,
                 interpret=False):
    """One layer's forward recurrence in one kernel: what ``_layer._recurrence`` computes
    (no lengths, no recurrent dropout, nothing saved for a backward pass).

    Args:
      zx: ``[T, B, 4H]`` float32, the input projection ``x @ w_ih`` without the bias.
      b: ``[4H]`` the bias (forget bias folded in). ``w_hh``: ``[H, 4H]``.
      h0, c0: ``[B, H]`` float32.
      batch_tile: batch rows per program (a power of two >= 16).
      hold_weights: load ``w_hh`` once and keep it on chip, instead of at every step.
      matmul_dtype: the dot's operand dtype (e.g. ``jnp.bfloat16``); float32 accumulation,
        gates and state. ``None``: float32.
      num_warps: Triton warps per program. interpret: run in Pallas's interpreter.

    Returns:
      ``(ys [T, B, H], h_T [B, H], c_T [B, H])``.
    """
    steps, batch, four_h = zx.shape
    hidden = four_h // 4
    if four_h != 4 * hidden or w_hh.shape != (hidden, four_h) or b.shape != (four_h,):
        raise ValueError(f"zx, w_hh, b: expected [T, B, 4H], [H, 4H], [4H]; got {zx.shape}, {w_hh.shape}, {b.shape}")
    if h0.shape != (batch, hidden) or c0.shape != (batch, hidden):
        raise ValueError(f"h0, c0: expected [{batch}, {hidden}], got {h0.shape}, {c0.shape}")
    check_sizes(hidden, batch_tile)
    mm = jnp.dtype(matmul_dtype if matmul_dtype is not None else jnp.float32)
    padded = -(-batch // batch_tile) * batch_tile
    pad = [(0, padded - batch), (0, 0)]
    zx4 = jnp.pad(zx, [(0, 0), (0, padded - batch), (0, 0)]).reshape(steps, padded, 4, hidden).transpose(0, 2, 1, 3)
    w4 = w_hh.reshape(hidden, 4, hidden).transpose(1, 0, 2).astype(mm)
    call = _pallas_forward(steps, padded, hidden, batch_tile, hold_weights, mm, num_warps, interpret)
    ys, h_t, c_t = call(zx4.astype(jnp.float32), b.reshape(4, 1, hidden).astype(jnp.float32), w4,
                        jnp.pad(h0, pad).astype(jnp.float32), jnp.pad(c0, pad).astype(jnp.float32))
    return ys[:, :batch], h_t[:batch], c_t[:batch]
