"""A persistent-style LSTM layer in Pallas (Triton backend): one kernel launch for all T steps,
forward and backward.

The candidate that ``bench/persistent.py`` (forward) and ``bench/run.py`` (``lstm_jax_pallas``:
the training step and inference of the whole model) time against XLA's scan, cuDNN and the
peers on a GPU. Not part of the library until a GPU measurement says it pays (the issue's
order: measure, then write it into the layer); it has the library layer's signature and
semantics (``_layer.layer_fused``'s, ``remat_chunk`` included; ``unroll`` has no meaning for a
loop inside a kernel), so that adopting it is a matter of registering it.

Each program of the grid owns ``batch_tile`` rows of the batch for the whole sequence: batch
rows are independent, so no program waits for another, and the loop over T runs inside the
kernel, with the state (``h, c`` forward; ``dh, dc`` backward) in registers. The recurrent
weights are either loaded once before the loop and kept on chip (``hold_weights=True``: the
persistent-RNN idea; it fits one SM only for small H, e.g. H=128 with bfloat16 operands,
128 KiB) or re-read at every step from L2 (``hold_weights=False``: one launch, no on-chip
residency).

* Forward kernel: ``z_k = zx[t, :, k] + h @ w_hh[:, k] + b[k]`` for each gate k in (i, f, g, o),
  then the cell update. Triton cannot slice or join register tensors, so the state and every
  gate are held as column blocks of C (``block``, :func:`default_block`), read from and written
  to column blocks of the library's layouts, and each gate block is a sum of ``H / C`` dots
  ``[tile, C] x [C, C]``. Small blocks also keep Triton's shared-memory staging of the weight
  operand small: whole ``[H, H]`` operands asked for more than an H100 block has at H=256
  (``bench/triton_resources.py``). For training it also writes the gate activations ``acts [T, B, 4H]`` and the cell
  states ``cs [T, B, H]``, the library's residuals.
* Backward kernel, over t = T-1 .. 0: ``dz_t [B, 4H]`` from ``dh, dc`` and the residuals (the
  equations of ``_layer._backward_steps``), written out, then ``dh <- sum_k dz_k @ w_hh[:, k].T``
  (accumulated block by block) and ``dc <- dc_total * f``. It carries only what is sequential, as the library's fused VJP.
* Lengths (``valid``: past a sequence's end the state is carried and the output is zero) and
  recurrent dropout (``rmask`` on ``h`` before ``w_hh``) as in the library, in both kernels.
* Outside the kernels, in XLA: the input projection before the forward (one GEMM over all steps)
  and ``dW_ih, dW_hh, db, d_xs`` after the backward (``_layer._param_and_input_grads``: one
  GEMM each over all steps), exactly as the library's fused layer.

Layouts are the library's: ``xs [T, B, in]``, ``w_ih [in, 4H]``, ``w_hh [H, 4H]``, ``b [4H]``,
gate order (i, f, g, o) as in :mod:`lstm_jax._cell`; the batch is padded to a multiple of
``batch_tile`` (and sliced back). float32 parameters and state; ``matmul_dtype=jnp.bfloat16``
casts the dots' operands (float32 accumulation), as the library's flag does. float32 dots follow
``jax_default_matmul_precision`` as XLA's do: IEEE float32 under "highest" (``bench/run.py``'s
default ``--precision float32``), TF32 otherwise.

Triton's constraints, checked up front: ``H`` a power of two >= 16 and ``batch_tile`` a power
of two >= 16 (its ``dot`` needs every dimension >= 16). ``interpret=True`` runs the kernels on
any backend (the tests compare them with the library on the CPU, values and gradients).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lstm_jax import _layer
from lstm_jax._stack import _fit_batch


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_sizes(hidden: int, batch_tile: int, block: int | None = None) -> None:
    if not _is_pow2(hidden) or hidden < 16:
        raise ValueError(f"hidden: expected a power of two >= 16 (Triton's dot), got {hidden}")
    if not _is_pow2(batch_tile) or batch_tile < 16:
        raise ValueError(f"batch_tile: expected a power of two >= 16 (Triton's dot), got {batch_tile}")
    if block is not None and (not _is_pow2(block) or not 16 <= block <= hidden):
        raise ValueError(f"block: expected a power of two in [16, hidden={hidden}], got {block}")


def default_block(hidden: int, matmul_dtype) -> int:
    """The column block C of the kernels' dots (``[tile, C] x [C, C]``), at most H: 128 for
    bfloat16 operands; for float32 64 up to H=256, 128 above. Triton stages a dot's ``[C, C]``
    weight operand in shared memory: with C = H it needs ``4H²`` bytes (float32), 256 KiB at
    H=256, more than an H100 block may have (227 KiB). At H=256 float32, C=64 spilled less
    than C=128 (56/72 against 1432/1192 B per thread); at H=512, C=64 means 256 dots per step
    and a Triton compile of minutes, C=128 about 100 s for both kernels. Measured by compiling
    for sm_90 with ``bench/triton_resources.py``."""
    if jnp.dtype(matmul_dtype) != jnp.float32:
        return min(hidden, 128)
    return min(hidden, 64 if hidden <= 256 else 128)


class _Config:
    """The static settings of one kernel pair (hashable, for the caches below)."""

    def __init__(self, steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret,
                 block=None):
        self.mm = jnp.dtype(matmul_dtype)
        self.matmul_dtype = None if self.mm == jnp.float32 else self.mm  # the library's flag
        # float32 operands: the precision XLA's dots get, from jax_default_matmul_precision
        # ("highest"/"float32": IEEE float32, as bench/run.py's default; unset or
        # "tensorfloat32": TF32, XLA's and Triton's default on a GPU).
        full = str(jax.config.jax_default_matmul_precision).lower() in ("highest", "float32", "fp32")
        self.precision = jax.lax.Precision.HIGHEST if self.mm == jnp.float32 and full else None
        block = default_block(hidden, self.mm) if block is None else block
        self.key = (steps, batch, hidden, batch_tile, hold_weights, self.mm.name, num_warps, interpret, self.precision,
                    block)
        (self.steps, self.batch, self.hidden, self.batch_tile, self.hold_weights, _, self.num_warps,
         self.interpret, _, self.block) = self.key
        self.blocks = hidden // block

    def with_steps(self, steps):
        """The same kernels (precision included) over ``steps`` timesteps: remat's chunks."""
        other = copy.copy(self)
        other.steps, other.key = steps, (steps,) + self.key[1:]
        return other

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Config) and self.key == other.key

    def dot(self, a, w):
        return jnp.dot(a.astype(self.mm), w, preferred_element_type=jnp.float32, precision=self.precision)

    def state(self, n):
        """Columns of block ``n`` of a ``[., H]`` array."""
        return pl.ds(n * self.block, self.block)

    def gate(self, k, n):
        """Columns of block ``n`` of gate ``k`` of a ``[., 4H]`` array."""
        return pl.ds(k * self.hidden + n * self.block, self.block)

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
def _forward_call(cfg: _Config, save_residuals: bool, has_valid: bool, has_rmask: bool):
    """``(zx [T,B,4H], b [1,4H], w_hh [H,4H], h0, c0[, valid [T,B]][, rmask [B,H]])
    -> (ys, h_T, c_T[, acts [T,B,4H], cs [T,B,H][, hs [T,B,H]]])``.

    ``valid`` is float32 (1: the step is inside the sequence; Triton loads no bools). ``hs``
    (the carried ``h``, which differs from ``ys`` past a sequence's end) only with ``valid``.
    The state is held as ``H / C`` column blocks ``[tile, C]`` (Triton cannot slice or join
    register tensors), each gate block the sum of ``H / C`` dots.
    """
    steps, hidden, tile, nb = cfg.steps, cfg.hidden, cfg.batch_tile, cfg.blocks
    blocks = range(nb)

    def kernel(*refs):
        zx_ref, b_ref, w_ref, h0_ref, c0_ref = refs[:5]
        refs = list(refs[5:])
        valid_ref = refs.pop(0) if has_valid else None
        rmask_ref = refs.pop(0) if has_rmask else None
        ys_ref, h_t_ref, c_t_ref, *residual_refs = refs
        rows = pl.ds(pl.program_id(0) * tile, tile)
        biases = [[b_ref[:, cfg.gate(k, n)] for n in blocks] for k in range(4)]  # [1, C] each

        def weight(m, k, n):  # rows block m, gate k, columns block n of w_hh: [C, C]
            return held[m][k][n] if held else w_ref[cfg.state(m), cfg.gate(k, n)]

        held = ([[[w_ref[cfg.state(m), cfg.gate(k, n)] for n in blocks] for k in range(4)] for m in blocks]
                if cfg.hold_weights else None)
        rmask = [rmask_ref[rows, cfg.state(m)] for m in blocks] if has_rmask else None

        def step(t, carry):
            h, c = carry
            h_in = [h[m] * rmask[m] for m in blocks] if has_rmask else h
            v = valid_ref[t, rows][:, None] > 0 if has_valid else None
            h_out, c_out = [], []
            for n in blocks:
                z = []
                for k in range(4):
                    acc = zx_ref[t, rows, cfg.gate(k, n)] + biases[k][n]
                    for m in blocks:
                        acc = acc + cfg.dot(h_in[m], weight(m, k, n))
                    z.append(acc)
                acts = (jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jnp.tanh(z[2]), jax.nn.sigmoid(z[3]))
                i, f, g, o = acts
                c_new = f * c[n] + i * g
                h_new = o * jnp.tanh(c_new)
                if has_valid:
                    ys_ref[t, rows, cfg.state(n)] = jnp.where(v, h_new, 0.0)
                    h_new, c_new = jnp.where(v, h_new, h[n]), jnp.where(v, c_new, c[n])
                else:
                    ys_ref[t, rows, cfg.state(n)] = h_new
                if save_residuals:
                    acts_ref, cs_ref = residual_refs[:2]
                    for k in range(4):
                        acts_ref[t, rows, cfg.gate(k, n)] = acts[k]
                    cs_ref[t, rows, cfg.state(n)] = c_new
                    if has_valid:
                        residual_refs[2][t, rows, cfg.state(n)] = h_new
                h_out.append(h_new)
                c_out.append(c_new)
            return tuple(h_out), tuple(c_out)

        init = (tuple(h0_ref[rows, cfg.state(n)] for n in blocks), tuple(c0_ref[rows, cfg.state(n)] for n in blocks))
        h, c = jax.lax.fori_loop(0, steps, step, init)
        for n in blocks:
            h_t_ref[rows, cfg.state(n)] = h[n]
            c_t_ref[rows, cfg.state(n)] = c[n]

    state = (cfg.batch, hidden)
    outs = [(steps,) + state, state, state]
    if save_residuals:
        outs += [(steps, cfg.batch, 4 * hidden), (steps,) + state] + ([(steps,) + state] if has_valid else [])
    return cfg.call(kernel, outs, 5 + has_valid + has_rmask)


@functools.lru_cache(maxsize=None)
def _backward_call(cfg: _Config, has_valid: bool, has_rmask: bool):
    """``(d_ys [T,B,H], acts, cs, c0, w_hh_t [4H,H], dh_T, dc_T[, valid [T,B]][, rmask, hs [T,B,H], h0])
    -> (dz [T,B,4H], dh0, dc0[, d_rmask [B,H]])``: the equations of ``_layer._backward_steps``.
    ``hs``: the carried ``h`` after each step. Column blocks as in the forward."""
    steps, hidden, tile, nb = cfg.steps, cfg.hidden, cfg.batch_tile, cfg.blocks
    blocks = range(nb)

    def kernel(*refs):
        dys_ref, acts_ref, cs_ref, c0_ref, wt_ref, dh_t_ref, dc_t_ref = refs[:7]
        refs = list(refs[7:])
        valid_ref = refs.pop(0) if has_valid else None
        rmask_ref, hs_ref, h0_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if has_rmask else (None,) * 3
        dz_ref, dh0_ref, dc0_ref, *d_rmask_ref = refs
        rows = pl.ds(pl.program_id(0) * tile, tile)

        def weight_t(k, n, m):  # w_hh[block m, gate k block n].T: [C, C]
            return held[k][n][m] if held else wt_ref[cfg.gate(k, n), cfg.state(m)]

        held = ([[[wt_ref[cfg.gate(k, n), cfg.state(m)] for m in blocks] for n in blocks] for k in range(4)]
                if cfg.hold_weights else None)
        c0 = [c0_ref[rows, cfg.state(n)] for n in blocks]
        rmask = [rmask_ref[rows, cfg.state(m)] for m in blocks] if has_rmask else None
        h0 = [h0_ref[rows, cfg.state(m)] for m in blocks] if has_rmask else None

        def step(s, carry):
            t = steps - 1 - s
            before = jnp.maximum(t - 1, 0)
            dh_carry, dc_carry, d_rmask = carry
            v = valid_ref[t, rows][:, None] > 0 if has_valid else None
            # dh_in[m] accumulates each column block's dz as soon as it is computed, so that only
            # one block's dz is live at a time (register pressure, see bench/README.md).
            dh_in, dc_out = [None] * nb, []
            for n in blocks:
                dh = dh_carry[n] + dys_ref[t, rows, cfg.state(n)]
                dc = dc_carry[n]
                if has_valid:
                    dh, dc = jnp.where(v, dh, 0.0), jnp.where(v, dc, 0.0)
                i, f, g, o = (acts_ref[t, rows, cfg.gate(k, n)] for k in range(4))
                tanh_c = jnp.tanh(cs_ref[t, rows, cfg.state(n)])
                c_prev = jnp.where(t > 0, cs_ref[before, rows, cfg.state(n)], c0[n])
                dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
                dz_n = (dc_total * g * i * (1 - i),
                        dc_total * c_prev * f * (1 - f),
                        dc_total * i * (1 - g * g),
                        dh * tanh_c * o * (1 - o))
                for k in range(4):
                    dz_ref[t, rows, cfg.gate(k, n)] = dz_n[k]
                    for m in blocks:
                        part = cfg.dot(dz_n[k], weight_t(k, n, m))
                        dh_in[m] = part if dh_in[m] is None else dh_in[m] + part
                dc_prev = dc_total * f
                if has_valid:
                    # Steps past a sequence's length passed the state through unchanged.
                    dc_prev = dc_prev + jnp.where(v, 0.0, dc_carry[n])
                dc_out.append(dc_prev)
            dh_out, d_rmask_out = [], []
            for m in blocks:
                dh_m = dh_in[m]
                if has_rmask:
                    h_prev = jnp.where(t > 0, hs_ref[before, rows, cfg.state(m)], h0[m])
                    d_rmask_out.append(d_rmask[m] + h_prev * dh_m)
                    dh_m = dh_m * rmask[m]
                if has_valid:
                    dh_m = dh_m + jnp.where(v, 0.0, dh_carry[m])
                dh_out.append(dh_m)
            return tuple(dh_out), tuple(dc_out), tuple(d_rmask_out) if has_rmask else d_rmask

        zero = jnp.zeros((tile, cfg.block), jnp.float32)
        init = (tuple(dh_t_ref[rows, cfg.state(n)] for n in blocks), tuple(dc_t_ref[rows, cfg.state(n)] for n in blocks),
                tuple(zero for _ in blocks))
        dh, dc, d_rmask = jax.lax.fori_loop(0, steps, step, init)
        for n in blocks:
            dh0_ref[rows, cfg.state(n)] = dh[n]
            dc0_ref[rows, cfg.state(n)] = dc[n]
            if has_rmask:
                d_rmask_ref[0][rows, cfg.state(n)] = d_rmask[n]

    state = (cfg.batch, hidden)
    outs = [(steps, cfg.batch, 4 * hidden), state, state] + ([state] if has_rmask else [])
    return cfg.call(kernel, outs, 7 + has_valid + 3 * has_rmask)


def _forward(cfg, zx, b, w_hh, h0, c0, valid, rmask, save_residuals):
    """``valid``: float32 0/1 (Triton loads no bools) or None."""
    extra = [a for a in (valid, rmask) if a is not None]
    call = _forward_call(cfg, save_residuals, valid is not None, rmask is not None)
    return call(zx, b.reshape(1, -1), w_hh.astype(cfg.mm), h0, c0, *extra)


def _backward_block(cfg, w_ih, w_hh, xs, h0, c0, valid, rmask, hs, acts, cs, d_ys, d_h_t, d_c_t):
    """Backpropagation through ``cfg.steps`` steps from the forward kernel's residuals: the
    backward kernel, then ``dW_ih, dW_hh, db, d_xs`` as one GEMM each over the steps
    (``_layer._param_and_input_grads``). Returns ``(dh0, dc0, d_rmask or None), (d_w_ih,
    d_w_hh, d_b, d_xs)``."""
    extra = ([] if valid is None else [valid]) + ([] if rmask is None else [rmask, hs, h0])
    dz, dh0, dc0, *d_rmask = _backward_call(cfg, valid is not None, rmask is not None)(
        d_ys, acts, cs, c0, w_hh.T.astype(cfg.mm), d_h_t, d_c_t, *extra)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    grads = _layer._param_and_input_grads(xs, w_ih, h_prev, dz, rmask, cfg.matmul_dtype)
    return (dh0, dc0, d_rmask[0] if d_rmask else None), grads


def _forward_with_residuals(cfg, w_ih, w_hh, b, xs, h0, c0, valid, rmask):
    """``(ys, h_T, c_T), (hs, acts, cs)``: the forward kernel saving what the backward needs."""
    ys, h_t, c_t, acts, cs, *hs = _forward(cfg, _projection(cfg, xs, w_ih), b, w_hh, h0, c0, valid, rmask, True)
    return (ys, h_t, c_t), (hs[0] if hs else ys, acts, cs)  # without lengths the carried h is the output


def _projection(cfg, xs, w_ih):
    return _layer._input_projection(xs, w_ih, jnp.float32, cfg.matmul_dtype)


def _primal(cfg):
    def layer(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        return _forward(cfg, _projection(cfg, xs, w_ih), b, w_hh, h0, c0, valid, rmask, False)

    return layer


@functools.lru_cache(maxsize=None)
def _layer_fn(cfg: _Config):
    """The layer on a batch that is a multiple of the tile, with its hand-written VJP.
    ``valid`` (float32 0/1) and ``rmask`` may be None."""
    layer = jax.custom_vjp(_primal(cfg))

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        outs, (hs, acts, cs) = _forward_with_residuals(cfg, w_ih, w_hh, b, xs, h0, c0, valid, rmask)
        return outs, (w_ih, w_hh, xs, h0, c0, valid, rmask, hs, acts, cs)

    def bwd(residuals, cotangents):
        w_ih, w_hh, xs, h0, c0, valid, rmask, hs, acts, cs = residuals
        (dh0, dc0, d_rmask), (d_w_ih, d_w_hh, d_b, d_xs) = _backward_block(
            cfg, w_ih, w_hh, xs, h0, c0, valid, rmask, hs, acts, cs, *cotangents)
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0, None, d_rmask

    layer.defvjp(fwd, bwd)
    return layer


@functools.lru_cache(maxsize=None)
def _layer_remat_fn(cfg: _Config, chunk: int):
    """:func:`_layer_fn` keeping only the state at every ``chunk``-th step for the backward
    pass, as ``_layer.layer_fused(remat_chunk=chunk)``: the forward runs the kernel once per
    chunk (no residuals); the backward, over the chunks in reverse, reruns each chunk's
    forward kernel saving its residuals, then its backward kernel, and accumulates the weight
    gradients (one GEMM each per chunk). T is padded to a multiple of ``chunk`` with invalid
    steps, which carry the state unchanged."""
    chunk_cfg = cfg.with_steps(chunk)
    layer = jax.custom_vjp(_primal(cfg))

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        xs_c, valid_c, steps = _layer._chunked(xs, valid, chunk)
        if valid_c is not None:  # bool where _chunked made it for the padding; the kernels take float
            valid_c = valid_c.astype(jnp.float32)

        def body(state, inputs):
            x_k, v_k = inputs
            ys, h, c = _forward(chunk_cfg, _projection(cfg, x_k, w_ih), b, w_hh, *state, v_k, rmask, False)
            return (h, c), (ys, state)  # keep the state at the chunk's start

        (h_t, c_t), (ys, starts) = jax.lax.scan(body, (h0, c0), (xs_c, valid_c))
        ys = ys.reshape((-1,) + ys.shape[2:])[:steps]
        return (ys, h_t, c_t), (w_ih, w_hh, b, xs_c, valid_c, rmask, starts)

    def bwd(residuals, cotangents):
        w_ih, w_hh, b, xs_c, valid_c, rmask, (h_starts, c_starts) = residuals
        d_ys, d_h_t, d_c_t = cotangents
        steps = d_ys.shape[0]
        d_ys_c = _layer._pad_time(d_ys, xs_c.shape[0] * chunk - steps).reshape(xs_c.shape[:2] + d_ys.shape[1:])

        def body(carry, inputs):
            (dh, dc, d_rmask), (g_ih, g_hh, g_b) = carry
            x_k, v_k, dy_k, h_k, c_k = inputs
            _, (hs, acts, cs) = _forward_with_residuals(chunk_cfg, w_ih, w_hh, b, x_k, h_k, c_k, v_k, rmask)
            (dh, dc, d_rmask_k), (d_w_ih, d_w_hh, d_b, d_x) = _backward_block(
                chunk_cfg, w_ih, w_hh, x_k, h_k, c_k, v_k, rmask, hs, acts, cs, dy_k, dh, dc)
            if rmask is not None:
                d_rmask = d_rmask + d_rmask_k
            return ((dh, dc, d_rmask), (g_ih + d_w_ih, g_hh + d_w_hh, g_b + d_b)), d_x

        d_rmask = None if rmask is None else jnp.zeros_like(rmask)
        zero_grads = (jnp.zeros_like(w_ih), jnp.zeros_like(w_hh), jnp.zeros_like(b))
        ((dh0, dc0, d_rmask), (d_w_ih, d_w_hh, d_b)), d_xs = jax.lax.scan(
            body, ((d_h_t, d_c_t, d_rmask), zero_grads), (xs_c, valid_c, d_ys_c, h_starts, c_starts), reverse=True)
        d_xs = d_xs.reshape((-1,) + d_xs.shape[2:])[:steps]
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0, None, d_rmask

    layer.defvjp(fwd, bwd)
    return layer


def _validate(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
    steps, batch, in_size = xs.shape
    hidden = w_hh.shape[0]
    if w_ih.shape != (in_size, 4 * hidden) or w_hh.shape != (hidden, 4 * hidden) or b.shape != (4 * hidden,):
        raise ValueError(f"w_ih, w_hh, b: expected [{in_size}, 4H], [H, 4H], [4H]; got {w_ih.shape}, {w_hh.shape}, "
                         f"{b.shape}")
    if h0.shape != (batch, hidden) or c0.shape != (batch, hidden):
        raise ValueError(f"h0, c0: expected [{batch}, {hidden}], got {h0.shape}, {c0.shape}")
    if valid is not None and (valid.shape != (steps, batch) or valid.dtype != jnp.bool_):
        raise ValueError(f"valid: expected bool [{steps}, {batch}], got {valid.dtype} {valid.shape}")
    if rmask is not None and rmask.shape != (batch, hidden):
        raise ValueError(f"rmask: expected [{batch}, {hidden}], got {rmask.shape}")
    for name, a in (("w_ih", w_ih), ("w_hh", w_hh), ("b", b), ("xs", xs), ("h0", h0), ("c0", c0), ("rmask", rmask)):
        if a is not None and a.dtype != jnp.float32:
            raise TypeError(f"{name}: expected float32 (the kernels' state and gate math), got {a.dtype}")
    return steps, batch, hidden


def _tiled(steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret, block):
    """The kernels' config for ``batch`` padded to a multiple of ``batch_tile``, and that batch."""
    check_sizes(hidden, batch_tile, block)
    padded = -(-batch // batch_tile) * batch_tile
    cfg = _Config(steps, padded, hidden, batch_tile, hold_weights,
                  jnp.float32 if matmul_dtype is None else matmul_dtype, num_warps, interpret, block)
    return cfg, padded


def lstm_layer(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, batch_tile=16, hold_weights=False,
               matmul_dtype=None, num_warps=4, block=None, remat_chunk=None, interpret=False):
    """One LSTM layer over a time-major sequence: the forward and backward recurrences each one
    Pallas kernel. Differentiable (reverse mode) in every argument.

    Args:
      w_ih ``[in, 4H]``, w_hh ``[H, 4H]``, b ``[4H]`` (forget bias folded in): float32.
      xs: ``[T, B, in]``. h0, c0: ``[B, H]``.
      valid: ``[T, B]`` bool (``t < lengths[b]``) or None: past a sequence's end the state
        is carried unchanged and the output is zero, as in the library.
      rmask: ``[B, H]`` recurrent dropout mask (scaled), multiplying ``h`` before ``w_hh``, or None.
      batch_tile: batch rows per program (a power of two >= 16).
      hold_weights: load ``w_hh`` once per program and keep it on chip, instead of at every step.
      matmul_dtype: the dots' operand dtype (e.g. ``jnp.bfloat16``); float32 accumulation, gates
        and state. ``None``: float32.
      num_warps: Triton warps per program.
      block: the column block C of the dots, ``[tile, C] x [C, C]`` (a power of two, 16 to H;
        default :func:`default_block`).
      remat_chunk: keep only every ``remat_chunk``-th state for the backward pass and recompute
        each chunk of steps (one forward and one backward kernel launch per chunk) when it is
        differentiated, as the library's option; ``None``: keep every step's residuals.
      interpret: run in Pallas's interpreter.

    Returns:
      ``(ys [T, B, H], h_T [B, H], c_T [B, H])``, what ``_layer.layer_fused`` returns.
    """
    if remat_chunk is not None and (isinstance(remat_chunk, bool) or not isinstance(remat_chunk, int)
                                    or remat_chunk < 1):
        raise ValueError(f"remat_chunk: expected None or a positive int, got {remat_chunk!r}")
    steps, batch, hidden = _validate(w_ih, w_hh, b, xs, h0, c0, valid, rmask)
    cfg, padded = _tiled(steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret, block)
    # Padded rows: invalid (the state stays), mask 0; sliced off below, their gradients too.
    valid = None if valid is None else _fit_batch(valid.astype(jnp.float32), 1, padded)
    rmask = None if rmask is None else _fit_batch(rmask, 0, padded)
    layer = _layer_fn(cfg) if remat_chunk is None else _layer_remat_fn(cfg, remat_chunk)
    ys, h_t, c_t = layer(w_ih, w_hh, b, _fit_batch(xs, 1, padded), _fit_batch(h0, 0, padded),
                         _fit_batch(c0, 0, padded), valid, rmask)
    return _fit_batch(ys, 1, batch), _fit_batch(h_t, 0, batch), _fit_batch(c_t, 0, batch)


def lstm_forward(zx, b, w_hh, h0, c0, *, batch_tile=16, hold_weights=False, matmul_dtype=None, num_warps=4,
                 block=None, interpret=False):
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
    cfg, padded = _tiled(steps, batch, hidden, batch_tile, hold_weights, matmul_dtype, num_warps, interpret, block)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ys, h_t, c_t = _forward(cfg, f32(_fit_batch(zx, 1, padded)), f32(b), w_hh, f32(_fit_batch(h0, 0, padded)),
                            f32(_fit_batch(c0, 0, padded)), None, None, False)
    return _fit_batch(ys, 1, batch), _fit_batch(h_t, 0, batch), _fit_batch(c_t, 0, batch)
