#!/usr/bin/env python
"""What the Pallas kernels of ``pallas_lstm.py`` need on an H100, found without a GPU.

    pip install triton==3.9.0            # NVIDIA's compiler toolchain (ptxas) comes with it
    python bench/triton_resources.py --hidden 256 --precision float32 --num-warps 8
    python bench/triton_resources.py --hidden 128 --matmul-dtype bfloat16 --hold-weights

Pallas lowers each kernel to a Triton module (TTIR) on any machine; this script takes that
module (from Pallas's ``debug`` print of a CUDA cross-lowering), compiles it with the ``triton``
package's own pipeline for sm_90 (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas), and reports
per kernel the dynamic shared memory Triton would request at launch (an H100 block may have at
most 227 KiB) and, from ``cuobjdump``, the registers per thread and the stack (local memory
spills) per thread. jaxlib's XLA compiles the same module with its own bundled Triton, so the
figures are an estimate of that build's, not a guarantee; the speed still needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

H100_MAX_SHARED = 227 * 1024


def triton_modules(hidden, matmul_dtype, hold_weights, num_warps, block, precision, masks) -> list[str]:
    """The TTIR text of the layer's forward (saving residuals) and backward kernels."""
    import jax
    import jax.numpy as jnp
    from jax import export

    import pallas_lstm

    if precision == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    steps, batch, inputs = 4, 32, 8
    args = (jnp.zeros((inputs, 4 * hidden)), jnp.zeros((hidden, 4 * hidden)), jnp.zeros(4 * hidden),
            jnp.zeros((steps, batch, inputs)), jnp.zeros((batch, hidden)), jnp.zeros((batch, hidden)))
    extra = (jnp.ones((steps, batch), bool), jnp.ones((batch, hidden))) if masks else ()

    def loss(*a):
        ys, h_t, _ = pallas_lstm.lstm_layer(*a, *extra, hold_weights=hold_weights, matmul_dtype=matmul_dtype,
                                            num_warps=num_warps, block=block)
        return jnp.sum(ys) + jnp.sum(h_t)

    printed = io.StringIO()
    real = pallas_lstm.pl.pallas_call
    pallas_lstm.pl.pallas_call = functools.partial(real, debug=True)
    pallas_lstm._forward_call.cache_clear()
    pallas_lstm._backward_call.cache_clear()
    try:
        with contextlib.redirect_stdout(printed):
            export.export(jax.jit(jax.grad(loss, argnums=tuple(range(6)))), platforms=["cuda"], disabled_checks=[
                export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        pallas_lstm.pl.pallas_call = real
        pallas_lstm._forward_call.cache_clear()
        pallas_lstm._backward_call.cache_clear()
    found = re.findall(r"The Triton module for pallas_call[^\n]*\n(.*?)(?=\nThe kernel jaxpr|\Z)", printed.getvalue(),
                       re.S)
    # Pallas prints with debug locations; the plain MLIR parser wants none.
    clean = []
    for text in found:
        text = re.sub(r"^#loc.*\n", "", text, flags=re.M).replace(" [unknown]", "")
        text = re.sub(r" \"[^\"\n]*\"\(#loc[0-9]*\)", "", text)
        text = re.sub(r" #loc[0-9]*\b", "", text)
        clean.append(text[:text.index("\n}\n") + 3])  # the module, without what was printed after it
    return clean


def compile_sm90(ttir: str, num_warps: int) -> dict:
    import os

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": 1})
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"shared_bytes": kernel.metadata.shared, "registers": regs and int(regs.group(1)),
            "stack_bytes": stack and int(stack.group(1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--precision", choices=("float32", "tf32"), default="float32",
                    help="float32 operands' dots: IEEE float32 (bench/run.py's default) or TF32")
    ap.add_argument("--hold-weights", action="store_true")
    ap.add_argument("--num-warps", type=int, default=None, help="default: bench/peers.py's pallas_warps")
    ap.add_argument("--block", type=int, default=None, help="default: pallas_lstm.default_block")
    ap.add_argument("--masks", action="store_true", help="with lengths and recurrent dropout")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton_resources.py: needs the triton package (pip install triton==3.9.0)", file=sys.stderr)
        return 2
    import jax.numpy as jnp

    import pallas_lstm
    import peers

    warps = args.num_warps or peers.pallas_warps(args.hidden)
    mm = None if args.matmul_dtype == "float32" else jnp.bfloat16
    try:
        pallas_lstm.check_sizes(args.hidden, 16, args.block)
    except ValueError as e:
        ap.error(str(e))
    block = args.block or pallas_lstm.default_block(args.hidden, mm or jnp.float32)
    modules = triton_modules(args.hidden, mm, args.hold_weights, warps, block, args.precision, args.masks)
    print(f"H={args.hidden} {args.matmul_dtype} operands, precision {args.precision}, "
          f"{'held' if args.hold_weights else 're-read'} weights, {warps} warps, block {block}:")
    for name, ttir in zip(("forward", "backward"), modules, strict=True):
        r = compile_sm90(ttir, warps)
        fits = "fits" if r["shared_bytes"] <= H100_MAX_SHARED else "does NOT fit"
        print(f"  {name}: shared {r['shared_bytes'] / 1024:.0f} KiB ({fits} an H100 block's 227 KiB), "
              f"{r['registers']} registers/thread, stack {r['stack_bytes']} B/thread (spills)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
