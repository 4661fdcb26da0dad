"""One LSTM layer over a whole sequence, time-major: two implementations.

Both take the layer's weights with the forget bias already folded into ``b`` and
return the same values:

* :func:`layer_scan`, the slow, obviously correct path: ``jax.lax.scan`` over the cell,
  differentiated by JAX's autodiff. Supports forward and reverse mode at any order.
* :func:`layer_fused`, the fast path: the same forward, with a ``jax.custom_vjp`` whose
  backward scan carries only what is sequential (``dh, dc -> dz_t``, then
  ``dz_t @ w_hh.T``). ``dW_ih``, ``dW_hh``, ``db`` and the input gradient are each one
  large matmul over all timesteps after the scan, instead of T small ones. Reverse mode
  only (``jax.jvp`` of a ``custom_vjp`` is not defined); use ``impl="scan"`` for
  forward mode.

In both, the input projection for every timestep is one ``[T*B, in] x [in, 4H]`` matmul
outside the loop; the loop body does only ``h @ w_hh``, the bias add and the gate math.
The exceptions are in the fused layer's forward when nothing is differentiated (inference):
with ``project_in_loop=True`` each step computes ``x_t @ w_ih`` itself, and with
``project_chunk=K`` an outer loop projects K steps at a time for an inner loop over them; both
save writing the whole ``[T, B, 4H]`` projection to memory and reading it back.
:func:`lstm_jax.lstm` chooses between the three on CPU by measurement
(``_stack._cpu_projection``); the values are the same.

The fused path keeps its ``[T, B, 4H]`` residuals without allocating them anew: the forward
writes step t's gate activations over the projected inputs of step t, and the backward
(with ``unroll=1``, the default) writes ``dz_t`` over the activations of step t, each in a
loop-carried buffer that XLA updates in place. Stacked scan outputs would be new buffers,
zero-filled before the loop (8% of the pixel training step's kernel time); on a 2-core Xeon
the pixel training step went from 0.68 to 0.53 s, the tutorial's from 173 to 161 ms. In the
same way the inference forward of a layer whose input is ``[T, B, H]`` writes its outputs
over that input once projected (:func:`_primal_fn`), unless it projects inside the loop.

Rematerialisation (``remat_chunk=K``) for long sequences: only the state at every K-th step
is kept for the backward pass, and each chunk of K steps is recomputed just before it is
differentiated. ``layer_scan`` does this with ``jax.checkpoint`` around an inner scan over
each chunk; ``layer_fused`` does it in its backward scan over chunks, accumulating the
weight gradients with one matmul per chunk. Sequences are padded to a multiple of K with
invalid steps (which leave the state unchanged), so any T works.

``matmul_dtype=jnp.bfloat16`` runs every matmul with bfloat16 operands and float32
accumulation (``preferred_element_type``); the gate math, the cell state and the returned
values stay in the parameters' dtype. Meant for bfloat16 matrix units: GPUs, TPUs, CPUs with
AMX. For the latter, ``row_major_weight_grads=True`` (which :func:`lstm_jax.lstm` sets on CPU
with bfloat16 matmuls) transposes the weight gradients' left-hand sides so that XLA:CPU runs
them as row-major GEMMs on YNNPACK's bfloat16 kernels; its forward then saves the state
before each step instead of after it, which that transpose reads as a plain array.

Shapes: ``xs [T, B, in]``, ``h0, c0 [B, H]``, ``valid [T, B]`` bool (``t < lengths[b]``)
or None, ``rmask [B, H]`` (recurrent dropout, scaled) or None. Returns
``ys [T, B, H]`` (zeros where not valid), ``h_T``, ``c_T``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from lstm_jax._cell import cell_update, gate_activations


def _mm(a, b, out_dtype):
    """``a @ b`` in ``b``'s dtype (bfloat16 when asked) accumulated in ``out_dtype``."""
    return jnp.matmul(a.astype(b.dtype), b, preferred_element_type=out_dtype)


def _einsum(spec, a, b, matmul_dtype, out_dtype):
    if matmul_dtype is not None:
        a, b = a.astype(matmul_dtype), b.astype(matmul_dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def _input_projection(xs, w_ih, out_dtype, matmul_dtype=None):
    """``xs @ w_ih`` for every timestep, ``[T, B, 4H]``, without the bias: ``_forward_steps``
    adds ``b`` inside its gate fusion, which saves XLA a separate pass over this array (the
    tutorial's inference measured 8-10% faster; training unchanged)."""
    return _einsum("tbi,ig->tbg", xs, w_ih, matmul_dtype, out_dtype)


def _cast(w, matmul_dtype):
    return w if matmul_dtype is None else w.astype(matmul_dtype)


def _forward_steps(xs, w_ih, b, w_hh, h0, c0, valid, rmask, unroll, save_residuals, matmul_dtype=None,
                   project_in_loop=False, save_prev_h=False, project_chunk=None, output_over_input=False):
    """The recurrence over ``xs [T, B, in]``, whose input projection is one matmul before the
    loop, or (only without ``save_residuals``) one per step inside it (``project_in_loop``),
    or one per ``project_chunk`` steps (:func:`_recurrence_in_chunks`).

    ``output_over_input`` (only without ``save_residuals``; ignored with ``project_in_loop``):
    where ``xs`` is ``[T, B, H]`` in the state's dtype, the outputs are written over the inputs,
    each once it has been projected, instead of into a new buffer (see :func:`_primal_fn`).

    Returns ``((h_T, c_T), ys)``, or ``((h_T, c_T), (ys, acts, hs, cs))`` when saving what the
    backward pass needs (``hs``/``cs``: the carried state after each step; with ``save_prev_h``,
    ``hs`` is the carried ``h`` before each step instead).
    """
    chunked = project_chunk is not None and project_chunk < xs.shape[0]
    if (project_in_loop or chunked or output_over_input) and save_residuals:
        raise ValueError("project_in_loop, project_chunk, output_over_input: the backward pass needs the inputs and "
                         "the saved activations are written over the projected inputs")
    over_input = output_over_input and xs.shape[-1] == h0.shape[-1] and xs.dtype == h0.dtype
    if project_in_loop:
        # Not over its input: each step reading its input from the buffer it writes into made
        # the tutorial's 3-layer inference (B=128, layers 2-3 in the loop) 4-7% slower.
        w_ih = _cast(w_ih, matmul_dtype)
        return _recurrence(xs, b, w_hh, h0, c0, valid, rmask, unroll, False,
                           project=lambda x_t: _mm(x_t, w_ih, b.dtype))
    if chunked:
        return _recurrence_in_chunks(xs, w_ih, b, w_hh, h0, c0, valid, rmask, unroll, matmul_dtype, project_chunk,
                                     over_input)
    zx = _input_projection(xs, w_ih, b.dtype, matmul_dtype)
    if over_input:  # xs is dead once projected
        _, h_t, c_t, ys = _recurrence(zx, b, w_hh, None, None, valid, rmask, unroll, False,
                                      out=(jnp.int32(0), h0, c0, xs))
        return (h_t, c_t), ys
    return _recurrence(zx, b, w_hh, h0, c0, valid, rmask, unroll, save_residuals, save_prev_h=save_prev_h)


def _recurrence_in_chunks(xs, w_ih, b, w_hh, h0, c0, valid, rmask, unroll, matmul_dtype, chunk,
                          over_input=False):
    """The inference recurrence projecting its inputs ``chunk`` steps at a time: an outer loop
    projects ``[chunk, B, in]`` with one matmul into a ``[chunk, B, 4H]`` array that the inner
    loop reads back while it is still in cache, instead of writing all T steps' projections to
    memory first (and, beyond glibc's mmap threshold, page-faulting them in at every call). The
    steps beyond the last whole chunk run as one shorter chunk (not padded with invalid steps
    as ``_chunked`` does for remat, which would add a ``valid`` mask to every step). Both loops
    write each step's output in place into one ``[T, B, H]`` buffer, so nothing is concatenated:
    with ``over_input``, ``xs`` itself, each chunk's inputs read from it before they are
    overwritten."""
    time_steps = xs.shape[0]
    whole, rest = divmod(time_steps, chunk)

    def run(carry, x_k, v_k):
        zx = _input_projection(x_k, w_ih, b.dtype, matmul_dtype)
        return _recurrence(zx, b, w_hh, None, None, v_k, rmask, unroll, False, out=carry)

    def inputs_of(carry):  # over_input: the buffer the outputs go into, read before they do
        return carry[3] if over_input else xs

    def run_chunk(carry, v_k):
        return run(carry, jax.lax.dynamic_slice_in_dim(inputs_of(carry), carry[0], chunk), v_k), None

    ys = xs if over_input else jnp.zeros((time_steps,) + h0.shape, h0.dtype)
    carry = (jnp.int32(0), h0, c0, ys)
    v_chunks = None if valid is None else valid[:whole * chunk].reshape((whole, chunk) + valid.shape[1:])
    carry, _ = jax.lax.scan(run_chunk, carry, v_chunks, length=whole)
    if rest:
        carry = run(carry, inputs_of(carry)[whole * chunk:], None if valid is None else valid[whole * chunk:])
    _, h_t, c_t, ys = carry
    return (h_t, c_t), ys


def _recurrence(zx, b, w_hh, h0, c0, valid, rmask, unroll, save_residuals, project=None, save_prev_h=False,
                out=None):
    """The loop of :func:`_forward_steps` over the projected inputs ``zx [T, B, 4H]`` (without
    ``b``), or over ``xs [T, B, in]`` projected at each step by ``project``. Separate so that
    ``bench/persistent.py`` can time the loop alone. Saving residuals, step t writes its gate
    activations over ``zx[t]``, just read, in place (module docstring). With ``out = (t0, h0,
    c0, ys)`` (then ``h0``, ``c0`` are None) step j writes its output into ``ys[t0 + j]`` and the
    loop returns that carry, advanced.
    """

    def cell(h, c, zx_t, v_t):
        h_in = h if rmask is None else h * rmask
        if project is not None:
            zx_t = project(zx_t)
        acts = gate_activations(zx_t + _mm(h_in, w_hh, zx_t.dtype) + b)
        h_new, c_new, _ = cell_update(acts, c)
        if v_t is None:
            return acts, h_new, c_new, h_new
        v = v_t[:, None]
        y = jnp.where(v, h_new, jnp.zeros_like(h_new))
        return acts, jnp.where(v, h_new, h), jnp.where(v, c_new, c), y

    if out is not None:
        def step_into(carry, inputs):
            t, h, c, ys = carry
            _, h_new, c_new, y = cell(h, c, *inputs)
            return (t + 1, h_new, c_new, jax.lax.dynamic_update_index_in_dim(ys, y, t, 0)), None

        return jax.lax.scan(step_into, out, (zx, valid), unroll=unroll)[0]

    if not save_residuals:
        def step(carry, inputs):
            _, h_new, c_new, y = cell(*carry, *inputs)
            return (h_new, c_new), y

        return jax.lax.scan(step, (h0, c0), (zx, valid), unroll=unroll)

    if zx.shape[0] == 0:  # no steps (the in-place body below could not even be traced)
        empty = jnp.zeros((0,) + h0.shape, h0.dtype)
        return (h0, c0), (empty, zx, empty, jnp.zeros((0,) + c0.shape, c0.dtype))

    def step_saving(carry, v_t):
        t, h, c, buf = carry
        acts, h_new, c_new, y = cell(h, c, jax.lax.dynamic_index_in_dim(buf, t, keepdims=False), v_t)
        buf = jax.lax.dynamic_update_index_in_dim(buf, acts, t, 0)
        if save_prev_h:
            h_saved = h
        else:  # without lengths the carried h is the output: emit one copy
            h_saved = None if v_t is None else h_new
        return (t + 1, h_new, c_new, buf), (y, h_saved, c_new)

    (_, h_t, c_t, acts), (ys, hs, cs) = jax.lax.scan(
        step_saving, (jnp.int32(0), h0, c0, zx), valid, length=zx.shape[0], unroll=unroll)
    return (h_t, c_t), (ys, acts, ys if hs is None else hs, cs)


def _backward_steps(w_hh_t, d_ys, acts, hs, cs, h0, c0, valid, rmask, carry, unroll, hs_are_prev=False):
    """Backpropagation through the recurrence of one block of steps (``hs_are_prev``: ``hs`` is
    the state before each step, as ``_forward_steps(save_prev_h=True)`` saves it).

    ``carry = (dh, dc, d_rmask)`` holds the cotangents of the state after the block's last
    step. Returns ``((dh0, dc0, d_rmask), dz)`` with ``dz [T, B, 4H]`` the cotangent of the
    pre-activations, from which every weight and input gradient is one matmul.
    """
    # The state before each step, [T, B, H] (also for T = 0).
    h_prev = hs if hs_are_prev else jnp.concatenate([h0[None], hs], axis=0)[:-1]
    c_prev = jnp.concatenate([c0[None], cs], axis=0)[:-1]

    # In place (see the module docstring) only with unroll=1: in an unrolled body the read of
    # acts[t - 1] is no longer a loop output that XLA must materialise, XLA fuses it into its
    # readers again, and copies the buffer at every iteration; unrolled, dz is a stacked output.
    in_place = unroll == 1 and acts.shape[0] > 0

    def step(carry, inputs):
        t, dh, dc, d_rmask, buf, a = carry
        dy, cp, cn, hp, v_t, a_t = inputs
        if not in_place:
            a = a_t
        dh_new = dy + dh
        dc_new = dc
        if v_t is not None:
            v = v_t[:, None]
            dh_new = jnp.where(v, dh_new, jnp.zeros_like(dh_new))
            dc_new = jnp.where(v, dc, jnp.zeros_like(dc))
        i, f, g, o = jnp.split(a, 4, axis=-1)
        tanh_c = jnp.tanh(cn)
        dc_total = dc_new + dh_new * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc_total * g * i * (1 - i),
                dc_total * cp * f * (1 - f),
                dc_total * i * (1 - g * g),
                dh_new * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        a_next = None
        if in_place:
            # dz_t overwrites acts[t] in the loop-carried buffer. acts[t] itself came in the
            # carry, read from the buffer by the previous step after its own write: every read
            # of the buffer then follows every write by data dependency. (Read here instead,
            # XLA may order one of its fused reads after the write, and then copies the whole
            # buffer at every step.)
            buf = jax.lax.dynamic_update_index_in_dim(buf, dz, t, 0)
            a_next = jax.lax.dynamic_index_in_dim(buf, jnp.maximum(t - 1, 0), keepdims=False)
        dh_in = _mm(dz, w_hh_t, dz.dtype)
        if rmask is None:
            dh_prev = dh_in
        else:
            d_rmask = d_rmask + hp * dh_in
            dh_prev = dh_in * rmask
        dc_prev = dc_total * f
        if v_t is not None:
            # Steps past a sequence's length passed the state through unchanged.
            dh_prev = dh_prev + jnp.where(v, jnp.zeros_like(dh), dh)
            dc_prev = dc_prev + jnp.where(v, jnp.zeros_like(dc), dc)
        return (t - 1, dh_prev, dc_prev, d_rmask, buf, a_next), None if in_place else dz

    dh, dc, d_rmask = carry
    last = acts.shape[0] - 1
    buf = a_last = None
    if in_place:
        buf = acts
        a_last = jax.lax.dynamic_index_in_dim(acts, last, keepdims=False)
    (_, dh, dc, d_rmask, buf, _), dz = jax.lax.scan(
        step,
        (jnp.int32(last), dh, dc, d_rmask, buf, a_last),
        (d_ys, c_prev, cs, h_prev if rmask is not None else None, valid, None if in_place else acts),
        reverse=True,
        unroll=unroll,
    )
    return (dh, dc, d_rmask), buf if in_place else dz, h_prev


def _rows_last(a):
    """``[T, B, k] -> [k, T*B]``, materialised: a transpose XLA cannot fold into a dot."""
    return jnp.transpose(a, (2, 0, 1)).reshape(a.shape[-1], -1)


def _param_and_input_grads(xs, w_ih, h_prev, dz, rmask, matmul_dtype, row_major_weight_grads=False):
    """``dW_ih, dW_hh, db, d_xs`` of one block from ``dz [T, B, 4H]``: each a single matmul
    over all its timesteps.

    The weight gradients contract the ``T*B`` rows of two arrays. Done as it is (a
    transposed-LHS GEMM), XLA:CPU runs it on Eigen; with ``row_major_weight_grads`` the
    left-hand side is transposed first, which makes it a plain row-major GEMM that XLA:CPU
    gives to YNNPACK, whose bfloat16 kernels use the CPU's matrix units (see ``_stack``).
    """
    h_in_prev = h_prev if rmask is None else h_prev * rmask
    # Flattened to [T*B, .]: a plain transposed-LHS GEMM, measurably faster on XLA:CPU than
    # contracting the two axes (t, b) in one einsum.
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    dz_flat = flat(dz)
    lhs, spec = (_rows_last, "kn,ng->kg") if row_major_weight_grads else (flat, "nk,ng->kg")
    d_w_ih = _einsum(spec, lhs(xs), dz_flat, matmul_dtype, dz.dtype)
    d_w_hh = _einsum(spec, lhs(h_in_prev), dz_flat, matmul_dtype, dz.dtype)
    d_xs = _einsum("tbg,ig->tbi", dz, w_ih, matmul_dtype, dz.dtype).astype(xs.dtype)
    return d_w_ih, d_w_hh, jnp.sum(dz_flat, axis=0), d_xs


def _pad_time(x, pad, value=0):
    if x is None or pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _chunked(xs, valid, chunk):
    """Pads ``xs``/``valid`` to a multiple of ``chunk`` with invalid steps and splits the
    time axis into ``[T / chunk, chunk, ...]``."""
    time_steps, batch = xs.shape[:2]
    pad = -time_steps % chunk
    if pad and valid is None:
        valid = jnp.ones((time_steps, batch), bool)
    xs, valid = _pad_time(xs, pad), _pad_time(valid, pad, False)
    split = lambda a: None if a is None else a.reshape((-1, chunk) + a.shape[1:])  # noqa: E731
    return split(xs), split(valid), time_steps


def layer_scan(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1, remat_chunk=None,
               matmul_dtype=None):
    """Reference path: autodiff through ``lax.scan``. See the module docstring for shapes."""
    w_hh = _cast(w_hh, matmul_dtype)
    if remat_chunk is None:
        (h_t, c_t), ys = _forward_steps(xs, w_ih, b, w_hh, h0, c0, valid, rmask, unroll, False, matmul_dtype)
        return ys, h_t, c_t

    xs_c, valid_c, time_steps = _chunked(xs, valid, remat_chunk)

    @jax.checkpoint
    def chunk_body(carry, inputs):
        x_k, v_k = inputs
        carry, ys = _forward_steps(x_k, w_ih, b, w_hh, *carry, v_k, rmask, unroll, False, matmul_dtype)
        return carry, ys

    (h_t, c_t), ys = jax.lax.scan(chunk_body, (h0, c0), (xs_c, valid_c))
    return ys.reshape((-1,) + ys.shape[2:])[:time_steps], h_t, c_t


def _primal_fn(unroll, matmul_dtype, project_in_loop=False, project_chunk=None):
    """The forward of the fused layer (shared by the stored and the remat variants), run as
    it is only where nothing is differentiated.

    There a layer whose input is ``[T, B, H]`` (every layer of a stack but the first) and
    is projected before its loop, all at once or K steps at a time, writes its outputs over
    its inputs: the previous layer's outputs are dead once projected, and a new ``[T, B, H]``
    buffer would be zero-filled (every layer's copied from one shared broadcast) and, at
    glibc's defaults, page-faulted in at every call. Measured on a 2-core Xeon (inference,
    in one process against new buffers): the ``large`` bench config (4 layers of 512, B=64,
    T=100) 0.95x (0.98x with ``retain_freed_memory()``), XLA scratch 70 -> 18.5 MiB;
    bfloat16 matmuls at the tutorial's size 0.96x, at T=64 0.85x. Where ``xs`` is still
    live (a jit argument, say), XLA copies it first: no worse than the zero-fill.
    """

    def primal(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        (h_t, c_t), ys = _forward_steps(xs, w_ih, b, _cast(w_hh, matmul_dtype), h0, c0, valid, rmask, unroll, False,
                                        matmul_dtype, project_in_loop, project_chunk=project_chunk,
                                        output_over_input=True)
        return ys, h_t, c_t

    return primal


@functools.lru_cache(maxsize=None)
def _fused_fn(unroll, matmul_dtype, project_in_loop=False, row_major_weight_grads=False, project_chunk=None):
    fused = jax.custom_vjp(_primal_fn(unroll, matmul_dtype, project_in_loop, project_chunk))

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        # Row-major weight gradients transpose the state before each step, saved as such here.
        # Derived from the states after each step instead, XLA:CPU fuses the shift by one step
        # into the transpose, which then took 2.7-3.0 ms per tutorial layer (bfloat16, in the
        # training step) where the plain transpose takes 0.4-0.5 ms.
        (h_t, c_t), (ys, acts, hs, cs) = _forward_steps(xs, w_ih, b, _cast(w_hh, matmul_dtype), h0, c0, valid, rmask,
                                                        unroll, True, matmul_dtype,
                                                        save_prev_h=row_major_weight_grads)
        return (ys, h_t, c_t), (w_ih, w_hh, xs, h0, c0, valid, rmask, acts, hs, cs)

    def bwd(residuals, cotangents):
        w_ih, w_hh, xs, h0, c0, valid, rmask, acts, hs, cs = residuals
        d_ys, d_h_t, d_c_t = cotangents
        d_rmask = None if rmask is None else jnp.zeros_like(rmask)
        (dh0, dc0, d_rmask), dz, h_prev = _backward_steps(
            _cast(w_hh.T, matmul_dtype), d_ys, acts, hs, cs, h0, c0, valid, rmask, (d_h_t, d_c_t, d_rmask), unroll,
            hs_are_prev=row_major_weight_grads)
        d_w_ih, d_w_hh, d_b, d_xs = _param_and_input_grads(xs, w_ih, h_prev, dz, rmask, matmul_dtype,
                                                           row_major_weight_grads)
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0, None, d_rmask

    fused.defvjp(fwd, bwd)
    return fused


@functools.lru_cache(maxsize=None)
def _fused_remat_fn(unroll, chunk, matmul_dtype, project_in_loop=False, row_major_weight_grads=False,
                    project_chunk=None):
    """The fused layer keeping only every ``chunk``-th state for the backward pass."""

    fused = jax.custom_vjp(_primal_fn(unroll, matmul_dtype, project_in_loop, project_chunk))

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        xs_c, valid_c, time_steps = _chunked(xs, valid, chunk)

        def chunk_body(carry, inputs):
            x_k, v_k = inputs
            new_carry, ys = _forward_steps(x_k, w_ih, b, _cast(w_hh, matmul_dtype), *carry, v_k, rmask, unroll, False,
                                           matmul_dtype)
            return new_carry, (ys, carry)  # keep the state at the chunk's start

        (h_t, c_t), (ys, starts) = jax.lax.scan(chunk_body, (h0, c0), (xs_c, valid_c))
        ys = ys.reshape((-1,) + ys.shape[2:])[:time_steps]
        return (ys, h_t, c_t), (w_ih, w_hh, b, xs_c, valid_c, rmask, starts)

    def bwd(residuals, cotangents):
        w_ih, w_hh, b, xs_c, valid_c, rmask, (h_starts, c_starts) = residuals
        d_ys, d_h_t, d_c_t = cotangents
        time_steps = d_ys.shape[0]
        d_ys_c = _pad_time(d_ys, xs_c.shape[0] * chunk - time_steps).reshape(xs_c.shape[:2] + d_ys.shape[1:])
        w_hh_c, w_hh_t = _cast(w_hh, matmul_dtype), _cast(w_hh.T, matmul_dtype)

        def chunk_body(carry, inputs):
            state_carry, (g_ih, g_hh, g_b) = carry
            x_k, v_k, dy_k, h_k, c_k = inputs
            _, (_, acts, hs, cs) = _forward_steps(x_k, w_ih, b, w_hh_c, h_k, c_k, v_k, rmask, unroll, True, matmul_dtype,
                                                  save_prev_h=row_major_weight_grads)
            state_carry, dz, h_prev = _backward_steps(
                w_hh_t, dy_k, acts, hs, cs, h_k, c_k, v_k, rmask, state_carry, unroll,
                hs_are_prev=row_major_weight_grads)
            d_w_ih, d_w_hh, d_b, d_x = _param_and_input_grads(x_k, w_ih, h_prev, dz, rmask, matmul_dtype,
                                                              row_major_weight_grads)
            return (state_carry, (g_ih + d_w_ih, g_hh + d_w_hh, g_b + d_b)), d_x

        d_rmask = None if rmask is None else jnp.zeros_like(rmask)
        zero_grads = (jnp.zeros_like(w_ih), jnp.zeros_like(w_hh), jnp.zeros_like(b))
        ((dh0, dc0, d_rmask), (d_w_ih, d_w_hh, d_b)), d_xs = jax.lax.scan(
            chunk_body,
            ((d_h_t, d_c_t, d_rmask), zero_grads),
            (xs_c, valid_c, d_ys_c, h_starts, c_starts),
            reverse=True,
        )
        d_xs = d_xs.reshape((-1,) + d_xs.shape[2:])[:time_steps]
        return d_w_ih, d_w_hh, d_b, d_xs, dh0, dc0, None, d_rmask

    fused.defvjp(fwd, bwd)
    return fused


def layer_fused(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1, remat_chunk=None,
                matmul_dtype=None, project_in_loop=False, row_major_weight_grads=False, project_chunk=None):
    """Fast path with a hand-written VJP. See the module docstring for shapes.
    ``project_in_loop``: where nothing is differentiated, project each step's input inside the
    loop; ``project_chunk=K``: there, project ``K`` steps' inputs at a time (the gradient's
    forward always projects all of them before its loop). ``row_major_weight_grads``:
    compute the weight gradients as row-major GEMMs, transposing their left-hand sides first
    (see ``_param_and_input_grads``); the values are the same."""
    if matmul_dtype is not None:
        matmul_dtype = jnp.dtype(matmul_dtype)
    if project_chunk is not None:
        if isinstance(project_chunk, bool) or not isinstance(project_chunk, numbers.Integral) or project_chunk < 1:
            raise ValueError(f"project_chunk: expected a positive int or None, got {project_chunk!r}")
        project_chunk = int(project_chunk)
    project_in_loop, row_major_weight_grads = bool(project_in_loop), bool(row_major_weight_grads)
    fn = (_fused_fn(unroll, matmul_dtype, project_in_loop, row_major_weight_grads, project_chunk)
          if remat_chunk is None
          else _fused_remat_fn(unroll, remat_chunk, matmul_dtype, project_in_loop, row_major_weight_grads,
                               project_chunk))
    return fn(w_ih, w_hh, b, xs, h0, c0, valid, rmask)
