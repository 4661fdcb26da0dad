"""A persistent-style LSTM layer in Pallas (Triton backend): one kernel launch for all T steps,
forward and backward.

The candidate that ``bench/persistent.py`` (forward) and ``bench/run.py`` (``lstm_jax_pallas``:
the training step and inference of the whole model) time against XLA's scan, cuDNN and the
peers on a GPU. Not part of the library until a GPU measurement says it pays (the issue's
order: measure, then write it into the layer); it has the library layer's signature and
semantics (``_layer.layer_fused`` without lengths, recurrent dropout or remat), so that adopting
it is a matter of registering it.

Each program of the grid owns ``batch_tile`` rows of the batch for the whole sequence: batch
rows are independent, so no program waits for another, and the loop over T runs inside the
kernel, with the state (``h, c`` forward; ``dh, dc`` backward) in registers. The recurrent
weights are either loaded once before the loop and kept on chip (``hold_weights=True``: the
persistent-RNN idea; it fits one SM only for small H, e.g. H=128 with bfloat16 operands,
128 KiB) or re-read at every step from L2 (``hold_weights=False``: one launch, no on-chip
residency).

* Forward kernel: ``z_k = zx[t, :, k] + h @ w_hh[:, k] + b[k]`` for each gate k in (i, f, g, o)
  (four ``[tile, H] x [H, H]`` dots: Triton cannot slice a register tensor, so the gates are
  separate blocks, read from and written to column blocks of the library's layouts), then the
  cell update. For training it also writes the gate activations ``acts [T, B, 4H]`` and the cell
  states ``cs [T, B, H]``, the library's residuals.
* Backward kernel, over t = T-1 .. 0: ``dz_t [B, 4H]`` from ``dh, dc`` and the residuals (the
  equations of ``_layer._backward_steps``), written out, then ``dh <- sum_k dz_k @ w_hh[:, k].T``
  and ``dc <- dc_total * f``. It carries only what is sequential, as the library's fused VJP.
* Outside the kernels, in XLA: the input projection before the forward (one GEMM over all steps)
  and ``dW_ih, dW_hh, db, d_xs`` after the backward (``_layer._param_and_input_grads``: one
  GEMM each over all steps), exactly as the library's fused layer.

Layouts are the library's: ``xs [T, B, in]``, ``w_ih [in, 4H]``, ``w_hh [H, 4H]``, ``b [4H]``,
gate order (i, f, g, o) as in :mod:`lstm_jax._cell`; the batch is padded to a multiple of
``batch_tile`` (and sliced back). float32 parameters and state; ``matmul_dtype=jnp.bfloat16``
casts the dots' operands (float32 accumulation), as the library's flag does. float32 dots run
at full float32 precision (Triton's IEEE mode, not TF32), as ``bench/run.py``'s default.

Triton's constraints, checked up front: ``H`` a power of two >= 16 and ``batch_tile`` a power
of two >= 16 (its ``dot`` needs every dimension >= 16). ``interpret=True`` runs the kernels on
any backend (the tests compare them with the library on the CPU, values and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lstm_jax import _layer


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_sizes(hidden: int, batch_tile: int) -> None:
    if not _is_pow2(hidden) or hidden < 16:
        raise ValueError(f"hidden: expected a power of two >= 16 (Triton's dot), got {hidden}")
    if not _is_pow2(batch_tile) or batch_tile < 16:
        raise ValueError(f"batch_tile: expected a power of two >= 16 (Triton's dot), got {batch_tile}")


class _Config:
    """The static settings of one kernel pair (hashable, for the caches below)."""

    def __init__(self, steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret):
        self.key = (steps, batch, hidden, batch_tile, hold_weights, jnp.dtype(matmul_dtype).name, num_warps, interpret)
        (self.steps, self.batch, self.hidden, self.batch_tile, self.hold_weights, _, self.num_warps,
         self.interpret) = self.key
        self.mm = jnp.dtype(matmul_dtype)
        # float32 operands: IEEE float32 dots (Triton's default would be TF32).
        self.precision = jax.lax.Precision.HIGHEST if self.mm == jnp.float32 else None

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Config) and self.key == other.key

    def dot(self, a, w):
        return jnp.dot(a.astype(self.mm), w, preferred_element_type=jnp.float32, precision=self.precision)

    def call(self, kernel, out_shapes, num_inputs):
        compiler_params = None
        if not self.interpret:
            from jax.experimental.pallas import triton as pl_triton

            compiler_params = pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=1)
        anywhere = pl.BlockSpec(memory_space=pl.ANY)  # whole arrays; each program indexes its rows
        return pl.pallas_call(
            kernel,
            out_shape=tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes),
            grid=(self.batch // self.batch_tile,),
            in_specs=[anywhere] * num_inputs,
            out_specs=[anywhere] * len(out_shapes),
            compiler_params=compiler_params,
            interpret=self.interpret,
        )


@functools.lru_cache(maxsize=None)
def _forward_call(cfg: _Config, save_residuals: bool):
    """``(zx [T,B,4H], b [1,4H], w_hh [H,4H], h0, c0) -> (ys, h_T, c_T[, acts [T,B,4H], cs [T,B,H]])``."""
    steps, hidden, tile = cfg.steps, cfg.hidden, cfg.batch_tile

    def kernel(zx_ref, b_ref, w_ref, h0_ref, c0_ref, ys_ref, h_t_ref, c_t_ref, *residual_refs):
        rows = pl.ds(pl.program_id(0) * tile, tile)
        gate = [pl.ds(k * hidden, hidden) for k in range(4)]  # column blocks of the 4H axis
        biases = [b_ref[:, gate[k]] for k in range(4)]  # 4 x [1, H]
        held = [w_ref[:, gate[k]] for k in range(4)] if cfg.hold_weights else None  # 4 x [H, H]

        def step(t, carry):
            h, c = carry
            z = [zx_ref[t, rows, gate[k]] + cfg.dot(h, held[k] if held else w_ref[:, gate[k]]) + biases[k]
                 for k in range(4)]
            acts = (jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jnp.tanh(z[2]), jax.nn.sigmoid(z[3]))
            i, f, g, o = acts
            c = f * c + i * g
            h = o * jnp.tanh(c)
            ys_ref[t, rows, :] = h
            if save_residuals:
                acts_ref, cs_ref = residual_refs
                for k in range(4):
                    acts_ref[t, rows, gate[k]] = acts[k]
                cs_ref[t, rows, :] = c
            return h, c

        h, c = jax.lax.fori_loop(0, steps, step, (h0_ref[rows, :], c0_ref[rows, :]))
        h_t_ref[rows, :] = h
        c_t_ref[rows, :] = c

    state = (cfg.batch, hidden)
    outs = [(steps,) + state, state, state]
    if save_residuals:
        outs += [(steps, cfg.batch, 4 * hidden), (steps,) + state]
    return cfg.call(kernel, outs, 5)


@functools.lru_cache(maxsize=None)
def _backward_call(cfg: _Config):
    """``(d_ys [T,B,H], acts, cs, c0, w_hh_t [4H,H], dh_T, dc_T) -> (dz [T,B,4H], dh0, dc0)``."""
    steps, hidden, tile = cfg.steps, cfg.hidden, cfg.batch_tile

    def kernel(dys_ref, acts_ref, cs_ref, c0_ref, wt_ref, dh_t_ref, dc_t_ref, dz_ref, dh0_ref, dc0_ref):
        rows = pl.ds(pl.program_id(0) * tile, tile)
        gate = [pl.ds(k * hidden, hidden) for k in range(4)]
        held = [wt_ref[gate[k], :] for k in range(4)] if cfg.hold_weights else None  # 4 x [H, H]: w_hh[:, k].T
        c0 = c0_ref[rows, :]

        def step(s, carry):
            t = steps - 1 - s
            dh, dc = carry
            dh = dh + dys_ref[t, rows, :]
            i, f, g, o = (acts_ref[t, rows, gate[k]] for k in range(4))
            tanh_c = jnp.tanh(cs_ref[t, rows, :])
            c_prev = jnp.where(t > 0, cs_ref[jnp.maximum(t - 1, 0), rows, :], c0)
            dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
            dz = (dc_total * g * i * (1 - i),
                  dc_total * c_prev * f * (1 - f),
                  dc_total * i * (1 - g * g),
                  dh * tanh_c * o * (1 - o))
            dh = None
            for k in range(4):
                dz_ref[t, rows, gate[k]] = dz[k]
                part = cfg.dot(dz[k], held[k] if held else wt_ref[gate[k], :])
                dh = part if dh is None else dh + part
            return dh, dc_total * f

        dh, dc = jax.lax.fori_loop(0, steps, step, (dh_t_ref[rows, :], dc_t_ref[rows, :]))
        dh0_ref[rows, :] = dh
        dc0_ref[rows, :] = dc

    state = (cfg.batch, hidden)
    return cfg.call(kernel, [(steps, cfg.batch, 4 * hidden), state, state], 7)


def _forward(cfg, zx, b, w_hh, h0, c0, save_residuals):
    return _forward_call(cfg, save_residuals)(zx, b.reshape(1, -1), w_hh.astype(cfg.mm), h0, c0)


@functools.lru_cache(maxsize=None)
def _layer_fn(cfg: _Config):
    """The layer on a batch that is a multiple of the tile, with its hand-written VJP."""
    matmul_dtype = None if cfg.mm == jnp.float32 else cfg.mm

    def projection(xs, w_ih):
        return _layer._input_projection(xs, w_ih, jnp.float32, matmul_dtype)

    @jax.custom_vjp
    def layer(w_ih, w_hh, b, xs, h0, c0):
        return _forward(cfg, projection(xs, w_ih), b, w_hh, h0, c0, False)

    def fwd(w_ih, w_hh, b, xs, h0, c0):
        ys, h_t, c_t, acts, cs = _forward(cfg, projection(xs, w_ih), b, w_hh, h0, c0, True)
        return (ys, h_t, c_t), (w_ih, w_hh, xs, h0, c0, ys, acts, cs)

    def bwd(residuals, cotangents):
        w_ih, w_hh, xs, h0, c0, ys, acts, cs = residuals
        d_ys, d_h_t, d_c_t = cotangents
        dz, dh0, dc0 = _backward_call(cfg)(d_ys, acts, cs, c0, w_hh.T.astype(cfg.mm), d_h_t, d_c_t)
        h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
        d_w_ih, d_w_hh, d_b, d_xs = _layer._param_and_input_grads(xs, w_ih, h_prev, dz, None, matmul_dtype)
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0

    layer.defvjp(fwd, bwd)
    return layer


def _validate(w_ih, w_hh, b, xs, h0, c0):
    steps, batch, in_size = xs.shape
    hidden = w_hh.shape[0]
    if w_ih.shape != (in_size, 4 * hidden) or w_hh.shape != (hidden, 4 * hidden) or b.shape != (4 * hidden,):
        raise ValueError(f"w_ih, w_hh, b: expected [{in_size}, 4H], [H, 4H], [4H]; got {w_ih.shape}, {w_hh.shape}, "
                         f"{b.shape}")
    if h0.shape != (batch, hidden) or c0.shape != (batch, hidden):
        raise ValueError(f"h0, c0: expected [{batch}, {hidden}], got {h0.shape}, {c0.shape}")
    for name, a in (("w_ih", w_ih), ("w_hh", w_hh), ("b", b), ("xs", xs), ("h0", h0), ("c0", c0)):
        if a.dtype != jnp.float32:
            raise TypeError(f"{name}: expected float32 (the kernels' state and gate math), got {a.dtype}")
    return steps, batch, hidden


def lstm_layer(w_ih, w_hh, b, xs, h0, c0, *, batch_tile=16, hold_weights=False, matmul_dtype=None, num_warps=4,
               interpret=False):
    """One LSTM layer over a time-major sequence: the forward and backward recurrences each one
    Pallas kernel. Differentiable (reverse mode) in every argument.

    Args:
      w_ih ``[in, 4H]``, w_hh ``[H, 4H]``, b ``[4H]`` (forget bias folded in): float32.
      xs: ``[T, B, in]``. h0, c0: ``[B, H]``.
      batch_tile: batch rows per program (a power of two >= 16).
      hold_weights: load ``w_hh`` once per program and keep it on chip, instead of at every step.
      matmul_dtype: the dots' operand dtype (e.g. ``jnp.bfloat16``); float32 accumulation, gates
        and state. ``None``: float32.
      num_warps: Triton warps per program. interpret: run in Pallas's interpreter.

    Returns:
      ``(ys [T, B, H], h_T [B, H], c_T [B, H])``, what ``_layer.layer_fused`` returns.
    """
    steps, batch, hidden = _validate(w_ih, w_hh, b, xs, h0, c0)
    check_sizes(hidden, batch_tile)
    padded = -(-batch // batch_tile) * batch_tile
    cfg = _Config(steps, padded, hidden, batch_tile, hold_weights,
                  jnp.float32 if matmul_dtype is None else matmul_dtype, num_warps, interpret)
    if padded != batch:
        rows = padded - batch
        xs = jnp.pad(xs, [(0, 0), (0, rows), (0, 0)])
        h0, c0 = (jnp.pad(a, [(0, rows), (0, 0)]) for a in (h0, c0))
    ys, h_t, c_t = _layer_fn(cfg)(w_ih, w_hh, b, xs, h0, c0)
    return ys[:, :batch], h_t[:batch], c_t[:batch]


def lstm_forward(zx, b, w_hh, h0, c0, *, batch_tile=16, hold_weights=False, matmul_dtype=None, num_warps=4,
                 interpret=False):
    """One layer's forward recurrence in one kernel, over projected inputs: what
    ``_layer._recurrence`` computes (no lengths, no recurrent dropout, nothing saved for a
    backward pass). ``bench/persistent.py`` times this loop alone.

    Args:
      zx: ``[T, B, 4H]`` float32, the input projection ``x @ w_ih`` without the bias.
      b: ``[4H]`` the bias (forget bias folded in). ``w_hh``: ``[H, 4H]``.
      h0, c0: ``[B, H]`` float32. The other arguments as :func:`lstm_layer`'s.

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
    padded = -(-batch // batch_tile) * batch_tile
    cfg = _Config(steps, padded, hidden, batch_tile, hold_weights,
                  jnp.float32 if matmul_dtype is None else matmul_dtype, num_warps, interpret)
    pad = [(0, padded - batch), (0, 0)]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ys, h_t, c_t = _forward(cfg, f32(jnp.pad(zx, [(0, 0), pad[0], (0, 0)])), f32(b), w_hh, f32(jnp.pad(h0, pad)),
                            f32(jnp.pad(c0, pad)), False)
    return ys[:, :batch], h_t[:batch], c_t[:batch]
