#!/usr/bin/env python
"""Would a persistent LSTM kernel pay? The per-step cost of the recurrence's loop, taken apart.

    python bench/persistent.py                        # tutorial, pixel and large sizes
    python bench/persistent.py --configs pixel --matmul-dtype bfloat16 --out /tmp/p.json
    python bench/persistent.py --quick                # tiny sizes: a smoke run

A persistent kernel (cuDNN's persistent RNNs, FlashRNN) keeps ``w_hh`` on chip and runs every
timestep inside one launch. What it can remove is what the scan spends beyond its matmul:
the per-step launches and synchronisation of the loop body's kernels, and re-reading
``w_hh``. This script times, for one layer in the forward direction (inference), T steps of:

* ``empty``: a loop whose body is one elementwise op on ``[B, H]``: the cost of a loop
  iteration with a single kernel launch, the floor any scan pays per step;
* ``dot``: ``h <- tanh((h @ w_hh)[:, :H])``, the recurrence's dot and one small fusion;
* ``lstm_jax``: lstm_jax's own loop (``_layer._recurrence``: the dot, the bias add, the gates
  and the cell update) over pre-projected inputs, as ``lstm_jax.lstm`` runs it;
* ``cudnn`` (GPU only): ``jax.experimental.rnn.lstm``, one layer, with input size 1 (its
  input projection is tiny), for what cuDNN's own kernels do per step;
* ``pallas`` / ``pallas_hold`` (GPU only): the persistent-style candidate of
  ``bench/pallas_lstm.py``, the whole loop in one Triton kernel, ``w_hh`` re-read from L2 at
  every step / loaded once and held on chip (the kernel reads ``zx`` in the library's layout:
  no pass over it before the loop). A loop that fails to compile (holding a large
  ``w_hh`` may) is recorded with its error instead of a time;

and ``batched_gemm``: one ``[T*B, H] x [H, 4H]`` GEMM, divided by T: the dot's time per step
at the rate of a large matmul, which is about the best a kernel doing the recurrence's FLOPs
on the same units can reach.

Reported per step (µs) and as fractions of ``lstm_jax``'s step: ``empty`` (the launch
floor), ``dot`` (the dot with its launches), ``batched_gemm`` (the FLOP floor). If lstm_jax's
step sits several launch floors above the dot's and far above ``batched_gemm``, a persistent
kernel has room to pay; if it is already near ``dot`` and ``batched_gemm``, it does not.
All loops run at the batch ``lstm_jax.lstm`` would use (on a CPU it may add a few zero rows;
see ``lstm_jax/_stack.py``), float32 state, ``--matmul-dtype`` for the matmul operands.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from typing import Optional
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import gemm_threads  # noqa: E402
import pallas_lstm  # noqa: E402
import peers  # noqa: E402
import run as bench_run  # noqa: E402

# name: (batch, steps, hidden), from bench/run.py's configurations of the same names.
SIZES = {name: (bench_run.CONFIGS[name][0].batch, bench_run.CONFIGS[name][0].steps, bench_run.CONFIGS[name][0].hidden)
         for name in ("tutorial", "pixel", "large")}
QUICK_SIZES = {"tiny": (8, 12, 16), "tiny_h1": (3, 5, 1)}
LOOPS = ("empty", "dot", "lstm_jax", "cudnn", "pallas", "pallas_hold", "batched_gemm")


def make_loops(batch: int, steps: int, hidden: int, matmul_dtype, on_gpu: bool, seed: int = 0,
               batch_tile: int = 16, pallas_interpret: bool = False, num_warps: Optional[int] = None,
               block: Optional[int] = None) -> dict:
    """Jitted thunks, each running its loop once and blocking until it is done.

    ``batch`` is the batch the loops run at. Returns ``{name: fn() -> None}``; ``cudnn``,
    ``pallas`` and ``pallas_hold`` only when ``on_gpu`` (``pallas_interpret``: run those two
    in Pallas's interpreter, for testing this plumbing on a CPU).
    """
    import jax
    import jax.numpy as jnp

    from lstm_jax import _layer

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(hidden)
    w_hh = jnp.asarray(rng.uniform(-scale, scale, (hidden, 4 * hidden)).astype(np.float32))
    b = jnp.asarray(rng.uniform(-scale, scale, (4 * hidden,)).astype(np.float32))
    zx = jnp.asarray(rng.standard_normal((steps, batch, 4 * hidden), dtype=np.float32))
    h0 = jnp.asarray(rng.standard_normal((batch, hidden), dtype=np.float32))
    flat_h = jnp.asarray(rng.standard_normal((steps * batch, hidden), dtype=np.float32))
    cast = (lambda a: a) if matmul_dtype is None else (lambda a: a.astype(matmul_dtype))  # noqa: E731

    @jax.jit
    def empty(h):
        return jax.lax.fori_loop(0, steps, lambda _, h: h * 0.5 + 1.0, h)

    dot = gemm_threads.jax_dot_chain(steps, hidden, matmul_dtype)

    @jax.jit
    def lstm(zx, b, w, h):
        (h_t, c_t), ys = _layer._recurrence(zx, b, cast(w), h, jnp.zeros_like(h), None, None, 1, False)
        return ys, h_t, c_t

    @jax.jit
    def batched_gemm(x, w):
        return jnp.matmul(cast(x), cast(w), preferred_element_type=jnp.float32)

    loops = {
        "empty": lambda: jax.block_until_ready(empty(h0)),
        "dot": lambda: jax.block_until_ready(dot(h0, w_hh)),
        "lstm_jax": lambda: jax.block_until_ready(lstm(zx, b, w_hh, h0)),
        "batched_gemm": lambda: jax.block_until_ready(batched_gemm(flat_h, w_hh)),
    }
    if on_gpu:
        cudnn, cudnn_args = cudnn_forward(batch, steps, hidden, seed)
        loops["cudnn"] = lambda: jax.block_until_ready(cudnn(*cudnn_args))
        for name, hold in (("pallas", False), ("pallas_hold", True)):
            fn = jax.jit(functools.partial(pallas_lstm.lstm_forward, batch_tile=batch_tile, hold_weights=hold,
                                           num_warps=num_warps or peers.pallas_warps(hidden),
                                           block=None if block is None else min(block, hidden),
                                           matmul_dtype=matmul_dtype, interpret=pallas_interpret))
            loops[name] = lambda fn=fn: jax.block_until_ready(fn(zx, b, w_hh, h0, jnp.zeros_like(h0)))
    return loops


def cudnn_forward(batch: int, steps: int, hidden: int, seed: int = 0):
    """``(fn, args)``: ``jax.experimental.rnn.lstm`` over ``[B, T, 1]`` inputs, one layer, float32
    at the highest precision (no TF32, as bench/run.py's default). cuDNN runs only on a GPU
    (even its shape inference needs jaxlib's CUDA plugin); the tests run this call through
    ``rnn.lstm_ref`` instead."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import rnn

    rng = np.random.default_rng(seed)
    weights = rnn.init_lstm_weight(jax.random.key(seed), 1, hidden, 1, False)
    xs = jnp.asarray(rng.standard_normal((batch, steps, 1), dtype=np.float32))
    zeros = jnp.zeros((1, batch, hidden), jnp.float32)
    lengths = jnp.full((batch,), steps, jnp.int32)
    shape = peers.Shape(batch, steps, 1, hidden, 1)
    cudnn = jax.jit(lambda *args: peers._cudnn_lstm(*args, shape, jax.lax.Precision.HIGHEST))  # bench/run.py's call
    return cudnn, (xs, zeros, zeros, weights, lengths)


def measure(name: str, batch: int, steps: int, hidden: int, matmul_dtype, reps: int, rounds: int,
            batch_tile: int = 16, num_warps: Optional[int] = None, block: Optional[int] = None) -> dict:
    import jax

    from lstm_jax import _stack

    on_gpu = jax.default_backend() == "gpu"
    rows = batch + _stack._cpu_batch_pad(batch, hidden, np.float32, matmul_dtype)
    loops = make_loops(rows, steps, hidden, matmul_dtype, on_gpu, batch_tile=batch_tile, num_warps=num_warps,
                       block=block)
    errors: dict = {}
    for loop_name, fn in list(loops.items()):
        try:
            fn()  # compile and warm up
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is a result
            if loop_name in ("empty", "dot", "lstm_jax", "batched_gemm"):
                raise
            errors[loop_name] = f"{type(e).__name__}: {str(e)[:300]}"
            del loops[loop_name]
    times = bench_run.interleaved({n: (lambda k, fn=fn: fn()) for n, fn in loops.items()}, reps, rounds, errors)
    for loop_name in errors:
        times.pop(loop_name, None)
    stats = {n: bench_run.stats(t) for n, t in times.items()}
    per_step = {n: st["median_s"] / steps for n, st in stats.items()}
    lstm = per_step["lstm_jax"]
    flops_per_step = 2 * rows * hidden * 4 * hidden
    return {
        "config": name, "batch": batch, "batch_run": rows, "steps": steps, "hidden": hidden,
        "per_step_s": per_step,
        "stats": stats,
        "fraction_of_lstm_step": {n: s / lstm for n, s in per_step.items()},
        "dot_gflops": {n: flops_per_step / s / 1e9 for n, s in per_step.items() if n != "empty"},
        "w_hh_bytes": 4 * hidden * hidden * (2 if matmul_dtype is not None else 4),
        "errors": errors,
    }


def markdown(report: dict) -> str:
    lines = [f"# Persistent-kernel study: {report['device']}", "",
             f"- date: {report['date']}; command: `{report['command']}`",
             f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
             f"- lstm_jax commit: {report['git']['commit']} (lstm_jax/ dirty: {report['git']['lstm_jax_dirty']})",
             f"- matmul operands: {report['matmul_dtype'] or 'float32'}; medians of {report['reps']} loops × "
             f"{report['rounds']} rounds, interleaved", "",
             "Per step, µs (fraction of lstm_jax's step). `empty`: a loop of one elementwise kernel; "
             "`dot`: the recurrence's dot + one fusion; `lstm_jax`: the library's loop; `cudnn`: "
             "`jax.experimental.rnn.lstm` (GPU); `pallas` / `pallas_hold`: `bench/pallas_lstm.py`, one Triton "
             "kernel for all steps, `w_hh` re-read / held on chip (GPU); `batched_gemm`: one `[T·B, H] x [H, 4H]` "
             "GEMM / T.", "",
             "| config | B (run) | T | H | w_hh KiB | " + " | ".join(LOOPS) + " | lstm_jax dot GFLOP/s |",
             "|---|---|---|---|---|" + "---|" * len(LOOPS) + "---|"]
    for r in report["results"]:
        cells = []
        for n in LOOPS:
            s = r["per_step_s"].get(n)
            cells.append("—" if s is None else f"{s * 1e6:.1f} ({r['fraction_of_lstm_step'][n]:.2f})")
        lines.append(f"| {r['config']} | {r['batch']} ({r['batch_run']}) | {r['steps']} | {r['hidden']} | "
                     f"{r['w_hh_bytes'] / 1024:.0f} | " + " | ".join(cells) + f" | {r['dot_gflops']['lstm_jax']:.1f} |")
    failed = [(r["config"], n, e) for r in report["results"] for n, e in r.get("errors", {}).items()]
    if failed:
        lines += [""] + [f"- {c}: `{n}` failed: {e}" for c, n, e in failed]
    lines += ["", "Reading: what a persistent kernel can remove is at most lstm_jax's step less "
              "`batched_gemm` (the recurrence's FLOPs at a large GEMM's rate); the launches it removes "
              "cost about `empty` each, several per step in the scan.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", help=f"comma-separated, from {list(SIZES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes {list(QUICK_SIZES)}, few repetitions")
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the matmuls' operand dtype (accumulation and state stay float32)")
    ap.add_argument("--batch-tile", type=int, default=16,
                    help="batch rows per program of the Pallas kernels (a power of two >= 16; default 16)")
    ap.add_argument("--num-warps", type=int, choices=(1, 2, 4, 8, 16),
                    help="Triton warps per program of the Pallas kernels (default: bench/peers.py's pallas_warps)")
    ap.add_argument("--block", type=int, help="column block C of the Pallas kernels' dots, a power of two >= 16 "
                    "(capped at H; default: pallas_lstm.default_block)")
    ap.add_argument("--reps", type=int, help="loops timed per round (default 5; --quick 2)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 4; --quick 1)")
    ap.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    names = list(sizes) if not args.configs else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in sizes]
    if unknown or not names:
        ap.error(f"--configs: expected names from {list(sizes)}, got {args.configs!r}")
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 4)
    if reps < 1 or rounds < 1:
        ap.error(f"--reps and --rounds: expected positive ints, got {reps} and {rounds}")
    try:
        pallas_lstm.check_sizes(16, args.batch_tile)
    except ValueError as e:
        ap.error(f"--batch-tile: {e}")
    if args.block is not None and (args.block < 16 or args.block & (args.block - 1)):
        ap.error(f"--block: expected a power of two >= 16, got {args.block}")

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    # True float32 matmuls (no TF32 on a GPU), as bench/run.py's default --precision float32.
    jax.config.update("jax_default_matmul_precision", "highest")
    matmul_dtype = None if args.matmul_dtype == "float32" else jnp.dtype(args.matmul_dtype)
    report = {"device": bench_run.device_name(jax.default_backend(), jax.devices()[0]),
              "platform": jax.default_backend(), "versions": bench_run.versions(), "git": bench_run.git_info(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/persistent.py", *(argv if argv is not None else sys.argv[1:])]),
              "matmul_dtype": None if matmul_dtype is None else str(matmul_dtype),
              "reps": reps, "rounds": rounds, "batch_tile": args.batch_tile, "num_warps": args.num_warps, "block": args.block, "results": []}
    for name in names:
        batch, steps, hidden = sizes[name]
        r = measure(name, batch, steps, hidden, matmul_dtype, reps, rounds, args.batch_tile, args.num_warps, args.block)
        report["results"].append(r)
        print(f"[{name}] B={r['batch_run']} T={steps} H={hidden}: "
              + ", ".join(f"{n} {s * 1e6:.1f} us" for n, s in r["per_step_s"].items()), flush=True)
    md = markdown(report)
    print("\n" + md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(md)
        print(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
