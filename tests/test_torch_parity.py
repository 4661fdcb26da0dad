"""Parity with ``torch.nn.LSTM`` (CPU torch; the optional ``parity`` extra).

Skipped when torch is not installed -- unless ``LSTM_JAX_REQUIRE_TORCH=1`` (set in CI),
where a missing torch is an import error at collection, so CI can never silently skip
these tests.

Error metric (``rel_err``), used everywhere below: for our array ``a`` and torch's ``b``

    rel_err(a, b) = max|a - b| / max|b|        (max|a - b| if b == 0)

computed in float64 from the float32 results of both libraries; for several arrays the
worst (largest) value, each normalised by its own max|b|. Tolerances: forward values
(outputs, final h and c) <= 1e-5, gradients <= 1e-4, parameters after 20 Adam steps
<= 1e-4. The worst measured errors are printed (``pytest -s``), attached with
``record_property`` (``--junitxml``) and summarised at the end of the module.

Weight correspondence (``lj.from_torch``): ``w_ih = weight_ih_l{k}.T``,
``w_hh = weight_hh_l{k}.T``, ``b = bias_ih_l{k} + bias_hh_l{k}``; torch has no separate
forget bias, hence ``forget_bias=0.0`` everywhere.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

if os.environ.get("LSTM_JAX_REQUIRE_TORCH") == "1":
    import torch  # CI: a missing torch must fail, not skip
else:
    torch = pytest.importorskip(
        "torch",
        reason="torch is not installed (pip install 'lstm-jax[parity]'); "
        "set LSTM_JAX_REQUIRE_TORCH=1 to make this a failure",
    )

import jax
import jax.numpy as jnp
import optax

import lstm_jax as lj

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
TRAIN_TOL = 1e-4

# Worst error seen per comparison over the whole module, printed at the end.
_WORST: dict[str, float] = {}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread_and_summary():
    """One torch thread (the CPU is shared; the sizes are tiny) and a final summary."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if _WORST:
        print("\n[torch parity] worst rel err per comparison over this module:")
        for name in sorted(_WORST):
            print(f"  {name:32s} {_WORST[name]:.3e}")


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    s = float(np.max(np.abs(b))) if b.size else 0.0
    return d / s if s > 0 else d


def report(record_property, test_name, errs: dict[str, float]) -> None:
    """Prints and records ``errs`` ({comparison: rel_err}); updates the module summary."""
    for name, e in errs.items():
        _WORST[name] = max(_WORST.get(name, 0.0), e)
        record_property(f"{name}_rel_err", e)
    body = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
    print(f"\n[{test_name}] {body}")


def t2n(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def make_torch_lstm(seed, input_size, hidden, layers, **kw):
    torch.manual_seed(seed)
    return torch.nn.LSTM(input_size, hidden, layers, batch_first=True, **kw)


def torch_h0c0(state) -> tuple:
    """Our tuple of per-layer ``LSTMState`` as torch's ``(h0, c0)``, each ``[layers, B, H]``."""
    h0 = torch.from_numpy(np.stack([np.asarray(s.h) for s in state]))
    c0 = torch.from_numpy(np.stack([np.asarray(s.c) for s in state]))
    return h0, c0


def random_state(rng, layers, batch, hidden):
    return tuple(
        lj.LSTMState(
            jnp.asarray(rng.standard_normal((batch, hidden)).astype(np.float32)),
            jnp.asarray(rng.standard_normal((batch, hidden)).astype(np.float32)),
        )
        for _ in range(layers)
    )


# ---------------------------------------------------------------------------
# forward and gradient parity with torch's own random init
# ---------------------------------------------------------------------------

IN, H, B, T = 5, 7, 3, 6
IMPLS = ("fused", "scan")


def _loss(params, xs, init, r_y, r_h, r_c, *, impl):
    """sum(ys * r_y) + sum(h_n * r_h) + sum(c_n * r_c), with h_n, c_n stacked as torch's."""
    ys, final = lj.lstm(params, xs, forget_bias=0.0, initial_state=init, impl=impl)
    hn = jnp.stack([s.h for s in final])
    cn = jnp.stack([s.c for s in final])
    return jnp.sum(ys * r_y) + jnp.sum(hn * r_h) + jnp.sum(cn * r_c), (ys, hn, cn)


# One jitted function per impl, shared by every test (jit caches one compilation per
# layer count / initial_state structure): compiling is most of this module's run time.
_LOSS_GRAD = {
    impl: jax.jit(jax.value_and_grad(functools.partial(_loss, impl=impl), argnums=(0, 1, 2), has_aux=True))
    for impl in IMPLS
}


def compare_with_torch(module, params, xs_np, state, impl, rng, prefix=""):
    """Runs ``module`` and ``lj.lstm(params)`` forward and backward on the same inputs and
    loss; returns ``(forward_errs, grad_errs)`` as {comparison: rel_err}."""
    layers = module.num_layers
    r_y = rng.standard_normal((B, T, H)).astype(np.float32)
    r_h = rng.standard_normal((layers, B, H)).astype(np.float32)
    r_c = rng.standard_normal((layers, B, H)).astype(np.float32)

    # --- torch ---
    x_t = torch.from_numpy(xs_np).requires_grad_(True)
    if state is not None:
        h0_t, c0_t = (a.requires_grad_(True) for a in torch_h0c0(state))
        ys_t, (hn_t, cn_t) = module(x_t, (h0_t, c0_t))
    else:
        ys_t, (hn_t, cn_t) = module(x_t)
    loss_t = (
        (ys_t * torch.from_numpy(r_y)).sum()
        + (hn_t * torch.from_numpy(r_h)).sum()
        + (cn_t * torch.from_numpy(r_c)).sum()
    )
    module.zero_grad()
    loss_t.backward()

    # --- ours ---
    (_, (ys, hn, cn)), (d_params, d_xs, d_init) = _LOSS_GRAD[impl](
        params, jnp.asarray(xs_np), state, r_y, r_h, r_c)

    errs = {
        f"{prefix}fwd/ys": rel_err(ys, t2n(ys_t)),
        f"{prefix}fwd/h_n": rel_err(hn, t2n(hn_t)),
        f"{prefix}fwd/c_n": rel_err(cn, t2n(cn_t)),
    }
    # The scalar loss itself is not compared: with random signs in r_y, r_h, r_c it is a sum
    # of cancelling terms, so its relative error says nothing; ys, h_n and c_n are compared.
    grads = {"xs": rel_err(d_xs, t2n(x_t.grad))}
    if state is not None:
        grads["h0"] = rel_err(np.stack([s.h for s in d_init]), t2n(h0_t.grad))
        grads["c0"] = rel_err(np.stack([s.c for s in d_init]), t2n(c0_t.grad))
    else:
        assert d_init is None
    for k, dp in enumerate(d_params):
        g = {n: t2n(getattr(module, f"{n}_l{k}").grad) for n in ("weight_ih", "weight_hh")}
        grads["w_ih"] = max(grads.get("w_ih", 0.0), rel_err(dp.w_ih, g["weight_ih"].T))
        grads["w_hh"] = max(grads.get("w_hh", 0.0), rel_err(dp.w_hh, g["weight_hh"].T))
        if module.bias:
            g_ih = t2n(getattr(module, f"bias_ih_l{k}").grad)
            g_hh = t2n(getattr(module, f"bias_hh_l{k}").grad)
            # Both torch biases enter only through their sum, so
            # d loss / d bias_ih == d loss / d bias_hh == d loss / d (sum) == our db.
            assert rel_err(g_ih, g_hh) <= 1e-6, "torch's bias_ih and bias_hh gradients differ"
            grads["b"] = max(grads.get("b", 0.0), rel_err(dp.b, g_ih), rel_err(dp.b, g_hh))
    return errs, {f"{prefix}grad/{k}": v for k, v in grads.items()}


def check(errs, tol):
    for name, e in errs.items():
        assert e <= tol, f"{name}: rel err {e:.3e} > {tol}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_forward_and_gradients_match_torch(layers, with_state, impl, record_property):
    """torch's own init (seeded), random inputs and initial state: outputs, final (h, c)
    and the gradients wrt inputs, initial state and every weight agree."""
    seed = 100 * layers + 10 * with_state
    module = make_torch_lstm(seed, IN, H, layers)
    rng = np.random.default_rng(seed)
    xs_np = rng.standard_normal((B, T, IN)).astype(np.float32)
    state = random_state(rng, layers, B, H) if with_state else None
    errs, grad_errs = compare_with_torch(module, lj.from_torch(module), xs_np, state, impl, rng)
    report(record_property, f"L={layers} {impl} {'h0c0' if with_state else 'zero'}", {**errs, **grad_errs})
    check(errs, FWD_TOL)
    check(grad_errs, GRAD_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_false_module_matches_torch(impl, record_property):
    module = make_torch_lstm(7, IN, H, 2, bias=False)
    assert not any("bias" in name for name in module.state_dict())
    params = lj.from_torch(module)
    for p in params:
        assert np.array_equal(p.b, np.zeros(4 * H, np.float32))
    rng = np.random.default_rng(7)
    xs_np = rng.standard_normal((B, T, IN)).astype(np.float32)
    state = random_state(rng, 2, B, H)
    errs, grad_errs = compare_with_torch(module, params, xs_np, state, impl, rng, prefix="bias=False/")
    report(record_property, f"bias=False {impl}", {**errs, **grad_errs})
    check(errs, FWD_TOL)
    check(grad_errs, GRAD_TOL)


# ---------------------------------------------------------------------------
# conversion: to_torch / from_torch
# ---------------------------------------------------------------------------


def numpy_params(rng, layers):
    """Random float32 params built with NumPy (no JAX PRNG compilation needed)."""
    return tuple(
        lj.LSTMLayerParams(
            jnp.asarray(rng.uniform(-0.4, 0.4, (IN if k == 0 else H, 4 * H)).astype(np.float32)),
            jnp.asarray(rng.uniform(-0.4, 0.4, (H, 4 * H)).astype(np.float32)),
            jnp.asarray(rng.uniform(-0.4, 0.4, (4 * H,)).astype(np.float32)),
        )
        for k in range(layers)
    )


@pytest.mark.parametrize("layers", [1, 3])
def test_to_torch_from_torch_round_trip_is_exact(layers):
    params = numpy_params(np.random.default_rng(layers), layers)
    sd = lj.to_torch(params)
    assert sorted(sd) == sorted(
        f"{n}_l{k}" for k in range(layers) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    for k in range(layers):
        assert sd[f"weight_ih_l{k}"].shape == (4 * H, IN if k == 0 else H)
        assert sd[f"weight_hh_l{k}"].shape == (4 * H, H)
        assert isinstance(sd[f"bias_ih_l{k}"], np.ndarray)
        assert not np.any(sd[f"bias_hh_l{k}"])
    for source in (sd, {name: torch.from_numpy(v) for name, v in sd.items()}):
        back = lj.from_torch(source)
        assert len(back) == layers
        for p, q in zip(params, back):
            for a, b in zip(p, q):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layers", [1, 2])
def test_to_torch_loads_strictly_and_reproduces_lstm(layers, record_property):
    """A torch module loaded (strict) from ``to_torch(params)`` computes what
    ``lj.lstm(params, xs, forget_bias=0.0)`` computes, forward and backward."""
    rng = np.random.default_rng(20 + layers)
    params = numpy_params(rng, layers)
    module = torch.nn.LSTM(IN, H, layers, batch_first=True)
    result = module.load_state_dict(
        {name: torch.from_numpy(v) for name, v in lj.to_torch(params).items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    xs_np = rng.standard_normal((B, T, IN)).astype(np.float32)
    state = random_state(rng, layers, B, H)
    errs, grad_errs = compare_with_torch(module, params, xs_np, state, "fused", rng, prefix="to_torch/")
    report(record_property, f"to_torch L={layers}", {**errs, **grad_errs})
    check(errs, FWD_TOL)
    check(grad_errs, GRAD_TOL)


def test_from_torch_accepts_module_and_state_dict_of_tensors():
    module = make_torch_lstm(3, IN, H, 2)
    from_module = lj.from_torch(module)
    from_sd = lj.from_torch(module.state_dict())
    from_numpy_sd = lj.from_torch({k: t2n(v) for k, v in module.state_dict().items()})
    for k, (p, q, r) in enumerate(zip(from_module, from_sd, from_numpy_sd)):
        for a, b, c in zip(p, q, r):
            assert np.array_equal(a, b) and np.array_equal(a, c)
        assert np.array_equal(p.w_ih, t2n(getattr(module, f"weight_ih_l{k}")).T)
        assert np.array_equal(p.w_hh, t2n(getattr(module, f"weight_hh_l{k}")).T)
        want_b = t2n(getattr(module, f"bias_ih_l{k}")) + t2n(getattr(module, f"bias_hh_l{k}"))
        assert np.array_equal(p.b, want_b)
        assert p.w_ih.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs", [dict(bidirectional=True), dict(proj_size=3)], ids=["bidirectional", "proj_size"])
@pytest.mark.parametrize("as_state_dict", [False, True], ids=["module", "state_dict"])
def test_from_torch_rejects_bidirectional_and_projection(kwargs, as_state_dict):
    module = torch.nn.LSTM(IN, H, 2, batch_first=True, **kwargs)
    source = module.state_dict() if as_state_dict else module
    with pytest.raises(ValueError, match="sd_or_module"):
        lj.from_torch(source)


# ---------------------------------------------------------------------------
# training parity: LSTM + linear classifier, 20 Adam steps in both libraries
# ---------------------------------------------------------------------------

TR_IN, TR_H, TR_T, TR_B, TR_CLASSES, TR_LAYERS, TR_STEPS = 8, 16, 6, 8, 5, 2, 20


def _train_loss(params, xs, labels):
    """Mean cross-entropy of a linear head on the last step's output; each layer's bias is
    ``b_ih + b_hh``, torch's two biases kept as two leaves."""
    layers = tuple(lj.LSTMLayerParams(p["w_ih"], p["w_hh"], p["b_ih"] + p["b_hh"]) for p in params["lstm"])
    ys, _ = lj.lstm(layers, xs, forget_bias=0.0)
    logits = ys[:, -1] @ params["head"]["w"] + params["head"]["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@jax.jit
def _train_step(params, opt_state, xs, labels, lr, train_b_hh):
    """One Adam step; returns the loss at the parameters *before* the step.

    ``lr`` and ``train_b_hh`` (1.0 trains ``b_hh``, 0.0 freezes it) are traced so that all
    four variants of the test share one compilation; the Adam state does not depend on lr.
    """
    opt = optax.adam(lr)
    loss, grads = jax.value_and_grad(_train_loss)(params, xs, labels)
    grads["lstm"] = [dict(g, b_hh=g["b_hh"] * train_b_hh) for g in grads["lstm"]]
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@pytest.mark.parametrize("lr", [1e-2, 1e-3])
@pytest.mark.parametrize("bias_mode", ["bias_ih_only", "both_biases"])
def test_adam_training_matches_torch(bias_mode, lr, record_property):
    """Same weights, same 20 batches, 20 Adam steps: final parameters and losses agree.

    torch's LSTM has two biases, ``bias_ih`` and ``bias_hh``, that enter only through their
    sum and so receive identical gradients; with Adam each then takes the same step and their
    sum moves twice as fast as our single ``b`` would. Two honest comparisons:

    * ``bias_ih_only`` (what training ``lj.lstm``'s single ``b`` means): fold ``bias_hh``
      into ``bias_ih`` before training and freeze ``bias_hh`` at zero
      (``requires_grad=False``, not given to the optimizer), so torch trains exactly one
      bias per layer; our ``b_hh`` leaf is frozen at zero too (its gradient is zeroed, so
      its Adam update is exactly 0) and ``b_ih`` is our ``b``. Compare ``b`` with
      ``bias_ih`` and check both ``bias_hh`` are still zero.
    * ``both_biases``: torch's default training. Our model keeps two bias leaves
      ``b_ih, b_hh`` (each with its own Adam state), passes ``b_ih + b_hh`` to
      ``lj.lstm``; compare each with its torch counterpart.
    """
    torch.manual_seed(1234)
    lstm_t = torch.nn.LSTM(TR_IN, TR_H, TR_LAYERS, batch_first=True)
    head_t = torch.nn.Linear(TR_H, TR_CLASSES)
    if bias_mode == "bias_ih_only":
        with torch.no_grad():
            for k in range(TR_LAYERS):
                getattr(lstm_t, f"bias_ih_l{k}").add_(getattr(lstm_t, f"bias_hh_l{k}"))
                getattr(lstm_t, f"bias_hh_l{k}").zero_()
                getattr(lstm_t, f"bias_hh_l{k}").requires_grad_(False)
    trainable_t = [p for p in list(lstm_t.parameters()) + list(head_t.parameters()) if p.requires_grad]
    opt_t = torch.optim.Adam(trainable_t, lr=lr)

    # Our parameters, from the same initial torch weights.
    lstm_p = lj.from_torch(lstm_t)
    lstm_tree = [
        dict(w_ih=p.w_ih, w_hh=p.w_hh,
             b_ih=jnp.asarray(t2n(getattr(lstm_t, f"bias_ih_l{k}"))),
             b_hh=jnp.asarray(t2n(getattr(lstm_t, f"bias_hh_l{k}"))))
        for k, p in enumerate(lstm_p)
    ]
    # 0.0 freezes our b_hh (zero gradient -> Adam's m = v = 0 -> update exactly 0).
    train_b_hh = jnp.float32(bias_mode == "both_biases")
    params = dict(lstm=lstm_tree, head=dict(w=jnp.asarray(t2n(head_t.weight).T), b=jnp.asarray(t2n(head_t.bias))))

    rng = np.random.default_rng(99)
    batches = [
        (rng.standard_normal((TR_B, TR_T, TR_IN)).astype(np.float32),
         rng.integers(0, TR_CLASSES, size=TR_B).astype(np.int64))
        for _ in range(TR_STEPS)
    ]

    def torch_loss(xs, labels):
        ys, _ = lstm_t(torch.from_numpy(xs))
        return torch.nn.functional.cross_entropy(head_t(ys[:, -1]), torch.from_numpy(labels))

    opt_state = optax.adam(lr).init(params)
    losses, losses_t = [], []
    for xs, labels in batches:
        params, opt_state, loss = _train_step(params, opt_state, jnp.asarray(xs), jnp.asarray(labels.astype(np.int32)),
                                              jnp.float32(lr), train_b_hh)
        losses.append(float(loss))
        opt_t.zero_grad()
        loss_t = torch_loss(xs, labels)
        loss_t.backward()
        opt_t.step()
        losses_t.append(loss_t.item())
    # The loss after training, on batch 0 (the step's loss is computed before its update).
    _, _, final_loss = _train_step(params, opt_state, jnp.asarray(batches[0][0]),
                                   jnp.asarray(batches[0][1].astype(np.int32)), jnp.float32(lr), train_b_hh)
    final_loss = float(final_loss)
    with torch.no_grad():
        final_loss_t = float(torch_loss(*batches[0]))

    errs = {"train/w_ih": 0.0, "train/w_hh": 0.0, "train/b": 0.0}
    moved = 0.0
    for k, p in enumerate(params["lstm"]):
        w_ih_t = t2n(getattr(lstm_t, f"weight_ih_l{k}")).T
        errs["train/w_ih"] = max(errs["train/w_ih"], rel_err(p["w_ih"], w_ih_t))
        errs["train/w_hh"] = max(errs["train/w_hh"], rel_err(p["w_hh"], t2n(getattr(lstm_t, f"weight_hh_l{k}")).T))
        errs["train/b"] = max(errs["train/b"], rel_err(p["b_ih"], t2n(getattr(lstm_t, f"bias_ih_l{k}"))))
        if bias_mode == "bias_ih_only":
            assert not np.any(t2n(getattr(lstm_t, f"bias_hh_l{k}"))), "frozen torch bias_hh moved"
            assert not np.any(np.asarray(p["b_hh"])), "frozen b_hh moved"
        # The effective bias b_ih + b_hh, then each of the two.
        b_sum_t = t2n(getattr(lstm_t, f"bias_ih_l{k}")) + t2n(getattr(lstm_t, f"bias_hh_l{k}"))
        errs["train/b"] = max(errs["train/b"], rel_err(np.asarray(p["b_ih"]) + np.asarray(p["b_hh"]), b_sum_t),
                              rel_err(p["b_hh"], t2n(getattr(lstm_t, f"bias_hh_l{k}"))))
        moved = max(moved, float(np.max(np.abs(np.asarray(p["w_ih"]) - np.asarray(lstm_p[k].w_ih)))))
    errs["train/head_w"] = rel_err(params["head"]["w"], t2n(head_t.weight).T)
    errs["train/head_b"] = rel_err(params["head"]["b"], t2n(head_t.bias))
    errs["train/losses"] = rel_err(losses, losses_t)
    errs["train/final_loss"] = rel_err(final_loss, final_loss_t)
    report(record_property, f"adam {bias_mode} lr={lr:g}", errs)
    print(f"  loss {losses_t[0]:.4f} -> {losses_t[-1]:.4f}; final loss on batch 0 {final_loss:.6f} vs torch "
          f"{final_loss_t:.6f}; max |w_ih change| {moved:.3e}")

    # The weights really moved (about lr per step), so the comparison is not vacuous.
    assert moved > 5 * lr
    for name, e in errs.items():
        assert e <= TRAIN_TOL, f"{name}: rel err {e:.3e} > {TRAIN_TOL}"
