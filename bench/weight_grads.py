#!/usr/bin/env python
"""How the fused layer's weight gradients should be computed on this machine, measured.

    python bench/weight_grads.py                     # the configurations behind the CPU rule (~6 min)
    python bench/weight_grads.py --shapes 128x28x28x256x3 --dtypes bfloat16 --rounds 10 --out /tmp/w.json

The fused layer's backward computes ``dW_ih = xs^T dz`` and ``dW_hh = h_prev^T dz`` as one
GEMM each over all ``T*B`` rows. As written that is a transposed-LHS GEMM, which XLA:CPU runs
on Eigen; with ``row_major_weight_grads`` the layer transposes the left-hand sides first, and
XLA:CPU gives the then row-major GEMM to YNNPACK, whose bfloat16 kernels use AMX where the CPU
has it. ``lstm_jax.lstm`` asks for it on CPU with bfloat16 matmuls
(``_stack._cpu_row_major_weight_grads``). This script times ``bench/run.py``'s training step
(stack + head + Adam) both ways, for each shape ``BxTxINxHxL`` and matmul dtype, interleaved
over ``--rounds`` rounds, and checks that both ways give the same gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import peers  # noqa: E402
import projection  # noqa: E402
import run as bench_run  # noqa: E402

# bench/run.py's tutorial, single128, pixel, hidden512 and large configurations.
DEFAULT_SHAPES = "128x28x28x256x3,128x28x28x128x1,128x784x1x128x1,128x28x28x512x3,64x100x512x512x4"
DTYPES = ("float32", "bfloat16")
VARIANTS = ("transposed_lhs", "row_major")
# The two ways differ only in the order of float32 accumulation: anything beyond rounding is a bug.
GRAD_TOLERANCE = 1e-3


def build(shape: peers.Shape, data: peers.Data, weights, dtype: str, variant: str):
    """The model's training step and its gradient function, with the weight gradients forced
    to one form (the choice is made while tracing, so it stays with the compiled functions)."""
    import jax
    import jax.numpy as jnp

    from lstm_jax import _stack

    matmul_dtype = None if dtype == "float32" else jnp.dtype(dtype)
    shipped = _stack._cpu_row_major_weight_grads
    _stack._cpu_row_major_weight_grads = lambda m: variant == "row_major"
    try:
        impl = peers.make_lstm_jax(shape, data, weights, "fused", matmul_dtype=matmul_dtype,
                                   name=f"lstm_jax_{dtype}_{variant}")
        impl.setup_train()
        grad_fn = jax.jit(jax.grad(impl._loss_fn))
        grads = grad_fn(impl._params, jnp.asarray(data.xs[0]), jnp.asarray(data.ys[0]))
    finally:
        _stack._cpu_row_major_weight_grads = shipped
    return impl, [np.asarray(g) for g in jax.tree.leaves(grads)]


def measure(shape: peers.Shape, dtype: str, rounds: int, steps: int) -> dict:
    """Median seconds per training step of each variant, interleaved, and the gradients' largest
    relative difference between them."""
    import jax.numpy as jnp

    from lstm_jax import _stack

    data = peers.Data.make(shape, sets=2, seed=0)
    weights = peers.init_reference_weights(shape, 0)
    built = {v: build(shape, data, weights, dtype, v) for v in VARIANTS}
    a, b = (built[v][1] for v in VARIANTS)
    grad_diff = max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)) for x, y in zip(a, b))
    times = {v: [] for v in VARIANTS}
    k = 0
    for _ in range(rounds):
        for v, (impl, _) in built.items():
            for _ in range(steps):
                t = time.perf_counter()
                impl.train_step(k)
                times[v].append(time.perf_counter() - t)
                k += 1
    matmul_dtype = None if dtype == "float32" else jnp.dtype(dtype)
    return {
        "shape": vars(shape),
        "dtype": dtype,
        "library_row_major": bool(_stack._cpu_row_major_weight_grads(matmul_dtype)),
        "median_s": {v: float(np.median(t)) for v, t in times.items()},
        "max_rel_grad_diff": grad_diff,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxTxINxHxL (batch, steps, inputs, "
                    "hidden, layers)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="matmul dtypes to time: float32, bfloat16 "
                    "(default both)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant and round (default 3)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    shapes = []
    for s in args.shapes.split(","):
        try:
            shapes.append(projection.parse_shape(s.strip()))
        except ValueError as e:
            ap.error(f"--shapes: {e}")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: expected a comma-separated subset of {', '.join(DTYPES)}, got {args.dtypes!r}")
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds and --steps: expected positive integers, got {args.rounds} and {args.steps}")

    import lstm_jax

    retained = lstm_jax.retain_freed_memory()  # as scripts/train.py does; before JAX starts threads
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    report = {"device": bench_run.device_name(jax.default_backend(), jax.devices()[0]),
              "cpu_bf16_matmul": bench_run.cpu_bf16_matmul_flags(), "versions": bench_run.versions(),
              "git": bench_run.git_info(), "retain_freed_memory": retained, "rounds": args.rounds,
              "steps": args.steps, "results": []}
    print(f"device {report['device']}; bfloat16 matrix flags {report['cpu_bf16_matmul']}; {report['versions']}",
          flush=True)
    print(f"\nTraining step, ms (median of {args.rounds * args.steps}); 'library' = the CPU rule's choice")
    print(f"{'BxTxINxHxL':>20} {'matmuls':>9} {'transp.':>9} {'row-maj.':>9} {'row/tr.':>8} {'library':>10} "
          f"{'grad diff':>10}")
    for shape in shapes:
        for dtype in dtypes:
            row = measure(shape, dtype, args.rounds, args.steps)
            report["results"].append(row)
            m = row["median_s"]
            name = "x".join(str(v) for v in (shape.batch, shape.steps, shape.inputs, shape.hidden, shape.layers))
            print(f"{name:>20} {dtype:>9} {m['transposed_lhs'] * 1e3:9.2f} {m['row_major'] * 1e3:9.2f} "
                  f"{m['row_major'] / m['transposed_lhs']:8.2f} {'row-major' if row['library_row_major'] else 'transp.':>10} "
                  f"{row['max_rel_grad_diff']:10.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    bad = [r for r in report["results"] if not r["max_rel_grad_diff"] <= GRAD_TOLERANCE]
    for r in bad:
        print(f"error: {r['shape']} {r['dtype']}: the two ways' gradients differ by {r['max_rel_grad_diff']:.2e} "
              f"(relative; tolerance {GRAD_TOLERANCE})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
