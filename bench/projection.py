#!/usr/bin/env python
"""Where the fused layer's inference forward should project its inputs, measured on this machine.

    python bench/projection.py                       # the shapes behind the library's CPU rule (~5 min)
    python bench/projection.py --shapes 1000x28x256x256x3 --chunks 1,2,4 --rounds 10 --out /tmp/p.json

``lstm_jax.lstm`` projects every timestep's input with one ``[T*B, in] x [in, 4H]`` matmul
before the loop, except in the fused layer's inference forward on CPU, where
``_stack._cpu_projection`` chooses per layer: narrow inputs are projected by each step inside
the loop (``x_t @ w_ih``), others ``K`` steps at a time (an outer loop over chunks, each one
``[K*B, in] x [in, 4H]`` matmul whose output the inner loop reads back from cache), with ``K``
from the size of one step's projection and the L2 cache (all steps at once where ``K >= T``).
That rule came from one machine (``bench/results/projection-cpu-Intel-Xeon-2c.md``); this
script re-measures it anywhere: for each shape ``BxTxINxHxL`` it times ``bench/run.py``'s
model (stack + head, inference), interleaved over ``--rounds`` rounds, with every layer
projecting before the loop (``hoisted``), in it (``in_loop``), ``K`` steps at a time for
each ``--chunks`` K (``chunkK``), and as the library chooses (``library``). It checks that all
give the same logits. ``new_buffers`` is the library's choice with each layer's outputs written
into a new ``[T, B, H]`` buffer instead of over the layer's input (``_layer._primal_fn``).
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
import run as bench_run  # noqa: E402

# What the rule was measured on: the tutorial at two batches, pixel-by-pixel inputs of width 1
# and 4, a small batch, and hidden sizes whose weights fit (256) or not (384, 512) in 2 MiB.
DEFAULT_SHAPES = ("128x28x28x256x3,1000x28x28x256x3,128x784x1x128x1,128x784x4x128x1,"
                  "16x28x28x256x3,128x28x384x384x2,64x100x512x512x2")
DEFAULT_CHUNKS = (2, 4, 8)


def variants(chunks) -> tuple:
    return ("hoisted", "in_loop") + tuple(f"chunk{k}" for k in chunks) + ("library", "new_buffers")


def parse_shape(text: str) -> peers.Shape:
    """``"BxTxINxHxL"`` -> :class:`peers.Shape` (ValueError naming the text when malformed)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"expected BxTxINxHxL with five positive integers, like 128x28x28x256x3, got {text!r}")
    return peers.Shape(*values)


def build(shape: peers.Shape, data: peers.Data, weights, variant: str, matmul_dtype=None):
    """The model's compiled inference with the projection forced before the loop, in it, or
    ``K`` steps at a time, or as the library chooses; ``new_buffers``: as the library chooses,
    but every layer's outputs written into a new buffer instead of over its inputs (as before
    ``_layer._primal_fn`` did that). The choice is made while tracing, so it stays with the
    compiled function."""
    from lstm_jax import _layer, _stack

    shipped, shipped_steps = _stack._cpu_projection, _layer._forward_steps
    if variant not in ("library", "new_buffers"):
        forced = _stack._Projection(variant == "in_loop", int(variant[5:]) if variant.startswith("chunk") else None)
        _stack._cpu_projection = lambda *args, **kwargs: forced
    if variant == "new_buffers":
        _layer._forward_steps = lambda *args, **kwargs: shipped_steps(*args, **{**kwargs, "output_over_input": False})
    _layer._fused_fn.cache_clear()  # the custom_vjp functions hold what they traced
    try:
        impl = peers.make_lstm_jax(shape, data, weights, "fused", matmul_dtype=matmul_dtype,
                                   name=f"lstm_jax_{variant}")
        impl.setup_infer()
    finally:
        _stack._cpu_projection, _layer._forward_steps = shipped, shipped_steps
        _layer._fused_fn.cache_clear()
    return impl


def library_choice(shape: peers.Shape, matmul_dtype=None) -> list:
    """The rule's choice per layer: "in_loop", "chunkK" or "hoisted"."""
    from lstm_jax import _stack

    sizes = [shape.inputs] + [shape.hidden] * (shape.layers - 1)
    rows = shape.batch + _stack._cpu_batch_pad(shape.batch, shape.hidden, np.float32, matmul_dtype)
    out = []
    for i in sizes:
        p = _stack._cpu_projection(rows, i, shape.hidden, shape.steps, np.float32, matmul_dtype)
        out.append("in_loop" if p.project_in_loop else "hoisted" if p.project_chunk is None
                   else f"chunk{p.project_chunk}")
    return out


def measure(shape: peers.Shape, rounds: int, reps: int, chunks=DEFAULT_CHUNKS, matmul_dtype=None) -> dict:
    """Median seconds per inference call of each variant, interleaved, and what the library picks."""
    data = peers.Data.make(shape, sets=2, seed=0)
    weights = peers.init_reference_weights(shape, 0)
    names = variants(chunks)
    impls = {v: build(shape, data, weights, v, matmul_dtype) for v in names}
    logits = {}
    for v, impl in impls.items():
        fn, params = impl.infer_fn()
        logits[v] = np.asarray(fn(params, data.xs[0]))
    times = {v: [] for v in names}
    k = 0
    for _ in range(rounds):
        for v, impl in impls.items():
            for _ in range(reps):
                t = time.perf_counter()
                impl.infer_step(k)
                times[v].append(time.perf_counter() - t)
                k += 1
    return {
        "shape": vars(shape),
        "library": library_choice(shape, matmul_dtype),
        "median_s": {v: float(np.median(t)) for v, t in times.items()},
        "xla_temp_bytes": {v: (impl.memory()["infer"] or {}).get("temp_bytes") for v, impl in impls.items()},
        "max_abs_logit_diff": max(float(np.max(np.abs(logits[v] - logits["hoisted"]))) for v in names),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxTxINxHxL (batch, steps, inputs, "
                    "hidden, layers)")
    ap.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNKS)),
                    help="comma-separated K: steps projected at a time, each timed as variant chunkK (default 2,4,8)")
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the matmuls' operand dtype (default float32)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="calls per variant and round (default 3)")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="call lstm_jax.retain_freed_memory() first: XLA's per-call buffers are reused, not "
                         "page-faulted in again at every call (default: glibc as it is)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    shapes = []
    for s in args.shapes.split(","):
        try:
            shapes.append(parse_shape(s.strip()))
        except ValueError as e:
            ap.error(f"--shapes: {e}")
    try:
        chunks = tuple(int(k) for k in args.chunks.split(",")) if args.chunks.strip() else ()
    except ValueError:
        chunks = None
    if chunks is None or any(k < 1 for k in chunks):
        ap.error(f"--chunks: expected comma-separated positive integers, got {args.chunks!r}")
    if args.rounds < 1 or args.reps < 1:
        ap.error(f"--rounds and --reps: expected positive integers, got {args.rounds} and {args.reps}")

    import lstm_jax

    retained = bool(args.retain_freed_memory and lstm_jax.retain_freed_memory())  # before JAX starts threads
    import jax
    import jax.numpy as jnp

    from lstm_jax import _stack

    jax.config.update("jax_enable_compilation_cache", False)
    matmul_dtype = None if args.matmul_dtype == "float32" else jnp.dtype(args.matmul_dtype)
    report = {"device": bench_run.device_name(jax.default_backend(), jax.devices()[0]),
              "versions": bench_run.versions(), "git": bench_run.git_info(),
              "l2_cache_bytes": _stack._l2_cache_bytes(), "retain_freed_memory": retained,
              "matmul_dtype": args.matmul_dtype, "chunks": list(chunks), "rounds": args.rounds, "reps": args.reps,
              "shapes": []}
    print(f"device {report['device']}; L2 per core {report['l2_cache_bytes']} bytes; retain_freed_memory {retained}; "
          f"matmul dtype {args.matmul_dtype}; {report['versions']}", flush=True)
    names = variants(chunks)
    print(f"\nInference, ms (median of {args.rounds * args.reps}); 'library' = the CPU rule's choice, per layer last")
    print(f"{'BxTxINxHxL':>20} " + " ".join(f"{v:>11}" for v in names)
          + "  library/hoisted  library/new_buffers  library per layer")
    for shape in shapes:
        row = measure(shape, args.rounds, args.reps, chunks, matmul_dtype)
        report["shapes"].append(row)
        m = row["median_s"]
        name = "x".join(str(v) for v in (shape.batch, shape.steps, shape.inputs, shape.hidden, shape.layers))
        print(f"{name:>20} " + " ".join(f"{m[v] * 1e3:11.2f}" for v in names)
              + f"  {m['library'] / m['hoisted']:15.2f}  {m['library'] / m['new_buffers']:19.3f}"
              + f"  {','.join(row['library'])}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
