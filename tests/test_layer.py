"""The fast path (custom VJP, remat) against autodiff through the plain scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax as lj


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _problem(dtype, *, batch=4, time_steps=9, features=5, hidden=6, layers=2, seed=0):
    # NumPy, not jax.random: eager jax.random calls compile a kernel per shape and dtype,
    # which took most of this file's time. The values only need to be generic.
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), dtype)  # noqa: E731
    sizes = [features] + [hidden] * (layers - 1)
    params = tuple(lj.LSTMLayerParams(normal(i, 4 * hidden, scale=0.4), normal(hidden, 4 * hidden, scale=0.4),
                                      normal(4 * hidden, scale=0.2)) for i in sizes)
    xs = normal(batch, time_steps, features)
    state = tuple(lj.LSTMState(normal(batch, hidden, scale=0.5), normal(batch, hidden, scale=0.5))
                  for _ in range(layers))

    def keep_mask(rate, *shape):
        return jnp.asarray((rng.random(shape) >= rate) / (1 - rate), dtype)

    masks = lj.DropoutMasks(output=tuple(keep_mask(0.3, batch, time_steps, hidden) for _ in range(layers)),
                            recurrent=tuple(keep_mask(0.25, batch, hidden) for _ in range(layers)))
    lengths = jnp.array([time_steps, 1, 0, time_steps - 3][:batch], jnp.int32)
    r_ys, r_h, r_c = normal(3, batch, time_steps, hidden)
    return params, xs, state, masks, lengths, (r_ys, r_h[:, 0], r_c[:, 0])


def _loss(params, xs, state, masks, lengths, weights, **kw):
    r_ys, r_h, r_c = weights
    ys, final = lj.lstm(params, xs, initial_state=state, lengths=lengths, masks=masks, **kw)
    return jnp.sum(ys * r_ys) + sum(jnp.sum(s.h * r_h) + jnp.sum(s.c * r_c) for s in final)


GRAD_ARGS = (0, 1, 2, 3)  # params, xs, initial state, masks


def _value_and_grads(params, xs, state, masks, lengths, weights, **kw):
    """Loss and its gradients, jitted: one XLA program per variant instead of op-by-op
    dispatch (which compiles every primitive separately and dominated this file's time)."""
    fn = jax.jit(jax.value_and_grad(functools.partial(_loss, **kw), GRAD_ARGS))
    return fn(params, xs, state, masks, lengths, weights)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
@pytest.mark.parametrize("use_lengths,use_masks", [(False, False), (True, True)])
def test_custom_vjp_equals_autodiff_through_scan(dtype, tol, use_lengths, use_masks):
    with jax.enable_x64(dtype == jnp.float64):
        params, xs, state, masks, lengths, w = _problem(dtype)
        lengths = lengths if use_lengths else None
        masks = masks if use_masks else None
        ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="scan")
        val, grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="fused")
        assert _rel_err(val, ref_val) <= tol
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert got.shape == want.shape
            assert _rel_err(got, want) <= tol


@pytest.mark.parametrize("impl,chunk", [("fused", 1), ("fused", 4), ("fused", 20), ("scan", 4)])
def test_remat_equals_no_remat_float64(impl, chunk):
    with jax.enable_x64(True):
        params, xs, state, masks, lengths, w = _problem(jnp.float64)
        ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="scan")
        val, grads = _value_and_grads(params, xs, state, masks, lengths, w, impl=impl, remat_chunk=chunk)
        assert _rel_err(val, ref_val) <= 1e-12
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert _rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("unroll", [3])
def test_unroll_does_not_change_results(unroll):
    params, xs, state, masks, lengths, w = _problem(jnp.float32)
    ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w)
    val, grads = _value_and_grads(params, xs, state, masks, lengths, w, unroll=unroll)
    assert _rel_err(val, ref_val) <= 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert _rel_err(got, want) <= 1e-5


def _saved_residual_bytes(fn, *args):
    """Bytes of the residuals that reverse mode keeps between the forward and backward pass."""
    _, vjp_fn = jax.vjp(fn, *args)
    own = {id(leaf) for leaf in jax.tree.leaves(args)}
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "nbytes") and id(leaf) not in own)


def test_remat_keeps_less_for_the_backward_pass():
    key = jax.random.PRNGKey(0)
    params = lj.init_lstm(key, 1, 32, 1)
    xs = jax.random.normal(key, (8, 256, 1))
    loss = lambda p, chunk, impl: jnp.sum(lj.lstm(p, xs, remat_chunk=chunk, impl=impl)[0] ** 2)  # noqa: E731
    for impl in ("fused", "scan"):
        full = _saved_residual_bytes(lambda p: loss(p, None, impl), params)
        remat = _saved_residual_bytes(lambda p: loss(p, 16, impl), params)
        # Full: gates and states for all 256 steps, ~6 * T*B*H floats; remat: states at 16 chunk starts.
        assert remat * 4 < full, (impl, remat, full)


def test_remat_chunk_is_validated():
    params = lj.init_lstm(jax.random.PRNGKey(0), 2, 3)
    with pytest.raises(ValueError, match="remat_chunk"):
        lj.lstm(params, jnp.ones((1, 4, 2)), remat_chunk=0)


@pytest.mark.parametrize("impl,chunk,row_major", [("fused", None, False), ("fused", None, True), ("fused", 4, False),
                                                   ("fused", 4, True), ("scan", None, False)])
def test_bfloat16_matmuls_stay_close_to_float32(monkeypatch, impl, chunk, row_major):
    from lstm_jax import _stack

    monkeypatch.setattr(_stack, "_cpu_row_major_weight_grads", lambda m: row_major)
    params, xs, state, masks, lengths, w = _problem(jnp.float32, hidden=16)
    ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="scan")
    val, grads = _value_and_grads(params, xs, state, masks, lengths, w, impl=impl, remat_chunk=chunk, matmul_dtype=jnp.bfloat16)
    # bfloat16 operands keep 8 bits of mantissa (relative rounding 2**-9 ~ 2e-3) while
    # accumulation, gates and cell state stay float32: errors of a few 1e-3, not more.
    assert _rel_err(val, ref_val) <= 2e-2
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert got.dtype == want.dtype == jnp.float32
        err = _rel_err(got, want)
        assert 0 < err <= 2e-2  # > 0: the bfloat16 path really ran


@pytest.mark.parametrize("impl", ["fused", "scan"])
@pytest.mark.parametrize("variational", [False, True])
@pytest.mark.parametrize("pads", [(3, 3), (3, 0), (0, 2)])
def test_cpu_batch_padding_changes_nothing_float64(monkeypatch, impl, variational, pads):
    """The CPU batch padding (forced here: ``pads[k]`` extra rows on layer k) gives the
    unpadded values and gradients, with lengths, dropout masks and an initial state."""
    from lstm_jax import _stack

    with jax.enable_x64(True):
        params, xs, state, masks, lengths, w = _problem(jnp.float64)
        if variational:
            masks = masks._replace(output=tuple(m[:, :1] for m in masks.output))  # [B, 1, H]
        monkeypatch.setattr(_stack, "_cpu_batch_pad", lambda *a: 0)
        ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w, impl=impl)
        calls = []
        monkeypatch.setattr(_stack, "_cpu_batch_pad", lambda *a: calls.append(a) or pads[(len(calls) - 1) % 2])
        val, grads = _value_and_grads(params, xs, state, masks, lengths, w, impl=impl)
        assert len(calls) == len(params)  # asked once per layer
        assert _rel_err(val, ref_val) <= 1e-12
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert got.shape == want.shape
            assert _rel_err(got, want) <= 1e-12


def test_cpu_batch_pad_crosses_the_threshold_only_when_cheap():
    from lstm_jax import _stack

    if jax.default_backend() != "cpu" or (__import__("os").cpu_count() or 1) < 2:
        pytest.skip("the padding applies on a CPU backend with at least 2 cores")
    limit = _stack._CPU_DOT_THREADS_MACS
    pad = _stack._cpu_batch_pad(128, 128, jnp.float32, None)
    assert pad == 1
    assert 128 * 4 * 128 * 128 <= limit < (128 + pad) * 4 * 128 * 128
    assert _stack._cpu_batch_pad(120, 128, jnp.float32, None) == 9  # 129 rows; 9 <= 120/8
    assert _stack._cpu_batch_pad(100, 128, jnp.float32, None) == 0  # 29 rows > 1/8 of the batch
    assert _stack._cpu_batch_pad(129, 128, jnp.float32, None) == 0  # already above
    assert _stack._cpu_batch_pad(128, 64, jnp.float32, None) == 0  # would need 513 rows
    assert _stack._cpu_batch_pad(128, 128, jnp.float64, None) == 0  # another kernel, not measured
    assert _stack._cpu_batch_pad(128, 128, jnp.float32, jnp.bfloat16) == 0
    assert _stack._cpu_batch_pad(0, 128, jnp.float32, None) == 0


def _forward(params, xs, state, masks, lengths, **kw):
    fn = jax.jit(lambda p, x, s, m, n: lj.lstm(p, x, initial_state=s, lengths=n, masks=m, **kw))
    return fn(params, xs, state, masks, lengths)


@pytest.mark.parametrize("features,batch,time_steps", [(1, 4, 9), (5, 1, 7), (3, 4, 2), (7, 3, 1), (6, 2, 5)])
@pytest.mark.parametrize("use_lengths,use_masks", [(False, False), (True, True)])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("projection", [(True, None), (False, 2), (False, 3), (False, None)],
                         ids=["in_loop", "chunk2", "chunk3", "hoisted"])
def test_fused_forward_projecting_in_the_loop_equals_the_scan_float64(monkeypatch, features, batch, time_steps,
                                                                       use_lengths, use_masks, chunk, projection):
    """The inference forward that projects each step's input inside the loop, or K steps'
    inputs at a time (forced here on every layer; K=2 and 3 leave a shorter last chunk at
    some of these T, and K >= T is the hoisted projection), or all before the loop, computes
    the scan reference's outputs and final state; and differentiating it (whose forward
    projects before the loop) still gives the reference's gradients. The second layer's
    input is ``[T, B, H]``, which the chunked and hoisted forwards write their outputs over
    (with 6 features, the hidden size, the first layer's too: a jit argument)."""
    from lstm_jax import _stack

    with jax.enable_x64(True):
        params, xs, state, masks, lengths, w = _problem(jnp.float64, batch=batch, time_steps=time_steps,
                                                        features=features)
        lengths = jnp.minimum(lengths, time_steps) if use_lengths else None
        masks = masks if use_masks else None
        ref = _forward(params, xs, state, masks, lengths, impl="scan")
        ref_val, ref_grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="scan")
        calls = []
        monkeypatch.setattr(_stack, "_cpu_projection", lambda *a: calls.append(a) or _stack._Projection(*projection))
        got = _forward(params, xs, state, masks, lengths, impl="fused", remat_chunk=chunk)
        assert len(calls) == len(params)  # asked once per layer
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert g.shape == r.shape
            assert _rel_err(g, r) <= 1e-12
        val, grads = _value_and_grads(params, xs, state, masks, lengths, w, impl="fused", remat_chunk=chunk)
        assert _rel_err(val, ref_val) <= 1e-12
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert _rel_err(g, r) <= 1e-12


@pytest.mark.parametrize("projection", [(False, None), (True, None), (False, 2)], ids=["hoisted", "in_loop", "chunk2"])
def test_fused_forward_with_bfloat16_matmuls_stays_close_to_float32(monkeypatch, projection):
    from lstm_jax import _stack

    params, xs, state, masks, lengths, _ = _problem(jnp.float32, hidden=16)
    ref = _forward(params, xs, state, masks, lengths, impl="scan")
    monkeypatch.setattr(_stack, "_cpu_projection", lambda *a: _stack._Projection(*projection))
    got = _forward(params, xs, state, masks, lengths, impl="fused", matmul_dtype=jnp.bfloat16)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert g.dtype == r.dtype == jnp.float32
        assert 0 < _rel_err(g, r) <= 2e-2  # > 0: the bfloat16 path really ran


def test_fused_forward_in_the_loop_or_in_chunks_really_projects_there():
    """With ``project_in_loop`` the compiled inference program holds no ``[T, B, 4H]`` array
    (the hoisted projection's output); with ``project_chunk=K`` it holds ``[K, B, 4H]`` ones
    instead (and a shorter one for the last chunk when K does not divide T), and XLA's
    scratch memory shrinks accordingly."""
    from lstm_jax import _layer

    t, b, i, h = 11, 3, 5, 7
    rng = np.random.default_rng(0)
    w_ih, w_hh = jnp.asarray(rng.standard_normal((i, 4 * h)), jnp.float32), jnp.asarray(rng.standard_normal((h, 4 * h)), jnp.float32)
    bias, xs = jnp.zeros(4 * h), jnp.asarray(rng.standard_normal((t, b, i)), jnp.float32)
    h0 = jnp.zeros((b, h))

    def compiled(**kw):
        fn = jax.jit(lambda *a: _layer.layer_fused(*a, **kw))
        return fn.lower(w_ih, w_hh, bias, xs, h0, h0).compile()

    def projection(steps):
        return f"f32[{steps},{b},{4 * h}]"

    hoisted, in_loop, chunk4 = compiled(), compiled(project_in_loop=True), compiled(project_chunk=4)
    assert projection(t) in hoisted.as_text()
    assert projection(t) not in in_loop.as_text()
    assert projection(t) not in chunk4.as_text()
    assert projection(4) in chunk4.as_text() and projection(3) in chunk4.as_text()  # 11 = 2 * 4 + 3
    assert projection(4) not in compiled(project_chunk=11).as_text()  # K >= T: hoisted
    scratch = {k: c.memory_analysis().temp_size_in_bytes for k, c in
               (("hoisted", hoisted), ("in_loop", in_loop), ("chunk4", chunk4))}
    assert scratch["chunk4"] < scratch["hoisted"] and scratch["in_loop"] < scratch["hoisted"]
    # No steps: the initial state comes back.
    for kw in ({"project_in_loop": True}, {"project_chunk": 2}):
        ys, h_t, c_t = _layer.layer_fused(w_ih, w_hh, bias, xs[:0], h0 + 1, h0 + 2, **kw)
        assert ys.shape == (0, b, h) and float(jnp.min(h_t)) == 1 == float(jnp.max(h_t)) and float(jnp.min(c_t)) == 2


@pytest.mark.parametrize("projection", [{}, {"project_chunk": 4}], ids=["hoisted", "chunk4"])
def test_inference_writes_a_layers_outputs_over_its_inputs(projection):
    """Where a layer's input is ``[T, B, H]`` (the layer below's output), the inference
    forward writes its outputs over it: the compiled two-layer program copies no ``[T, B, H]``
    buffer (a new one was each layer's copy of one shared zero broadcast) and its scratch
    shrinks. The caller's own input is never written: XLA copies a live argument first."""
    from lstm_jax import _layer

    t, b, i, h = 11, 3, 5, 7
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    w1, w2, w_hh = normal(i, 4 * h), normal(h, 4 * h), normal(h, 4 * h)
    bias, xs, h0 = jnp.zeros(4 * h), normal(t, b, i), jnp.zeros((b, h))

    def three_layers(over_input):
        def fn(xs):
            for w_ih in (w1, w2, w2):
                _, xs = _layer._forward_steps(xs, w_ih, bias, w_hh, h0, h0, None, None, 1, False,
                                              output_over_input=over_input, **projection)
            return xs
        return jax.jit(fn).lower(xs).compile()

    def copies(compiled):
        return [line for line in compiled.as_text().splitlines() if f"f32[{t},{b},{h}]" in line and " copy(" in line]

    over, new = three_layers(True), three_layers(False)
    assert copies(new) and not copies(over)  # the first shows the test can see what it looks for
    assert over.memory_analysis().temp_size_in_bytes < new.memory_analysis().temp_size_in_bytes
    assert float(jnp.max(jnp.abs(over(xs) - new(xs)))) == 0

    kept = normal(t, b, h)  # in = H: the first layer would write over the caller's array
    before = np.asarray(kept).copy()
    for call in (_layer.layer_fused, jax.jit(_layer.layer_fused, static_argnames=("project_chunk",))):
        call(w2, w_hh, bias, kept, h0, h0, **projection)
        np.testing.assert_array_equal(np.asarray(kept), before)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", "x", float("nan")])
def test_fused_layer_rejects_a_bad_projection_chunk(bad):
    from lstm_jax import _layer

    z = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="project_chunk: expected a positive int or None"):
        _layer.layer_fused(z[:, :8], jnp.zeros((2, 8)), jnp.zeros(8), jnp.zeros((3, 1, 2)), z[:1, :2], z[:1, :2],
                           project_chunk=bad)


def test_cpu_projection_follows_the_measured_rule(monkeypatch):
    from lstm_jax import _stack

    l2 = _stack._l2_cache_bytes()
    assert l2 is None or l2 > 0
    f32, bf16 = jnp.float32, jnp.bfloat16
    two_mib = 2 * 2**20
    in_loop, hoisted = (True, None), (False, None)

    def rule(b, i, h, t=28, dtype=f32, matmul_dtype=None, l2_bytes=two_mib):
        return tuple(_stack._cpu_projection(b, i, h, t, dtype, matmul_dtype, l2_bytes))

    if jax.default_backend() != "cpu":
        assert rule(128, 1, 128) == hoisted
        return
    # Narrow inputs: in the loop, at any batch and size, with any matmul dtype.
    assert rule(128, 1, 128) == rule(1, 8, 2048) == rule(5000, 1, 64, 784) == rule(128, 1, 128, matmul_dtype=bf16) == in_loop
    # Wide float32 inputs at batch >= 64 whose weights fit in L2: in the loop.
    assert rule(128, 256, 256) == rule(64, 64, 256) == rule(1000, 256, 256) == in_loop  # 2 MiB of weights
    # Otherwise K steps at a time, K = 2 * L2 // (B * 4H * itemsize): 8 at B=128, H=256 (512 KiB a step).
    assert rule(128, 28, 256) == rule(128, 63, 256) == (False, 8)
    assert rule(128, 256, 256, matmul_dtype=bf16) == (False, 8)  # bfloat16: no wide in-loop case
    assert rule(128, 256, 256, l2_bytes=two_mib - 1) == (False, 7)  # weights no longer fit
    assert rule(63, 256, 256) == (False, 16)  # small batch
    assert rule(128, 512, 512) == (False, 4) and rule(64, 512, 512, t=100) == (False, 8)
    assert rule(128, 28, 256, dtype=jnp.float64) == (False, 4)
    assert rule(128, 28, 256, t=9) == (False, 8)
    assert rule(128, 28, 256, t=8) == rule(16, 28, 256) == rule(0, 28, 256) == hoisted  # K >= T: all at once
    assert rule(1000, 28, 256) == rule(1000, 28, 256, matmul_dtype=bf16) == in_loop  # K = 1: one step at a time
    monkeypatch.setattr(_stack, "_l2_cache_bytes", lambda: None)  # unknown L2: 1 MiB assumed
    assert rule(128, 28, 256, l2_bytes=None) == rule(128, 256, 256, l2_bytes=None) == (False, 4)


def _weight_gradient_dots(row_major, matmul_dtype=jnp.bfloat16):
    """The dots of the compiled gradient of one fused layer that contract their left-hand
    side's leading axis (transposed-LHS GEMMs)."""
    from lstm_jax import _layer

    t, b, i, h = 6, 4, 5, 7
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    args = (normal(i, 4 * h), normal(h, 4 * h), normal(4 * h), normal(t, b, i), normal(b, h), normal(b, h))

    def loss(*a):
        ys, h_t, c_t = _layer.layer_fused(*a, matmul_dtype=matmul_dtype, row_major_weight_grads=row_major)
        return jnp.sum(ys**2) + jnp.sum(c_t)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().as_text()
    return [line for line in hlo.splitlines() if " dot(" in line and "lhs_contracting_dims={0}" in line]


def test_row_major_weight_gradients_compile_to_row_major_gemms():
    """Without ``row_major_weight_grads`` both weight gradients are transposed-LHS dots (which
    XLA:CPU does not give to YNNPACK); with it, none is."""
    assert len(_weight_gradient_dots(False)) == 2
    assert _weight_gradient_dots(True) == []


def test_cpu_row_major_weight_grads_follows_the_measured_rule():
    from lstm_jax import _stack

    assert not _stack._cpu_row_major_weight_grads(None)  # float32: measured no faster
    assert _stack._cpu_row_major_weight_grads(jnp.bfloat16) == (jax.default_backend() == "cpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's compiled program")
@pytest.mark.parametrize("kw", [
    {},
    {"lengths": "ragged"},
    {"recurrent_dropout": 0.3, "dropout": 0.2},
    {"remat_chunk": 5},
    {"remat_chunk": 5, "lengths": "ragged"},
    {"matmul_dtype": jnp.bfloat16},
    {"unroll": 2},
    {"unroll": 3, "lengths": "ragged"},
], ids=["plain", "lengths", "dropout", "remat", "remat-lengths", "bf16", "unroll2", "unroll3-lengths"])
def test_fused_gradient_updates_its_residual_buffer_in_place(kw):
    """The fused layer's loops write the gate activations over the projected inputs, and the
    backward's dz over the activations, in loop-carried buffers. Should XLA ever order a read
    of such a buffer after the step's write, it copies the whole [T, B, 4H] buffer at every
    step (T times the work: a 784-step training step went from 0.5 s to 24 s). The compiled
    gradient must hold no copy of a [T or K, B, 4H] array."""
    batch, time_steps, hidden = 8, 12, 16
    xs = jax.random.normal(jax.random.key(0), (batch, time_steps, 5))
    params = lj.init_lstm(jax.random.key(1), 5, hidden, 2)
    kw = dict(kw)
    if kw.get("lengths") == "ragged":
        kw["lengths"] = jnp.array([12, 3, 7, 12, 1, 5, 9, 12])
    if "dropout" in kw:
        kw["key"] = jax.random.key(2)

    def loss(p):
        ys, state = lj.lstm(p, xs, impl="fused", **kw)
        return jnp.sum(ys**2) + jnp.sum(state[-1].c)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    shapes = {f"f32[{t},{batch},{4 * hidden}]" for t in (time_steps, kw.get("remat_chunk", time_steps))}
    copies = [line.strip()[:160] for line in hlo.splitlines()
              if " copy(" in line and any(f"= {s}" in line for s in shapes)]
    assert not copies, f"whole-buffer copies of the residuals in the compiled gradient: {copies}"
