#!/usr/bin/env python
"""Times lstm_jax against PyTorch, Flax and cuDNN (through JAX), in one process and one run.

    python bench/run.py                      # everything; writes bench/results/<device>.{json,md}
    python bench/run.py --quick              # a smoke run (< 2 min on 2 CPU cores)
    python bench/run.py --configs tutorial,large --steps 50 --out /tmp/res

For every configuration, with the same shapes, float32, the same random data and Adam
(lr 1e-3): the training step (forward, backward, update) and the inference forward pass
(logits) of an LSTM stack + linear classifier on the last step, for

* lstm_jax, ``impl="fused"`` (hand-written VJP) and ``impl="scan"`` (autodiff reference);
  on a GPU also with bfloat16 matmul operands, and the same model run by the persistent-style
  Pallas kernels of ``bench/pallas_lstm.py`` (``lstm_jax_pallas``, a candidate for the library);
* ``torch.nn.LSTM`` + ``nn.Linear`` + ``torch.optim.Adam`` (cuDNN on a GPU);
* Flax ``nn.RNN(nn.OptimizedLSTMCell(H))`` + optax Adam, jitted;
* ``jax.experimental.rnn.lstm`` (cuDNN; GPU only, recorded as skipped on CPU);

plus a chain of the LSTM's own matmuls (the GEMM floor) and, at the tutorial size, the
inference over a 10,000-sequence test set. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# JAX would otherwise take 75% of a GPU's memory up front and leave torch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Times to first result include compilation: no persistent compilation cache may serve it.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import numpy as np  # noqa: E402

import peers  # noqa: E402
from peers import Shape  # noqa: E402

# name -> (shape, description). The sweeps are 1-layer variations of the tutorial size.
CONFIGS: dict[str, tuple[Shape, str]] = {
    "tutorial": (Shape(128, 28, 28, 256, 3), "MNIST rows as steps, 3 layers"),
    "single128": (Shape(128, 28, 28, 128, 1), "MNIST rows as steps, 1 layer of 128"),
    "pixel": (Shape(128, 784, 1, 128, 1), "pixel-by-pixel MNIST"),
    "large": (Shape(64, 100, 512, 512, 4), "the cuDNN LSTM paper's size (Appleyard et al. 2016)"),
    "seq16": (Shape(128, 16, 28, 256, 1), "sequence-length sweep"),
    "seq64": (Shape(128, 64, 28, 256, 1), "sequence-length sweep"),
    "seq256": (Shape(128, 256, 28, 256, 1), "sequence-length sweep"),
    "hidden64": (Shape(128, 28, 28, 64, 1), "hidden-size sweep"),
    "hidden128": (Shape(128, 28, 28, 128, 1), "hidden-size sweep"),
    "hidden256": (Shape(128, 28, 28, 256, 1), "hidden-size sweep (T=28 point of the T sweep)"),
    "hidden512": (Shape(128, 28, 28, 512, 1), "hidden-size sweep"),
}
HEAVY = ("pixel", "large")  # the only ones allowed fewer than 20 steps (in --quick)
QUICK_CONFIGS = ("single128",)
TESTSET = {"config": "tutorial", "sequences": 10_000, "batch": 1000}
QUICK_TESTSET = {"config": "tutorial", "sequences": 500, "batch": 250}
# lstm_jax against torch (the comparison), plus Flax (full runs) and cuDNN (GPU).
TESTSET_IMPLS = ("lstm_jax_fused", "torch", "flax", "jax_cudnn")
QUICK_TESTSET_IMPLS = ("lstm_jax_fused", "torch", "jax_cudnn")
# Sweep tables: the configs whose shapes vary along one axis from a common base.
SWEEPS = {
    "steps": ("T", lambda s: (s.batch, s.inputs, s.hidden, s.layers) == (128, 28, 256, 1), lambda s: s.steps),
    "hidden": ("H", lambda s: (s.batch, s.steps, s.inputs, s.layers) == (128, 28, 28, 1), lambda s: s.hidden),
}
# lstm_jax_bf16: the fused layer with bfloat16 matmul operands (float32 accumulation, gate math
# and cell state), timed where there are bfloat16 matrix units: GPU/TPU, and CPUs with AMX-BF16
# or AVX512-BF16 instructions (cpu_bf16_matmul_flags); skipped on other CPUs.
# lstm_jax_pallas: the model with bench/pallas_lstm.py's kernels (one Triton launch per layer
# and direction), the persistent-kernel candidate; GPU only.
SUBJECTS = ("lstm_jax_fused", "lstm_jax_scan", "lstm_jax_bf16", "lstm_jax_pallas")
BF16_LOSS_TOL = 5e-2
PEERS = ("torch", "flax", "jax_cudnn")
IMPLS = SUBJECTS + PEERS
SEED = 0


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# Machine and software description
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# x86 CPU flags for bfloat16 dot products in hardware: AMX tiles (Sapphire Rapids and later) and
# AVX512-BF16 (Cooper Lake, Zen 4). XLA:CPU's dots used AMX on the Intel Xeon of bench/results
# (1.3-2.0 TFLOP/s in bfloat16 against 0.33-0.37 in float32); other CPUs have no such units.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_matmul_flags(cpuinfo: str | None = None) -> list[str]:
    """The bfloat16 matmul instruction sets among this CPU's flags (``/proc/cpuinfo``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.lower().startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in CPU_BF16_FLAGS if f in flags]
    return []


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    text = re.sub(r"\bCPU\b|@.*$|\bProcessor\b|\d+-Core", "", text)
    text = re.sub(r"[^A-Za-z0-9.+_-]+", "-", text.strip()).replace("+", "plus")
    return re.sub(r"-{2,}", "-", text).strip("-") or "unknown"


def device_name(platform_name: str, jax_device) -> str:
    if platform_name == "cpu":
        return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"
    return _slug(getattr(jax_device, "device_kind", platform_name))


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "optax", "flax", "torch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    import lstm_jax

    out["lstm_jax"] = lstm_jax.__version__
    return out


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "lstm_jax_dirty": bool(git("status", "--porcelain", "--", "lstm_jax"))}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def stats(times) -> dict:
    a = np.asarray(times, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(a.min()), "max_s": float(a.max()), "n": int(a.size)}


def interleaved(fns: dict, steps, rounds: int, errors: dict) -> dict:
    """Times ``fns[name](k)`` (each call blocks until its result is ready) ``steps`` times each
    (an int for every name, or a dict of steps per name).

    The steps are spread over ``rounds`` rounds; in each round every implementation runs a
    block of consecutive steps, the starting implementation rotating from round to round.
    A drift in the machine's speed (other load, clocks) then touches every implementation
    alike, and the ratios of medians stay fair. A failing implementation is dropped and its
    error kept in ``errors``.
    """
    names = list(fns)
    per_name = steps if isinstance(steps, dict) else dict.fromkeys(names, steps)
    rounds = max(1, min(rounds, max(per_name.values(), default=1)))
    blocks = {n: [per_name[n] // rounds + (1 if r < per_name[n] % rounds else 0) for r in range(rounds)] for n in names}
    times: dict = {n: [] for n in names}
    k = {n: 1 for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if n in errors:
                continue
            try:
                for _ in range(blocks[n][r]):
                    t0 = time.perf_counter()
                    fns[n](k[n])
                    times[n].append(time.perf_counter() - t0)
                    k[n] += 1
            except Exception as e:  # noqa: BLE001 - record and go on with the others
                errors[n] = f"{type(e).__name__}: {e}"
    return {n: t for n, t in times.items() if n not in errors}


def error_entry(e: BaseException | str) -> dict:
    msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return {"status": "error", "error": msg[:2000]}


# --------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------


class Env:
    """What is fixed for the whole run: platform, devices, precision."""

    def __init__(self, args):
        import jax

        jax.config.update("jax_enable_compilation_cache", False)
        self.jax_device = jax.devices()[0]
        self.platform = jax.default_backend()  # "cpu", "gpu"/"cuda", "rocm", "tpu"
        self.on_gpu = self.platform in ("gpu", "cuda", "rocm")
        self.cpu_bf16_matmul = cpu_bf16_matmul_flags()
        self.precision = args.precision
        self.unroll = args.unroll
        self.torch_info = None
        self.torch_device = "cpu"
        self.torch_error = None
        try:
            import torch

            self.torch_info = peers.torch_threads(args.torch_threads)
            if torch.cuda.is_available():
                self.torch_device = "cuda"
            tf32 = args.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            self.torch_info.update({"device": self.torch_device,
                                    "cudnn": torch.backends.cudnn.is_available() if self.torch_device == "cuda" else None,
                                    "mkldnn": torch.backends.mkldnn.is_available()})
        except ImportError as e:
            self.torch_error = f"torch not importable: {e}"
        if self.on_gpu:
            jax.config.update("jax_default_matmul_precision", "highest" if args.precision == "float32" else "tensorfloat32")
        try:
            import flax  # noqa: F401
            self.flax_error = None
        except ImportError as e:
            self.flax_error = f"flax not importable: {e}"

    @property
    def cudnn_precision(self):
        return "highest" if self.precision == "float32" else None

    def make(self, name: str, shape: Shape, data: peers.Data, weights):
        """Builds one implementation, or returns a ``{"status": "skipped"|"error"}`` entry."""
        try:
            if name == "lstm_jax_bf16":
                if self.platform == "cpu" and not self.cpu_bf16_matmul:
                    return {"status": "skipped",
                            "reason": "GPU/TPU or a CPU with AMX-BF16/AVX512-BF16 only (bfloat16 matmul units)"}
                import jax.numpy as jnp

                return peers.make_lstm_jax(shape, data, weights, "fused", self.unroll, matmul_dtype=jnp.bfloat16,
                                           name=name)
            if name == "lstm_jax_pallas":
                if not self.on_gpu:
                    return {"status": "skipped", "reason": "GPU only (Pallas/Triton kernels)"}
                return peers.make_lstm_jax_pallas(shape, data, weights)
            if name.startswith("lstm_jax_"):
                return peers.make_lstm_jax(shape, data, weights, name.removeprefix("lstm_jax_"), self.unroll)
            if name == "torch":
                if self.torch_error:
                    return {"status": "skipped", "reason": self.torch_error}
                return peers.TorchImpl(shape, data, weights, self.torch_device)
            if name == "flax":
                if self.flax_error:
                    return {"status": "skipped", "reason": self.flax_error}
                return peers.make_flax(shape, data, SEED)
            if name == "jax_cudnn":
                if not self.on_gpu:
                    return {"status": "skipped", "reason": "GPU only (cuDNN)"}
                return peers.make_jax_cudnn(shape, data, SEED, self.cudnn_precision)
        except Exception as e:  # noqa: BLE001
            return error_entry(e)
        raise ValueError(name)


def run_phase(impls: dict, phase: str, steps: int, rounds: int, warmup: int, entries: dict,
              chains: dict | None = None, chain_steps: int = 0) -> dict:
    """Sets up (first result), warms up and times one phase ("train" or "infer") of every
    implementation; fills ``entries[name][phase]``. A failing implementation is marked as
    an error and removed from ``impls``.

    ``chains`` (library -> a warmed-up call, see :func:`gemm_chains`) are timed ``chain_steps``
    times each in the same rounds, so that the GEMM floor sees the machine as the
    implementations do. Returns their times (``{library: [s, ...]}``; a failure as a string).
    """
    errors: dict = {}
    for name, impl in impls.items():
        if isinstance(impl, peers.TorchImpl):
            impl.reset_peak()
        try:
            ttfr = getattr(impl, f"setup_{phase}")()
            for w in range(warmup):
                getattr(impl, f"{phase}_step")(w + 1)
            entries[name][f"{phase}_first_result_s"] = ttfr
            entries[name][f"{phase}_compile"] = (impl.compile_s or {}).get(phase)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    fns = {n: getattr(i, f"{phase}_step") for n, i in impls.items() if n not in errors}
    steps_by_name = dict.fromkeys(fns, steps)
    for lib, chain in (chains or {}).items():
        fns[f"gemm_{lib}"] = lambda _k, chain=chain: chain()
        steps_by_name[f"gemm_{lib}"] = chain_steps
    times = interleaved(fns, steps_by_name, rounds, errors)
    for name, impl in impls.items():
        if name in errors:
            entries[name].update(error_entry(f"{phase}: {errors[name]}"))
            continue
        entries[name][phase] = stats(times[name])
        if isinstance(impl, peers.TorchImpl):
            impl.record_peak(phase)
    for name in errors:
        impls.pop(name, None)
    return {lib: errors.get(f"gemm_{lib}", times.get(f"gemm_{lib}")) for lib in chains or {}}


def gemm_chains(env: Env, shape: Shape) -> tuple[dict, dict]:
    """The GEMM floor's chains (:func:`peers.gemm_chain_jax`, ``..._torch``), built and warmed
    up: ``({lib: call}, {lib: error entry})``; torch is left out when it is not importable."""
    chains, failed = {}, {}
    builders = {"jax": lambda: peers.gemm_chain_jax(shape, SEED)}
    if not env.torch_error:
        builders["torch"] = lambda: peers.gemm_chain_torch(shape, SEED, env.torch_device)
    for lib, build in builders.items():
        try:
            chains[lib] = build()
        except Exception as e:  # noqa: BLE001
            failed[lib] = error_entry(e)
    return chains, failed


def run_config(env: Env, name: str, shape: Shape, steps: int, args) -> dict:
    t_start = time.perf_counter()
    data = peers.Data.make(shape, sets=args.input_sets, seed=SEED)
    weights = peers.init_reference_weights(shape, SEED)
    impls, entries = {}, {}
    for impl_name in IMPLS:
        built = env.make(impl_name, shape, data, weights)
        if isinstance(built, dict):
            entries[impl_name] = built
        else:
            impls[impl_name] = built
            entries[impl_name] = {"status": "ok"}
    # The matmul floor: the forward's GEMMs as a dependent chain, in JAX and in PyTorch, timed
    # in the implementations' rounds of both phases, like them in blocks of consecutive calls
    # (2 per round). Timed apart, after the implementations, the tutorial's chain ran at 69.1
    # GFLOP/s in one idle run and 60.5 in the next: the floor then measured the machine at
    # another moment than the implementations it is compared with.
    chains, gemm = gemm_chains(env, shape)
    chain_steps = min(steps, 2 * args.rounds)
    chain_times: dict = {lib: [] for lib in chains}
    for phase in ("train", "infer"):
        for lib, t in run_phase(impls, phase, steps, args.rounds, args.warmup, entries, chains, chain_steps).items():
            if isinstance(t, str):  # a failed chain is not timed again
                gemm[lib] = error_entry(t)
                del chains[lib], chain_times[lib]
            else:
                chain_times[lib] += t
    del chains
    for impl_name, impl in impls.items():
        entries[impl_name]["first_loss"] = impl.first_loss
        try:
            entries[impl_name]["memory"] = impl.memory()
        except Exception as e:  # noqa: BLE001
            entries[impl_name]["memory"] = {"error": f"{type(e).__name__}: {e}"}
        entries[impl_name]["device"] = getattr(impl, "device", None) and str(impl.device) or env.platform
    del impls
    gc.collect()

    flops_fwd, flops_train = shape.forward_flops(), shape.train_flops()
    for lib, t in chain_times.items():
        st = stats(t)
        gemm[lib] = {**st, "gflops": flops_fwd / st["median_s"] / 1e9}
    rates = [g["gflops"] for g in gemm.values() if "gflops" in g]
    floor = None
    if rates:
        rate = max(rates) * 1e9
        floor = {"gflops": rate / 1e9, "forward_s": flops_fwd / rate, "train_s": flops_train / rate}
        for e in entries.values():
            for phase, fl in (("train", flops_train), ("infer", flops_fwd)):
                if phase in e:
                    med = e[phase]["median_s"]
                    e[phase]["gflops"] = fl / med / 1e9
                    e[phase]["frac_of_floor"] = (fl / rate) / med

    # First losses: lstm_jax (both impls) and torch start from the same weights and data.
    ref = entries.get("lstm_jax_fused", {}).get("first_loss")
    same = {n: entries[n].get("first_loss") for n in ("lstm_jax_scan", "lstm_jax_pallas", "torch")
            if entries.get(n, {}).get("first_loss") is not None}
    loss_check = None
    if ref is not None and same:
        diff = max(abs(v - ref) for v in same.values())
        tol = 1e-4 if env.precision == "float32" else 2e-2
        loss_check = {"reference": "lstm_jax_fused", "compared": sorted(same), "max_abs_diff": diff, "tol": tol, "ok": diff <= tol}
        bf16 = entries.get("lstm_jax_bf16", {}).get("first_loss")
        if bf16 is not None:
            # bfloat16 operands keep 8 significant bits: the loss agrees to about 1e-2, not 1e-4.
            d = abs(bf16 - ref)
            loss_check["bf16"] = {"max_abs_diff": d, "tol": BF16_LOSS_TOL, "ok": d <= BF16_LOSS_TOL}

    return {
        "shape": {"batch": shape.batch, "steps": shape.steps, "inputs": shape.inputs,
                  "hidden": shape.hidden, "layers": shape.layers},
        "description": CONFIGS[name][1] if name in CONFIGS else "",
        "timed_steps": steps,
        "flops": {"forward": flops_fwd, "train": flops_train},
        "gemm": gemm,
        "floor": floor,
        "results": entries,
        "ratios": ratios(entries),
        "first_loss_check": loss_check,
        "wall_s": time.perf_counter() - t_start,
    }


def ratios(entries: dict) -> dict:
    """lstm_jax median / peer median (< 1: lstm_jax is faster), per phase; and scan / fused."""
    out: dict = {}
    for phase in ("train", "infer"):
        r: dict = {}
        med = {n: e[phase]["median_s"] for n, e in entries.items() if e.get("status") == "ok" and phase in e}
        for s in SUBJECTS:
            for p in PEERS:
                if s in med and p in med:
                    r[f"{s}/{p}"] = med[s] / med[p]
        for other in ("lstm_jax_scan", "lstm_jax_bf16", "lstm_jax_pallas"):
            if other in med and "lstm_jax_fused" in med:
                r[f"{other}/lstm_jax_fused"] = med[other] / med["lstm_jax_fused"]
        out[phase] = r
    return out


# --------------------------------------------------------------------------------------
# Test-set inference
# --------------------------------------------------------------------------------------


def run_testset(env: Env, spec: dict, passes: int, impl_names) -> dict:
    """Logits for ``spec["sequences"]`` random sequences of the tutorial shape, in batches of
    ``spec["batch"]``, each batch's result blocked on (as a loop collecting predictions
    would). The inputs are on the device beforehand; one pass is timed as a whole."""
    base = CONFIGS[spec["config"]][0]
    n_batches = math.ceil(spec["sequences"] / spec["batch"])
    shape = Shape(spec["batch"], base.steps, base.inputs, base.hidden, base.layers)
    data = peers.Data.make(shape, sets=n_batches, seed=SEED + 1)
    weights = peers.init_reference_weights(shape, SEED)
    entries: dict = {}
    impls = {}
    for name in impl_names:
        built = env.make(name, shape, data, weights)
        if isinstance(built, dict):
            entries[name] = built
        else:
            impls[name] = built
            entries[name] = {"status": "ok"}
    for name, impl in list(impls.items()):
        try:
            entries[name]["first_result_s"] = impl.setup_infer()
            entries[name]["compile"] = (impl.compile_s or {}).get("infer")
        except Exception as e:  # noqa: BLE001
            entries[name] = error_entry(e)
            del impls[name]

    def one_pass(impl):
        def f(_):
            for k in range(n_batches):
                impl.infer_step(k)
        return f

    errors: dict = {}
    times = interleaved({n: one_pass(i) for n, i in impls.items()}, passes, passes, errors)
    for name in impls:
        if name in errors:
            entries[name] = error_entry(errors[name])
            continue
        st = stats(times[name])
        entries[name].update({"pass": st, "sequences_per_s": n_batches * spec["batch"] / st["median_s"]})
    med = {n: e["pass"]["median_s"] for n, e in entries.items() if "pass" in e}
    r = {f"lstm_jax_fused/{p}": med["lstm_jax_fused"] / med[p] for p in PEERS if p in med and "lstm_jax_fused" in med}
    return {**spec, "sequences": n_batches * spec["batch"], "shape": shape.__dict__, "timed_passes": passes,
            "results": entries, "ratios": r}


# --------------------------------------------------------------------------------------
# The machine's matmul peak and the targets
# --------------------------------------------------------------------------------------


def gemm_rates(env: Env, measure_jax, measure_torch, flops: float, statistic: str) -> dict:
    """``{"jax": stats + gflops, "torch": ...}`` for one GEMM chain timed in both libraries
    (``flops`` per repetition, rated at the ``statistic`` of its times); torch is left out
    when it is not importable, and a failure is recorded as an error entry."""
    out: dict = {}
    for lib, measure in (("jax", measure_jax), ("torch", measure_torch)):
        if lib == "torch" and env.torch_error:
            continue
        try:
            st = stats(measure())
            out[lib] = {**st, "gflops": flops / st[statistic] / 1e9}
        except Exception as e:  # noqa: BLE001
            out[lib] = error_entry(e)
    return out


def run_peak_gemm(env: Env, reps: int) -> dict:
    """The attainable matmul rate: a chain of large float32 GEMMs, in JAX and in PyTorch, each
    at its fastest repetition; the faster library bounds what any implementation doing the
    LSTM's FLOPs can reach on this machine."""
    mkn = peers.PEAK_GEMM_GPU if env.on_gpu else peers.PEAK_GEMM_CPU
    flops = 2 * mkn[0] * mkn[1] * mkn[2] * peers.PEAK_GEMM_CHAIN
    # The fastest repetition: a bound should be what the machine can do, not its typical noise.
    out: dict = gemm_rates(env, lambda: peers.measure_peak_gemm_jax(mkn, reps, SEED),
                           lambda: peers.measure_peak_gemm_torch(mkn, reps, SEED, env.torch_device), flops, "min_s")
    rates = [g["gflops"] for g in out.values() if "gflops" in g]
    return {**out, "mkn": list(mkn), "chain": peers.PEAK_GEMM_CHAIN, "gflops": max(rates) if rates else None}


def _entry(config: dict | None, impl: str) -> dict:
    """One implementation's results in one config (``{}`` when the config or impl is absent)."""
    return (config or {}).get("results", {}).get(impl) or {}


def _median(config: dict | None, impl: str, phase: str) -> float | None:
    return (_entry(config, impl).get(phase) or {}).get("median_s")


def train_compile_s(entry: dict) -> tuple[Optional[float], str]:
    """An implementation's compile time for its training step, and how it was measured.

    Reports since the CompileTimer hold JAX's own durations of tracing, lowering and XLA
    compilation; older ones only the first result, less one ordinary step as an estimate
    (which also counts the first execution's one-off costs, growing with T).
    """
    direct = entry.get("train_compile")
    if direct:
        return direct["total_s"], "trace + lowering + XLA compile"
    first, train = entry.get("train_first_result_s"), entry.get("train")
    if first is None or not train:
        return None, "not measured"
    return first - train["median_s"], "first training step − median step"


def targets(report: dict) -> list[dict]:
    """The issue's benchmark targets with what this run measured.

    Each row: ``target``, ``goal`` (text), ``measured``, ``met`` (None when not measured)
    and, for a ratio against a peer, ``bound``: the ratio lstm_jax would have if its step
    took only the LSTM's matmul FLOPs at the machine's peak GEMM rate -- no implementation
    doing those FLOPs gets below it on this machine.
    """
    configs, ts = report["configs"], report.get("testset")
    peak = (report.get("peak_gemm") or {}).get("gflops")
    rows: list[dict] = []

    def ratio_row(target, goal, measured, flops, peer_s, want_below=True):
        bound = None
        if peak and flops and peer_s:
            bound = flops / (peak * 1e9) / peer_s
            if not want_below:
                bound = 1 / bound
        met = None if measured is None else (measured <= goal if want_below else measured >= goal)
        rows.append({"target": target, "goal": f"{'≤' if want_below else '≥'} {goal:g}", "measured": measured,
                     "met": met, "bound": bound})

    tut, pix = configs.get("tutorial"), configs.get("pixel")
    train_ratio = lambda c, peer: (c or {}).get("ratios", {}).get("train", {}).get(f"lstm_jax_fused/{peer}")  # noqa: E731
    tut_flops = (tut or {}).get("flops", {}).get("train")
    if report["platform"] == "cpu":
        ratio_row("tutorial training step, fused / torch", 0.75, train_ratio(tut, "torch"), tut_flops,
                  _median(tut, "torch", "train"))
        ratio_row("tutorial training step, fused / Flax", 0.7, train_ratio(tut, "flax"), tut_flops,
                  _median(tut, "flax", "train"))
        ts_ratio = ts_flops = ts_torch = None
        if ts and ts.get("config") == "tutorial" and not report.get("quick"):
            ts_ratio = ts["ratios"].get("lstm_jax_fused/torch")
            ts_flops = Shape(**ts["shape"]).forward_flops() * ts["sequences"] // ts["batch"]
            ts_torch = ((ts["results"].get("torch") or {}).get("pass") or {}).get("median_s")
        ratio_row("10,000-sequence test-set inference, fused / torch", 0.7, ts_ratio, ts_flops, ts_torch)
        fused_tut = _entry(tut, "lstm_jax_fused")
        first = fused_tut.get("train_first_result_s")
        rows.append({"target": "tutorial time to the first training step (s)", "goal": "≤ 2", "measured": first,
                     "met": None if first is None else first <= 2.0, "bound": None})
        # The issue reads this target as compile time.
        compiled, how = train_compile_s(fused_tut)
        rows.append({"target": f"tutorial compile time: {how} (s)", "goal": "≤ 2",
                     "measured": compiled, "met": None if compiled is None else compiled <= 2.0, "bound": None})
        frac = (fused_tut.get("train") or {}).get("frac_of_floor")
        rows.append({"target": "tutorial training step, fraction of the GEMM-chain floor", "goal": "≥ 0.8",
                     "measured": frac, "met": None if frac is None else frac >= 0.8, "bound": None})
        ratio_row("pixel (T=784) training step, fused / torch", 0.8, train_ratio(pix, "torch"),
                  (pix or {}).get("flops", {}).get("train"), _median(pix, "torch", "train"))
        # Compile time over the configs that vary T: the T sweep and pixel (keyed by name:
        # several configs share a T).
        in_t_sweep = SWEEPS["steps"][1]
        compile_s, hows = {}, set()
        for name, c in configs.items():
            seconds, how = train_compile_s(_entry(c, "lstm_jax_fused"))
            if seconds is not None and (name == "pixel" or in_t_sweep(Shape(**c["shape"]))):
                compile_s[(c["shape"]["steps"], name)] = seconds
                hows.add(how)
        if len(compile_s) >= 2:
            spread = max(compile_s.values()) / min(compile_s.values())
            text = ", ".join(f"{n} T={t}: {s:.2f} s" for (t, n), s in sorted(compile_s.items()))
            rows.append({"target": f"compile time independent of T, the T sweep and pixel ({' / '.join(sorted(hows))}; {text})",
                         "goal": "max/min ≤ 1.5", "measured": spread, "met": spread <= 1.5, "bound": None})
    else:
        ratio_row("tutorial training step, fused / torch (cuDNN)", 1.0, train_ratio(tut, "torch"), tut_flops,
                  _median(tut, "torch", "train"))
        ratio_row("tutorial training step, fused / jax.experimental.rnn (cuDNN)", 1.0, train_ratio(tut, "jax_cudnn"),
                  tut_flops, _median(tut, "jax_cudnn", "train"))
        flax_over = None
        fused_s, flax_s = _median(tut, "lstm_jax_fused", "train"), _median(tut, "flax", "train")
        if fused_s and flax_s:
            flax_over = flax_s / fused_s
        ratio_row("tutorial training step, Flax / fused (speed-up)", 5.0, flax_over, tut_flops, flax_s, want_below=False)
        # What adopting the Pallas candidate (bench/pallas_lstm.py) would give, same goals.
        pallas_ratio = lambda peer: (tut or {}).get("ratios", {}).get("train", {}).get(f"lstm_jax_pallas/{peer}")  # noqa: E731
        ratio_row("candidate: tutorial training step, Pallas / torch (cuDNN)", 1.0, pallas_ratio("torch"), tut_flops,
                  _median(tut, "torch", "train"))
        ratio_row("candidate: tutorial training step, Pallas / jax.experimental.rnn (cuDNN)", 1.0,
                  pallas_ratio("jax_cudnn"), tut_flops, _median(tut, "jax_cudnn", "train"))
        pallas_s = _median(tut, "lstm_jax_pallas", "train")
        ratio_row("candidate: tutorial training step, Flax / Pallas (speed-up)", 5.0,
                  flax_s / pallas_s if pallas_s and flax_s else None, tut_flops, flax_s, want_below=False)
    return rows


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ms(x):
    return "—" if x is None else (f"{x * 1e3:.3g}" if x * 1e3 < 100 else f"{x * 1e3:.0f}")


def _cell(e: dict, phase: str) -> str:
    if e.get("status") != "ok":
        return e.get("reason") or (e.get("error", "error")[:40])
    s = e.get(phase)
    if not s:
        return "—"
    return f"{_ms(s['median_s'])} [{_ms(s['q1_s'])}–{_ms(s['q3_s'])}]"


def _pct(e: dict, phase: str) -> str:
    f = (e.get(phase) or {}).get("frac_of_floor")
    return "—" if f is None else f"{100 * f:.0f}%"


def _mem(e: dict, phase: str) -> str:
    m = (e.get("memory") or {}).get(phase)
    if not m:
        return "—"
    b = m.get("peak_bytes", m.get("total_bytes"))
    return "—" if b is None else f"{b / 2**20:.1f}"


def _first(first_s, compile_entry) -> str:
    """The time to the first result, with the compile time in it when JAX reported one."""
    if first_s is None:
        return "—"
    return f"{first_s:.2f}" + ("" if not compile_entry else f" ({compile_entry['total_s']:.2f})")


def _ratio(x):
    return "—" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    v = report["versions"]
    lines = [f"# lstm_jax benchmark: {report['device']}", ""]
    if report.get("note"):
        lines += [f"**{report['note']}**", ""]
    if report.get("load_warning"):
        lines += [f"**Warning: {report['load_warning']}**", ""]
    lines += [
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- platform: {report['platform']}; CPU: {m['cpu_model']}, {m['cpu_count']} cores (os.cpu_count), "
        f"bfloat16 matmul instructions: {', '.join(m.get('cpu_bf16_matmul') or []) or 'none'}; "
        f"torch threads: {(report.get('torch') or {}).get('torch_num_threads')}; "
        f"load average at start/end: {m['loadavg_start']} / {m['loadavg_end']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- lstm_jax commit: {report['git']['commit']}" + (" (lstm_jax/ has uncommitted changes)" if report["git"]["lstm_jax_dirty"] else ""),
        f"- precision: {report['precision']}; timed steps per implementation: {report['steps_note']}; "
        f"times are medians [IQR] in ms; '% floor' = GEMM-floor time / measured time.",
        f"- memory (MiB): {report['memory_note']}",
        f"- host allocator (the whole process, every implementation): {report.get('allocator', 'default')}",
        "",
        "## Ratios (lstm_jax median / peer median; < 1 means lstm_jax is faster)",
        "",
        "| config | train fused/torch | fused/flax | fused/cuDNN | scan/fused | bf16/fused | pallas/fused "
        "| infer fused/torch | fused/flax | fused/cuDNN | pallas/fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["configs"].items():
        t, i = c["ratios"]["train"], c["ratios"]["infer"]
        lines.append(
            f"| {name} | {_ratio(t.get('lstm_jax_fused/torch'))} | {_ratio(t.get('lstm_jax_fused/flax'))} | "
            f"{_ratio(t.get('lstm_jax_fused/jax_cudnn'))} | {_ratio(t.get('lstm_jax_scan/lstm_jax_fused'))} | "
            f"{_ratio(t.get('lstm_jax_bf16/lstm_jax_fused'))} | {_ratio(t.get('lstm_jax_pallas/lstm_jax_fused'))} | "
            f"{_ratio(i.get('lstm_jax_fused/torch'))} | {_ratio(i.get('lstm_jax_fused/flax'))} | "
            f"{_ratio(i.get('lstm_jax_fused/jax_cudnn'))} | {_ratio(i.get('lstm_jax_pallas/lstm_jax_fused'))} |")
    lines.append("")
    for name, c in report["configs"].items():
        s = c["shape"]
        fl = c["floor"]
        g = c["gemm"]
        gtxt = ", ".join(f"{lib} {x['gflops']:.1f} GFLOP/s" for lib, x in g.items() if "gflops" in x) or "not measured"
        lines += [
            f"## {name}: B={s['batch']} T={s['steps']} I={s['inputs']} H={s['hidden']} L={s['layers']}"
            + (f" (same shape as {c['same_as']})" if c.get("same_as") else ""),
            "",
            f"{c['description']}. FLOPs: forward {c['flops']['forward'] / 1e9:.3g} G, train {c['flops']['train'] / 1e9:.3g} G. "
            f"GEMM chain: {gtxt}" + (f"; floor: train {_ms(fl['train_s'])} ms, infer {_ms(fl['forward_s'])} ms." if fl else "."),
            "",
            "| impl | train ms | % floor | infer ms | % floor | first train s (compile) | first infer s (compile) "
            "| train MiB | infer MiB | first loss |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for impl, e in c["results"].items():
            loss = e.get("first_loss")
            lines.append(
                f"| {impl} | {_cell(e, 'train')} | {_pct(e, 'train')} | {_cell(e, 'infer')} | {_pct(e, 'infer')} | "
                f"{_first(e.get('train_first_result_s'), e.get('train_compile'))} | "
                f"{_first(e.get('infer_first_result_s'), e.get('infer_compile'))} | "
                f"{_mem(e, 'train')} | {_mem(e, 'infer')} | {'—' if loss is None else f'{loss:.6f}'} |")
        chk = c.get("first_loss_check")
        if chk:
            lines.append("")
            lines.append(f"First-loss check (same weights and data): max |Δ| vs {chk['reference']} = {chk['max_abs_diff']:.2e} "
                         f"({'ok' if chk['ok'] else 'MISMATCH'}, tol {chk['tol']:g})"
                         + (f"; lstm_jax_bf16: |Δ| = {chk['bf16']['max_abs_diff']:.2e} "
                            f"({'ok' if chk['bf16']['ok'] else 'MISMATCH'}, tol {chk['bf16']['tol']:g})." if chk.get("bf16") else "."))
        lines.append("")
    for sweep, (sym, match, key) in SWEEPS.items():
        pts = sorted(((key(Shape(**c["shape"])), n, c) for n, c in report["configs"].items() if match(Shape(**c["shape"]))),
                     key=lambda x: x[0])
        seen, uniq = set(), []
        for p in pts:
            if p[0] not in seen:
                seen.add(p[0])
                uniq.append(p)
        if len(uniq) < 2:
            continue
        lines += [f"## Sweep over {sym}: train / infer ms (train step's % of the GEMM floor)", "",
                  f"| {sym} | config | " + " | ".join(IMPLS) + " |", "|---|---|" + "---|" * len(IMPLS)]
        for val, n, c in uniq:
            cells = []
            for impl in IMPLS:
                e = c["results"].get(impl, {})
                st, si = e.get("train"), e.get("infer")
                cells.append(f"{_ms(st['median_s'])} / {_ms(si['median_s'] if si else None)} ({_pct(e, 'train')})" if st else "—")
            lines.append(f"| {val} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    pk = report.get("peak_gemm")
    if pk:
        m_, k_, n_ = pk["mkn"]
        rates = ", ".join(f"{lib} {pk[lib]['gflops']:.1f} GFLOP/s" for lib in ("jax", "torch") if "gflops" in pk.get(lib, {}))
        lines += ["## The issue's targets", "",
                  f"Machine matmul peak: a chain of {pk['chain']} float32 [{m_}, {k_}] x [{k_}, {n_}] GEMMs, fastest repetition: "
                  f"{rates or 'not measured'}. 'Bound' is the ratio lstm_jax would reach if its step did nothing "
                  "but the LSTM's matmul FLOPs at that peak rate: no implementation doing those FLOPs can beat it here.", "",
                  "| target | goal | measured | met | bound at peak GEMM |", "|---|---|---|---|---|"]
        for row in report.get("targets") or []:
            meas = "not measured" if row["measured"] is None else f"{row['measured']:.2f}"
            met = "—" if row["met"] is None else ("yes" if row["met"] else "**no**")
            bound = "—" if row["bound"] is None else f"{row['bound']:.2f}"
            lines.append(f"| {row['target']} | {row['goal']} | {meas} | {met} | {bound} |")
        lines.append("")
    ts = report.get("testset")
    if ts:
        lines += [f"## Inference over a {ts['sequences']}-sequence test set ({ts['config']} shape, batches of {ts['batch']})", "",
                  "| impl | pass s (median [min–max]) | sequences/s | first result s (compile) |", "|---|---|---|---|"]
        for impl, e in ts["results"].items():
            if "pass" in e:
                p = e["pass"]
                lines.append(f"| {impl} | {p['median_s']:.3f} [{p['min_s']:.3f}–{p['max_s']:.3f}] | "
                             f"{e['sequences_per_s']:.0f} | {_first(e['first_result_s'], e.get('compile'))} |")
            else:
                lines.append(f"| {impl} | {e.get('reason') or e.get('error', '')[:60]} | — | — |")
        if ts["ratios"]:
            lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ts["ratios"].items())]
        lines.append("")
    lines.append(f"Total wall time: {report['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: configs {','.join(QUICK_CONFIGS)} (unless --configs), fewer steps, "
                         f"a {QUICK_TESTSET['sequences']}-sequence test set")
    ap.add_argument("--configs", help=f"comma-separated subset of: {','.join(CONFIGS)} (default: all; --quick: {','.join(QUICK_CONFIGS)})")
    ap.add_argument("--steps", type=int, help="timed steps per implementation and phase (default 30; 20 for pixel/large; --quick 20, 5 for pixel/large)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder (default bench/results)")
    ap.add_argument("--no-testset", action="store_true", help="skip the test-set inference")
    ap.add_argument("--testset-passes", type=int, help="timed passes over the test set (default 3; --quick 1)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds the timed steps are interleaved in (default 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps after the first result (default 2; --quick 1)")
    ap.add_argument("--input-sets", type=int, help="distinct random input batches rotated through (default 4; --quick 2)")
    ap.add_argument("--unroll", type=int, help="passed to lstm_jax.lstm(unroll=...) (default: the library's default)")
    ap.add_argument("--torch-threads", type=int,
                    help="torch.set_num_threads (default os.cpu_count(); recorded in the results)")
    ap.add_argument("--precision", choices=("float32", "tf32"), default="float32",
                    help="GPU matmul precision for every implementation (default float32: no TF32). No effect on CPU.")
    ap.add_argument("--note", help="a label written at the top of the results (e.g. 'preliminary: loaded machine')")
    ap.add_argument("--retain-freed-memory", action="store_true",
                    help="call lstm_jax.retain_freed_memory() first, for the whole process and every implementation "
                         "alike: freed memory is reused, not page-faulted in again at each step (default: glibc as it is)")
    args = ap.parse_args(argv)
    names = args.configs.split(",") if args.configs else list(QUICK_CONFIGS if args.quick else CONFIGS)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    args.config_names = names
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be positive")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.input_sets = args.input_sets if args.input_sets is not None else (2 if args.quick else 4)
    args.testset_passes = args.testset_passes if args.testset_passes is not None else (1 if args.quick else 3)
    return args


def steps_for(name: str, args) -> int:
    if args.steps is not None:
        return args.steps
    if args.quick:
        return 5 if name in HEAVY else 20
    return 20 if name in HEAVY else 30


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    allocator = "default"
    if args.retain_freed_memory:
        import lstm_jax  # before anything starts JAX's or torch's threads (lstm_jax/_memory.py)

        if lstm_jax.retain_freed_memory():
            allocator = "lstm_jax.retain_freed_memory() (one malloc arena, no mmap, no trim below 2 GiB)"
        else:
            allocator = "default (retain_freed_memory: not glibc)"
    # What is imported now is what gets timed: record the checkout's state now, not at the end.
    git_start = git_info()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    env = Env(args)
    dev = device_name(env.platform, env.jax_device)
    log(f"device {dev} (jax platform {env.platform}); torch on {env.torch_device}; configs {args.config_names}")
    if env.torch_info:
        log(f"torch threads: {env.torch_info}")

    configs: dict = {}
    measured: dict = {}  # shape -> config name, to reuse results of an identical shape
    for name in args.config_names:
        shape = CONFIGS[name][0]
        if shape in measured:
            configs[name] = {**configs[measured[shape]], "same_as": measured[shape],
                             "description": CONFIGS[name][1]}
            log(f"[{name}] same shape as {measured[shape]}: reusing its results")
            continue
        steps = steps_for(name, args)
        log(f"[{name}] {shape} steps={steps} ...")
        configs[name] = run_config(env, name, shape, steps, args)
        measured[shape] = name
        c = configs[name]
        summary = ", ".join(
            f"{n} {_ms(e['train']['median_s'])}/{_ms(e['infer']['median_s'])} ms" if "train" in e and "infer" in e
            else f"{n} {e.get('status')}" for n, e in c["results"].items())
        log(f"[{name}] done in {c['wall_s']:.1f} s (train/infer medians): {summary}")

    testset = None
    if not args.no_testset:
        spec = QUICK_TESTSET if args.quick else TESTSET
        log(f"[testset] {spec['sequences']} sequences in batches of {spec['batch']}, {args.testset_passes} timed pass(es) ...")
        t_ts = time.perf_counter()
        testset = run_testset(env, spec, args.testset_passes, QUICK_TESTSET_IMPLS if args.quick else TESTSET_IMPLS)
        log(f"[testset] done in {time.perf_counter() - t_ts:.1f} s")

    log("[peak GEMM] ...")
    peak_gemm = run_peak_gemm(env, reps=3 if args.quick else 10)
    log(f"[peak GEMM] {peak_gemm.get('gflops') or 0:.1f} GFLOP/s")

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    ncpu = os.cpu_count() or 1
    load_warning = None
    # The benchmark itself keeps every core busy, so a load of about ncpu at the end is its
    # own; other work shows as load before it starts, or well above ncpu at the end.
    if load_start and (load_start[0] > 0.5 * ncpu or load_end[0] > 1.5 * ncpu) and not env.on_gpu:
        load_warning = (f"the machine was loaded (1-min load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, "
                        f"on {ncpu} cores): CPU timings are not reliable")
    jax_peak = None
    if env.on_gpu:
        try:
            jax_peak = (env.jax_device.memory_stats() or {}).get("peak_bytes_in_use")
        except Exception:  # noqa: BLE001
            pass
    report = {
        "schema": 1,
        "device": dev,
        "platform": env.platform,
        "note": args.note,
        "load_warning": load_warning,
        "preliminary": bool(args.quick or load_warning or args.note),
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu_model": cpu_model(), "cpu_count": ncpu, "cpu_bf16_matmul": env.cpu_bf16_matmul,
                    "jax_device": str(env.jax_device),
                    "jax_device_kind": getattr(env.jax_device, "device_kind", None),
                    "loadavg_start": [round(x, 2) for x in load_start] if load_start else None,
                    "loadavg_end": [round(x, 2) for x in load_end] if load_end else None,
                    "jax_process_peak_bytes": jax_peak},
        "torch": env.torch_info,
        "versions": versions(),
        "git": git_start,
        "precision": args.precision if env.on_gpu else "float32 (CPU)",
        "allocator": allocator,
        "lstm_jax_unroll": args.unroll,
        "steps_note": ", ".join(sorted({f"{n}: {steps_for(n, args)}" for n in args.config_names})),
        "memory_note": ("GPU: torch.cuda.max_memory_allocated per phase; JAX impls: XLA's compiled memory analysis "
                        "(arguments + outputs + temporaries - donated)" if env.on_gpu else
                        "CPU: no runtime peak is reported (torch: null); JAX impls show XLA's compiled memory "
                        "analysis (arguments + outputs + temporaries - donated), a static figure"),
        "method": {"rounds": args.rounds, "warmup_steps": args.warmup, "input_sets": args.input_sets,
                   "timer": "time.perf_counter around each step, which blocks (block_until_ready / cuda.synchronize)",
                   "flops": "forward 8*B*H*(I_l+H) per layer-step; train 3x forward",
                   "floor": "FLOPs / the faster of the JAX and torch GEMM-chain rates measured in this run"},
        "configs": configs,
        "testset": testset,
        "peak_gemm": peak_gemm,
        "wall_s": time.perf_counter() - t0,
    }
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = dev + ("-quick" if args.quick else "")
    md = markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    (out / f"{stem}.md").write_text(md)
    log("")
    log(md)
    log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
