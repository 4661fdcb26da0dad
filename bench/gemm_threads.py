#!/usr/bin/env python
"""Why lstm_jax trails torch at H=128 on CPU: XLA:CPU runs small dots on one thread.

    python bench/gemm_threads.py                      # the default probe (about 2 minutes)
    python bench/gemm_threads.py --sizes 128x128,129x128 --steps 200 --out /tmp/g.json

Part 1 times the recurrence's per-step GEMM alone -- ``h = tanh((h @ W)[:, :H])`` with
``W [H, 4H]``, ``steps`` times in one ``lax.fori_loop`` -- for several ``BxH``, next to the
same chain in eager torch. XLA:CPU hands each dot to a library kernel (YNNPACK in jaxlib
0.10) and runs it on its thread pool only above a size threshold; below it the dot runs on
one core. The GFLOP/s column shows where the threshold falls: on the 2-vCPU machine of
``bench/results`` the ``128x128`` dot (2^23 multiply-adds) stays on one core, ``129x128``
uses both.

Part 2 times the whole model of ``bench/run.py`` (stack + head; training step and
inference) for the ``pixel`` and ``single128`` shapes twice: with lstm_jax's CPU batch
padding switched off, and as the library runs it (on CPU it pads such a batch by the few
zero rows that carry the dot over the threshold; see ``lstm_jax/_stack.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import peers  # noqa: E402
import run as bench_run  # noqa: E402


def _median_s(fn, reps):
    fn()  # warm-up (and compile)
    return float(np.median(peers.time_reps(fn, reps)))


def jax_dot_chain(steps, hidden, matmul_dtype=None):
    """Jitted ``(h [B, H], w [H, 4H]) -> h``: ``steps`` times ``h <- tanh((h @ w)[:, :H])``, the
    recurrence's dot and one small fusion per step (``matmul_dtype``: the dot's operands,
    float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(h, w):
        if matmul_dtype is not None:
            w = w.astype(matmul_dtype)  # once, outside the loop, as the library does

        def body(_, h):
            z = jnp.matmul(h.astype(w.dtype), w, preferred_element_type=jnp.float32)
            return jnp.tanh(z[:, :hidden])

        return jax.lax.fori_loop(0, steps, body, h)

    return chain


def gemm_chain(batch, hidden, steps, reps):
    """Seconds per step of the chained ``[B, H] x [H, 4H]`` GEMM: (jax, torch or None)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((hidden, 4 * hidden)) / np.sqrt(hidden)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden), dtype=np.float32)
    chain = jax_dot_chain(steps, hidden)
    hj, wj = jnp.asarray(h0), jnp.asarray(w)
    t_jax = _median_s(lambda: chain(hj, wj).block_until_ready(), reps) / steps
    try:
        import torch
    except ImportError:
        return t_jax, None
    ht, wt = torch.from_numpy(h0), torch.from_numpy(w)

    def torch_chain():
        h = ht
        for _ in range(steps):
            h = torch.tanh((h @ wt)[:, :hidden])
        return h

    return t_jax, _median_s(torch_chain, reps) / steps


def model_times(shape, reps, batch_padding):
    """Median seconds of lstm_jax's training step and inference pass (bench/run.py's model),
    with the library's CPU batch padding on (as shipped) or off."""
    from lstm_jax import _stack

    shipped = _stack._cpu_batch_pad
    if not batch_padding:
        _stack._cpu_batch_pad = lambda *args: 0
    try:
        data = peers.Data.make(shape, sets=2, seed=0)
        impl = peers.make_lstm_jax(shape, data, peers.init_reference_weights(shape, 0), "fused")
        impl.setup_train()
        impl.setup_infer()
    finally:
        _stack._cpu_batch_pad = shipped  # compiled above: the jitted functions keep their choice
    k = iter(range(10**9))
    train = _median_s(lambda: impl.train_step(next(k)), reps)
    infer = _median_s(lambda: impl.infer_step(next(k)), reps)
    return train, infer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64x128,128x128,129x128,160x128,192x128,256x128,128x256",
                    help="comma-separated BxH for part 1")
    ap.add_argument("--steps", type=int, default=200, help="chained GEMMs per timing (default 200)")
    ap.add_argument("--reps", type=int, default=7, help="timings per size; the median is kept (default 7)")
    ap.add_argument("--models", default="pixel,single128", help="bench/run.py configs for part 2 ('' to skip)")
    ap.add_argument("--model-reps", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = []
    for s in args.sizes.split(","):
        try:
            b, h = (int(v) for v in s.lower().split("x"))
        except ValueError:
            ap.error(f"--sizes: expected BxH pairs like 128x128, got {s!r}")
        if b < 1 or h < 1:
            ap.error(f"--sizes: B and H must be positive, got {s!r}")
        sizes.append((b, h))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in bench_run.CONFIGS]
    if unknown:
        ap.error(f"--models: unknown config(s) {unknown}; choose from {list(bench_run.CONFIGS)}")
    if args.steps < 1 or args.reps < 1 or args.model_reps < 1:
        ap.error("--steps, --reps and --model-reps must be positive")

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    torch_threads = None
    try:
        torch_threads = peers.torch_threads()
    except ImportError:
        pass
    report = {"device": bench_run.device_name(jax.default_backend(), jax.devices()[0]),
              "versions": bench_run.versions(), "git": bench_run.git_info(), "torch_threads": torch_threads,
              "gemm": [], "models": []}
    print(f"device {report['device']}; {report['versions']}", flush=True)
    print(f"\nPart 1: chained [B, H] x [H, 4H] GEMM, {args.steps} steps, median of {args.reps}")
    print(f"{'BxH':>8} {'MACs':>10} {'jax us':>8} {'GFLOP/s':>8} {'torch us':>9} {'GFLOP/s':>8}")
    for b, h in sizes:
        macs = b * h * 4 * h
        t_jax, t_torch = gemm_chain(b, h, args.steps, args.reps)
        row = {"batch": b, "hidden": h, "macs": macs, "jax_s_per_step": t_jax, "jax_gflops": 2 * macs / t_jax / 1e9,
               "torch_s_per_step": t_torch, "torch_gflops": None if t_torch is None else 2 * macs / t_torch / 1e9}
        report["gemm"].append(row)
        tt = "-" if t_torch is None else f"{t_torch * 1e6:9.0f} {row['torch_gflops']:8.1f}"
        print(f"{b:>4}x{h:<3} {macs:>10} {t_jax * 1e6:8.0f} {row['jax_gflops']:8.1f} {tt}", flush=True)

    if models:
        print(f"\nPart 2: lstm_jax fused, the whole model, CPU batch padding off / on (median of {args.model_reps})")
        print(f"{'config':>10} {'B':>4} {'padding':>8} {'pad rows':>8} {'train ms':>9} {'infer ms':>9}")
    from lstm_jax import _stack

    for name in models:
        shape = bench_run.CONFIGS[name][0]
        rows = _stack._cpu_batch_pad(shape.batch, shape.hidden, np.float32, None)
        for padding in (False, True):
            train, infer = model_times(shape, args.model_reps, padding)
            report["models"].append({"config": name, "shape": vars(shape), "batch_padding": padding,
                                     "pad_rows": rows if padding else 0, "train_s": train, "infer_s": infer})
            print(f"{name:>10} {shape.batch:>4} {'on' if padding else 'off':>8} {rows if padding else 0:>8} "
                  f"{train * 1e3:9.1f} {infer * 1e3:9.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
