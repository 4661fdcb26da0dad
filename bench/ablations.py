#!/usr/bin/env python
"""Design choices of the fused layer, decided by measurement (issue: "choose by measurement").

    python bench/ablations.py                         # tutorial + single128 + pixel
    python bench/ablations.py --configs tutorial --steps 20

Times the lstm_jax training step (the same model and step as ``bench/run.py``: stack +
linear head, softmax cross-entropy, optax Adam, jitted with donation) in one process,
interleaved, for these variants of ``impl="fused"``:

* ``store`` (the library's choice): the forward scan saves the gate activations
  ``[T, B, 4H]`` for the backward pass.
* ``recompute``: the forward saves only the states; the backward recomputes the gate
  pre-activations as one large matmul over all timesteps (``[x_t, h_{t-1}] @ [W_ih; W_hh]``,
  not sequential, since every ``h_{t-1}`` is known), costing about 1/3 more FLOPs but
  ``4H`` fewer floats stored per step.
* ``coef``: the forward saves, instead of the gate activations and the cell state
  (``5H`` floats per step), the six ``[B, H]`` factors the backward multiplies by
  (``6H``), so that the backward step is a few multiplies and the dot, with no ``tanh``.
* ``unroll=2`` and ``unroll=4``: ``lax.scan``'s unroll of both scans.
* ``remat<K>`` (e.g. ``remat28``): ``remat_chunk=K``, the rematerialisation option for long
  sequences: the forward keeps only the state at every K-th step; the backward recomputes
  each chunk of K steps just before differentiating it. ``scan`` and ``scan_remat<K>``: the
  same for the ``impl="scan"`` reference (``jax.checkpoint`` over chunks). Their memory
  saving is the point: compare the ``XLA temp MiB`` column (the compiled program's scratch
  buffers, where the saved activations live).

It also reports each variant's time to first result (compile + first step) and XLA's
static memory figure. Results go to stdout and, with ``--out``, a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import peers  # noqa: E402
import run as bench_run  # noqa: E402
from lstm_jax import _layer, _stack  # noqa: E402
from lstm_jax._cell import gate_activations  # noqa: E402


@functools.lru_cache(maxsize=None)
def _recompute_fn(unroll):
    """``layer_fused`` without saved activations (float32 matmuls, no remat)."""

    fused = jax.custom_vjp(_layer._primal_fn(unroll, None))  # the library's forward

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        (h_t, c_t), (ys, _acts, hs, cs) = _layer._forward_steps(xs, w_ih, b, w_hh, h0, c0, valid, rmask, unroll, True)
        # Only the states are residuals; the gate activations are not kept for the backward pass.
        return (ys, h_t, c_t), (w_ih, w_hh, b, xs, h0, c0, valid, rmask, hs, cs)

    def bwd(residuals, cotangents):
        w_ih, w_hh, b, xs, h0, c0, valid, rmask, hs, cs = residuals
        d_ys, d_h_t, d_c_t = cotangents
        h_prev = jnp.concatenate([h0[None], hs], axis=0)[:-1]
        h_in = h_prev if rmask is None else h_prev * rmask
        acts = gate_activations(_layer._input_projection(xs, w_ih, b.dtype) + jnp.einsum("tbh,hg->tbg", h_in, w_hh) + b)
        d_rmask = None if rmask is None else jnp.zeros_like(rmask)
        (dh0, dc0, d_rmask), dz, h_prev = _layer._backward_steps(
            w_hh.T, d_ys, acts, hs, cs, h0, c0, valid, rmask, (d_h_t, d_c_t, d_rmask), unroll)
        return (*_layer._param_and_input_grads(xs, w_ih, h_prev, dz, rmask, None), dh0, dc0, None, d_rmask)

    fused.defvjp(fwd, bwd)
    return fused


def layer_recompute(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1, remat_chunk=None,
                    matmul_dtype=None):
    if remat_chunk is not None or matmul_dtype is not None:
        raise ValueError("the recompute ablation supports neither remat_chunk nor matmul_dtype")
    return _recompute_fn(unroll)(w_ih, w_hh, b, xs, h0, c0, valid, rmask)


def _forward_steps_coef(zx, b, w_hh, h0, c0, unroll):
    """The forward scan, saving per step the backward's coefficients ``[B, 6H]`` instead of
    the gate activations and the cell state ``[B, 5H]``: ``dz/dc_total`` for (i, f, g),
    ``dz_o/dh``, ``dc/dh`` and ``f``, so that the backward step is a few multiplies and the dot."""

    def step(carry, zx_t):
        h, c = carry
        acts = gate_activations(zx_t + h @ w_hh + b)
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tanh_c = jnp.tanh(c_new)
        h_new = o * tanh_c
        coef = jnp.concatenate([g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o),
                                o * (1 - tanh_c * tanh_c), f], axis=-1)
        return (h_new, c_new), (h_new, coef)

    return jax.lax.scan(step, (h0, c0), zx, unroll=unroll)


def _backward_steps_coef(w_hh_t, d_ys, coef, carry, unroll):
    hidden = w_hh_t.shape[-1]

    def step(carry, inputs):
        dh, dc = carry
        dy, k = inputs
        dh_new = dy + dh
        dc_total = dc + dh_new * k[:, 4 * hidden:5 * hidden]
        dz = jnp.concatenate([dc_total, dc_total, dc_total, dh_new], axis=-1) * k[:, :4 * hidden]
        return (dz @ w_hh_t, dc_total * k[:, 5 * hidden:]), dz

    return jax.lax.scan(step, carry, (d_ys, coef), reverse=True, unroll=unroll)


@functools.lru_cache(maxsize=None)
def _coef_fn(unroll):
    """``layer_fused`` saving the backward's per-step coefficients (float32; no lengths, rmask or remat)."""

    fused = jax.custom_vjp(_layer._primal_fn(unroll, None))

    def fwd(w_ih, w_hh, b, xs, h0, c0, valid, rmask):
        (h_t, c_t), (ys, coef) = _forward_steps_coef(_layer._input_projection(xs, w_ih, b.dtype), b, w_hh, h0, c0, unroll)
        return (ys, h_t, c_t), (w_ih, w_hh, xs, h0, coef, ys)

    def bwd(residuals, cotangents):
        w_ih, w_hh, xs, h0, coef, ys = residuals
        d_ys, d_h_t, d_c_t = cotangents
        (dh0, dc0), dz = _backward_steps_coef(w_hh.T, d_ys, coef, (d_h_t, d_c_t), unroll)
        h_prev = jnp.concatenate([h0[None], ys], axis=0)[:-1]
        return (*_layer._param_and_input_grads(xs, w_ih, h_prev, dz, None, None), dh0, dc0, None, None)

    fused.defvjp(fwd, bwd)
    return fused


def layer_coef(w_ih, w_hh, b, xs, h0, c0, valid=None, rmask=None, *, unroll=1, remat_chunk=None,
               matmul_dtype=None):
    if any(a is not None for a in (valid, rmask, remat_chunk, matmul_dtype)):
        raise ValueError("the coef ablation supports no lengths, rmask, remat_chunk or matmul_dtype")
    return _coef_fn(unroll)(w_ih, w_hh, b, xs, h0, c0, valid, rmask)


# Registered under a private name so that lj.lstm(impl=...) runs it through the same stack code.
_stack._IMPLS["_recompute"] = layer_recompute
_stack._IMPLS["_coef"] = layer_coef

VARIANTS = {
    "store": {"impl": "fused", "unroll": 1},
    "recompute": {"impl": "_recompute", "unroll": 1},
    "coef": {"impl": "_coef", "unroll": 1},
    "unroll2": {"impl": "fused", "unroll": 2},
    "unroll4": {"impl": "fused", "unroll": 4},
    "scan": {"impl": "scan", "unroll": 1},
}
REMAT_PREFIXES = {"remat": "fused", "scan_remat": "scan"}


def variant_spec(name: str) -> dict:
    """``VARIANTS[name]``, or ``remat<K>`` / ``scan_remat<K>`` for ``remat_chunk=K``."""
    if name in VARIANTS:
        return VARIANTS[name]
    for prefix, impl in REMAT_PREFIXES.items():
        chunk = name[len(prefix):]
        if name.startswith(prefix) and chunk.isdigit() and int(chunk) > 0:
            return {"impl": impl, "unroll": 1, "remat_chunk": int(chunk)}
    raise ValueError(f"--variants: unknown variant {name!r}; expected one of {list(VARIANTS)}, "
                     f"remat<K> or scan_remat<K>")


def make_variant(name, shape, data, weights):
    spec = variant_spec(name)
    impl = peers.make_lstm_jax(shape, data, weights, spec["impl"], spec["unroll"], spec.get("remat_chunk"))
    impl.name = name
    return impl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tutorial,single128,pixel")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per variant (default 20)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated: {', '.join(VARIANTS)}, remat<K>, scan_remat<K> (default: the named ones)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [c for c in args.configs.split(",") if c not in bench_run.CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown config(s) {unknown}; choose from {list(bench_run.CONFIGS)}")
    try:
        for v in names:
            variant_spec(v)  # fail on a typo before any compiling
    except ValueError as e:
        ap.error(str(e))
    if not names or args.steps < 1 or args.rounds < 1:
        ap.error("--variants must name at least one variant; --steps and --rounds must be positive")

    jax.config.update("jax_enable_compilation_cache", False)
    report = {"device": bench_run.device_name(jax.default_backend(), jax.devices()[0]),
              "versions": bench_run.versions(), "git": bench_run.git_info(), "configs": {}}
    print(f"device {report['device']}; {report['versions']}", flush=True)
    for cname in args.configs.split(","):
        shape = bench_run.CONFIGS[cname][0]
        data = peers.Data.make(shape, sets=2, seed=0)
        weights = peers.init_reference_weights(shape, 0)
        impls, first, losses = {}, {}, {}
        grads = {}
        for v in names:
            impls[v] = make_variant(v, shape, data, weights)
            i = impls[v]
            grads[v] = jax.jit(jax.grad(i._loss_fn))(i._params, i._xs[0], i._ys[0])
            first[v] = impls[v].setup_train()
            losses[v] = impls[v].first_loss
            impls[v].train_step(1)  # warm-up
        errors: dict = {}
        times = bench_run.interleaved({v: i.train_step for v, i in impls.items()}, args.steps, args.rounds, errors)
        flops = shape.train_flops()
        rows = {}
        base = None
        for v in impls:
            if v in errors:
                rows[v] = {"error": errors[v]}
                continue
            st = bench_run.stats(times[v])
            mem = impls[v].memory()["train"]
            base = base or st["median_s"]
            rows[v] = {**st, "first_result_s": first[v], "first_loss": losses[v],
                       "gflops_per_s": flops / st["median_s"] / 1e9, "vs_first": st["median_s"] / base,
                       "xla_total_bytes": None if mem is None else mem["total_bytes"],
                       "xla_temp_bytes": None if mem is None else mem["temp_bytes"]}
        report["configs"][cname] = {"shape": vars(shape), "train_flops": flops, "variants": rows}
        print(f"\n{cname} {vars(shape)}  (training step, median of {args.steps})")
        print(f"{'variant':<12} {'ms':>9} {'q1-q3 ms':>17} {'x first':>8} {'GFLOP/s':>8} {'first s':>8} "
              f"{'XLA MiB':>8} {'temp MiB':>8}")
        for v, r in rows.items():
            if "error" in r:
                print(f"{v:<12} error: {r['error']}")
                continue
            mib, tmp = ("-" if r[k] is None else f"{r[k] / 2**20:.1f}" for k in ("xla_total_bytes", "xla_temp_bytes"))
            print(f"{v:<12} {r['median_s'] * 1e3:9.1f} {r['q1_s'] * 1e3:8.1f}-{r['q3_s'] * 1e3:<8.1f} "
                  f"{r['vs_first']:8.3f} {r['gflops_per_s']:8.1f} {r['first_result_s']:8.2f} {mib:>8} {tmp:>8}",
                  flush=True)
        # The variants compute the same model: their first losses and gradients must agree.
        ls = [r["first_loss"] for r in rows.values() if "first_loss" in r]
        assert max(ls) - min(ls) <= 1e-4 * max(1.0, abs(ls[0])), f"variants disagree on the first loss: {losses}"
        ref = jax.tree.leaves(grads[next(iter(grads))])
        for v, g in grads.items():
            err = max(float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
                      for a, r in zip(jax.tree.leaves(g), ref))
            report["configs"][cname]["variants"][v]["grad_rel_err_vs_first"] = err
            assert err < 1e-4, f"{v}: gradients differ from the first variant's by {err:.2e} (relative)"
        print("gradients agree: max relative difference "
              + ", ".join(f"{v} {r['grad_rel_err_vs_first']:.1e}" for v, r in rows.items() if "error" not in r))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
