"""The implementations that bench/run.py times, each behind one small interface.

Every implementation builds the same model -- an LSTM stack, then a linear classifier on
the last step's output (``[B, H] -> [B, 10]`` logits), softmax cross-entropy, Adam with
learning rate 1e-3 -- and exposes:

* ``setup_train()``: builds the training step, runs it once on input set 0 and returns the
  wall time from creating the (jitted) function to that first result being ready; the
  first step's loss is kept in ``first_loss``. JAX implementations also keep, in
  ``compile_s["train"]``, what JAX itself reports that first call spent tracing, lowering
  and compiling (see :class:`CompileTimer`); torch runs eagerly and compiles nothing.
* ``train_step(k)``: one training step on input set ``k``, blocking until it is done.
* ``setup_infer()`` / ``infer_step(k)``: the same for the inference forward pass (logits).
* ``memory()``: what the platform reports about the implementation's memory (see
  :func:`Impl.memory`).

``JaxImpl`` serves lstm_jax (fused and scan; the Pallas candidate of ``pallas_lstm.py``), Flax
and ``jax.experimental.rnn`` (cuDNN);
``TorchImpl`` serves ``torch.nn.LSTM``. ``gemm_chain_jax`` / ``gemm_chain_torch`` run the
matmul floor: the LSTM's per-step GEMMs, one after the other (``bench/run.py`` times them
interleaved with the implementations).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import numpy as np

LEARNING_RATE = 1e-3
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark configuration's sizes (float32 throughout)."""

    batch: int
    steps: int  # T, timesteps
    inputs: int  # I, features per timestep
    hidden: int  # H
    layers: int  # L

    def layer_inputs(self) -> list[int]:
        return [self.inputs] + [self.hidden] * (self.layers - 1)

    def forward_flops(self) -> int:
        """The LSTM's matmul FLOPs for one forward pass: 8*B*H*(I_l+H) per layer-step.

        (``[B, I_l+H] x [I_l+H, 4H]``: 2*B*(I_l+H)*4H.) The classifier head and the gate
        arithmetic are left out; they are a few percent at most.
        """
        b, t, h = self.batch, self.steps, self.hidden
        return sum(8 * b * h * (i + h) * t for i in self.layer_inputs())

    def train_flops(self) -> int:
        """About 3x the forward: the forward, then dX and dW in the backward."""
        return 3 * self.forward_flops()


@dataclasses.dataclass
class Data:
    """Random (not zero) inputs and labels, as NumPy, shared by every implementation."""

    xs: list[np.ndarray]  # input sets, each [B, T, I] float32
    ys: list[np.ndarray]  # labels, each [B] int32

    @staticmethod
    def make(shape: Shape, sets: int, seed: int) -> "Data":
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal((shape.batch, shape.steps, shape.inputs), dtype=np.float32) for _ in range(sets)]
        ys = [rng.integers(0, NUM_CLASSES, shape.batch).astype(np.int32) for _ in range(sets)]
        return Data(xs, ys)


def init_reference_weights(shape: Shape, seed: int):
    """The lstm_jax parameters and a classifier head, as NumPy: shared by lstm_jax and torch,
    so that their first losses must agree (a cheap check that they compute the same model)."""
    import jax

    import lstm_jax as lj

    key_lstm, key_head = jax.random.split(jax.random.key(seed))
    lstm_params = jax.device_get(lj.init_lstm(key_lstm, shape.inputs, shape.hidden, shape.layers))
    bound = 1.0 / math.sqrt(shape.hidden)
    k_w, k_b = jax.random.split(key_head)
    head_w = np.array(jax.random.uniform(k_w, (shape.hidden, NUM_CLASSES), minval=-bound, maxval=bound))
    head_b = np.array(jax.random.uniform(k_b, (NUM_CLASSES,), minval=-bound, maxval=bound))
    return lstm_params, head_w, head_b


class Impl:
    name: str = "?"
    first_loss: Optional[float] = None
    compile_s: Optional[dict] = None  # {"train": {...}, "infer": {...}}, see CompileTimer

    def setup_train(self) -> float:
        raise NotImplementedError

    def train_step(self, k: int) -> None:
        raise NotImplementedError

    def setup_infer(self) -> float:
        raise NotImplementedError

    def infer_step(self, k: int) -> None:
        raise NotImplementedError

    def memory(self) -> dict:
        """``{"train": ..., "infer": ...}``, each a dict of byte counts or None."""
        return {"train": None, "infer": None}


# --------------------------------------------------------------------------------------
# JAX implementations
# --------------------------------------------------------------------------------------


def _xla_memory(compiled) -> Optional[dict]:
    """The compiled executable's own memory report: a static figure that XLA gives on
    every platform (arguments + outputs + temporaries - donated aliases)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    arg, out, alias, temp = (int(getattr(m, f, 0) or 0) for f in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"))
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "total_bytes": arg + out - alias + temp}


class CompileTimer:
    """Sums the durations JAX reports for tracing, lowering to StableHLO and XLA compilation
    while it is active (``jax.monitoring`` events, the ones JAX's own compile logging uses).

    This is compile time measured directly, apart from the first execution: the first
    result minus a later step's time also counts what the first execution does once
    (allocating buffers, faulting in pages), which grows with the sequence length.
    """

    EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "xla_s"}

    def __init__(self):
        self.parts = {k: 0.0 for k in self.EVENTS.values()}
        self.xla_compilations = 0

    def _listen(self, event, duration_secs, **kwargs):
        key = self.EVENTS.get(event)
        if key is not None:
            self.parts[key] += duration_secs
            self.xla_compilations += key == "xla_s"

    def __enter__(self):
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listen)

    def result(self) -> Optional[dict]:
        """``{"total_s", "trace_s", "lower_s", "xla_s", "xla_compilations"}``, or None when JAX
        reported no XLA compilation (another JAX version naming its events differently): no
        figure rather than a wrong one."""
        if not self.xla_compilations:
            return None
        return {"total_s": sum(self.parts.values()), **self.parts, "xla_compilations": self.xla_compilations}


class JaxImpl(Impl):
    """A JAX model given as ``loss_fn(params, x, y)`` and ``logits_fn(params, x)``.

    The training step is ``value_and_grad`` + ``optax.adam`` update, jitted once with the
    params and optimiser state donated (``donate_argnums=(0, 1)``).
    """

    def __init__(self, name: str, data: Data, params, loss_fn: Callable, logits_fn: Callable):
        import jax
        import jax.numpy as jnp
        import optax

        self.name = name
        self._jax = jax
        self._tx = optax.adam(LEARNING_RATE)
        self._loss_fn = loss_fn
        self._logits_fn = logits_fn
        self._xs = [jnp.asarray(x) for x in data.xs]
        self._ys = [jnp.asarray(y) for y in data.ys]
        self._params = jax.device_put(params)  # kept for inference
        self._state = None  # (params, opt_state) being trained, donated at each step
        self._step = self._infer = None
        self.compile_s = {}
        jax.block_until_ready((self._xs, self._ys, self._params))

    def setup_train(self) -> float:
        jax, tx, loss_fn = self._jax, self._tx, self._loss_fn
        import optax

        params = jax.tree.map(lambda a: a.copy(), self._params)  # donated: keep our own copy
        opt_state = tx.init(params)
        jax.block_until_ready((params, opt_state))

        def train_step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        t0 = time.perf_counter()
        with CompileTimer() as timer:
            self._step = jax.jit(train_step, donate_argnums=(0, 1))
            params, opt_state, loss = self._step(params, opt_state, self._xs[0], self._ys[0])
            jax.block_until_ready((params, opt_state, loss))
        elapsed = time.perf_counter() - t0
        self.compile_s["train"] = timer.result()
        self.first_loss = float(loss)
        self._state = (params, opt_state)
        return elapsed

    def train_step(self, k: int) -> None:
        k %= len(self._xs)
        params, opt_state, loss = self._step(*self._state, self._xs[k], self._ys[k])
        self._jax.block_until_ready((params, opt_state, loss))
        self._state = (params, opt_state)

    def setup_infer(self) -> float:
        jax = self._jax
        t0 = time.perf_counter()
        with CompileTimer() as timer:
            self._infer = jax.jit(self._logits_fn)
            jax.block_until_ready(self._infer(self._params, self._xs[0]))
        elapsed = time.perf_counter() - t0
        self.compile_s["infer"] = timer.result()
        return elapsed

    def infer_step(self, k: int) -> None:
        self._jax.block_until_ready(self._infer(self._params, self._xs[k % len(self._xs)]))

    def infer_fn(self):
        """The jitted logits function and its params (for the test-set pass)."""
        return self._infer, self._params

    def memory(self) -> dict:
        # jit's lower().compile() hits the cache filled by the first call: no recompilation.
        out = {"train": None, "infer": None, "source": "xla_compiled_memory_analysis"}
        if self._step is not None and self._state is not None:
            out["train"] = _xla_memory(self._step.lower(*self._state, self._xs[0], self._ys[0]).compile())
        if self._infer is not None:
            out["infer"] = _xla_memory(self._infer.lower(self._params, self._xs[0]).compile())
        return out


def _head(params_head, h_last):
    w, b = params_head
    return h_last @ w + b


def _xent(logits, y):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_lstm_jax(shape: Shape, data: Data, weights, impl: str, unroll: Optional[int] = None,
                  remat_chunk: Optional[int] = None, matmul_dtype=None, name: Optional[str] = None) -> JaxImpl:
    """lstm_jax's ``lj.lstm(..., impl=impl)`` stack + head. ``forget_bias=0.0`` so that the
    model is torch.nn.LSTM's exactly (the bias fold is one add; it costs nothing).
    ``unroll``, ``remat_chunk``, ``matmul_dtype``: passed to ``lj.lstm`` when given (else the
    library's defaults). The head's matmul stays in float32."""
    import lstm_jax as lj

    lstm_params, head_w, head_b = weights
    params = {"lstm": lstm_params, "head": (head_w, head_b)}
    extra = {} if unroll is None else {"unroll": unroll}
    if remat_chunk is not None:
        extra["remat_chunk"] = remat_chunk
    if matmul_dtype is not None:
        extra["matmul_dtype"] = matmul_dtype

    def logits_fn(p, x):
        ys, _ = lj.lstm(p["lstm"], x, forget_bias=0.0, impl=impl, **extra)
        return _head(p["head"], ys[:, -1])

    def loss_fn(p, x, y):
        return _xent(logits_fn(p, x), y)

    return JaxImpl(name or f"lstm_jax_{impl}", data, params, loss_fn, logits_fn)


def pallas_warps(hidden: int) -> int:
    """Triton warps per program for the Pallas layer: 4 up to H=128, 8 above (compiled for
    sm_90 at H=256 with TF32 dots, 8 warps spilled 56/72 B per thread in the forward/backward
    kernels, 4 warps 784/1888: ``bench/triton_resources.py``). To check for speed on a GPU
    with ``bench/persistent.py --num-warps``."""
    return 4 if hidden <= 128 else 8


def make_lstm_jax_pallas(shape: Shape, data: Data, weights, matmul_dtype=None, hold_weights: bool = False,
                         batch_tile: int = 16, interpret: bool = False, name: str = "lstm_jax_pallas") -> JaxImpl:
    """The same model with every layer run by ``bench/pallas_lstm.py``'s kernels (forward and
    backward each one Pallas/Triton launch per layer): the persistent-kernel candidate.
    ``interpret=True`` runs them in Pallas's interpreter (any backend; for tests)."""
    import jax.numpy as jnp

    import pallas_lstm

    lstm_params, head_w, head_b = weights
    params = {"lstm": lstm_params, "head": (head_w, head_b)}
    options = {"batch_tile": batch_tile, "hold_weights": hold_weights, "matmul_dtype": matmul_dtype,
               "num_warps": pallas_warps(shape.hidden), "interpret": interpret}

    def logits_fn(p, x):
        xs = jnp.swapaxes(x, 0, 1)  # time-major, as lstm_jax.lstm runs its layers
        zeros = jnp.zeros((x.shape[0], shape.hidden), xs.dtype)
        for layer in p["lstm"]:
            xs, _, _ = pallas_lstm.lstm_layer(layer.w_ih, layer.w_hh, layer.b, xs, zeros, zeros, **options)
        return _head(p["head"], xs[-1])

    def loss_fn(p, x, y):
        return _xent(logits_fn(p, x), y)

    return JaxImpl(name, data, params, loss_fn, logits_fn)


def make_flax(shape: Shape, data: Data, seed: int) -> JaxImpl:
    """``flax.linen``: ``nn.RNN(nn.OptimizedLSTMCell(H))`` per layer + ``nn.Dense(10)``."""
    import flax.linen as nn
    import jax

    hidden, layers = shape.hidden, shape.layers

    class FlaxLSTMClassifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(layers):
                x = nn.RNN(nn.OptimizedLSTMCell(hidden))(x)
            return nn.Dense(NUM_CLASSES)(x[:, -1])

    model = FlaxLSTMClassifier()
    params = model.init(jax.random.key(seed), data.xs[0][:1])

    def logits_fn(p, x):
        return model.apply(p, x)

    def loss_fn(p, x, y):
        return _xent(model.apply(p, x), y)

    return JaxImpl("flax", data, params, loss_fn, logits_fn)


def _cudnn_lstm(x, h0, c0, weights, seq_lengths, shape: Shape, precision):
    """``jax.experimental.rnn.lstm`` (cuDNN); a module-level hook so the plumbing can be
    exercised on CPU by substituting ``jax.experimental.rnn.lstm_ref``."""
    from jax.experimental import rnn

    y, _, _ = rnn.lstm(x, h0, c0, weights, seq_lengths, shape.inputs, shape.hidden, shape.layers,
                       0.0, False, precision)
    return y


def make_jax_cudnn(shape: Shape, data: Data, seed: int, precision) -> JaxImpl:
    """``jax.experimental.rnn.lstm`` (one cuDNN call for the whole stack) + head."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import rnn

    b, h, layers = shape.batch, shape.hidden, shape.layers
    key_w, key_h = jax.random.split(jax.random.key(seed))
    bound = 1.0 / math.sqrt(h)
    params = {
        "lstm": rnn.init_lstm_weight(key_w, shape.inputs, h, layers, False),
        "head": (jax.random.uniform(key_h, (h, NUM_CLASSES), minval=-bound, maxval=bound),
                 jnp.zeros((NUM_CLASSES,), jnp.float32)),
    }

    def logits_fn(p, x):
        zeros = jnp.zeros((layers, x.shape[0], h), x.dtype)
        seq_lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
        y = _cudnn_lstm(x, zeros, zeros, p["lstm"], seq_lengths, shape, precision)
        return _head(p["head"], y[:, -1])

    def loss_fn(p, x, y):
        return _xent(logits_fn(p, x), y)

    del b
    return JaxImpl("jax_cudnn", data, params, loss_fn, logits_fn)


# --------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------


class TorchImpl(Impl):
    """``torch.nn.LSTM(batch_first=True)`` + ``nn.Linear`` + ``torch.optim.Adam``, eager.

    On CUDA this is the cuDNN path; every timed region ends with ``torch.cuda.synchronize``.
    Loaded with lstm_jax's initial weights (``lstm_jax.to_torch``).
    """

    name = "torch"

    def __init__(self, shape: Shape, data: Data, weights, device: str):
        import torch

        import lstm_jax as lj

        self._torch = torch
        self.device = torch.device(device)
        lstm_params, head_w, head_b = weights
        self.lstm = torch.nn.LSTM(shape.inputs, shape.hidden, shape.layers, batch_first=True)
        self.lstm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in lj.to_torch(lstm_params).items()})
        self.head = torch.nn.Linear(shape.hidden, NUM_CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(head_w.T)))
            self.head.bias.copy_(torch.from_numpy(head_b))
        self.lstm.to(self.device)
        self.head.to(self.device)
        if self.device.type == "cuda":
            self.lstm.flatten_parameters()
        self._xs = [torch.from_numpy(x).to(self.device) for x in data.xs]
        self._ys = [torch.from_numpy(y.astype(np.int64)).to(self.device) for y in data.ys]
        self._opt = None
        self._mem = {"train": None, "infer": None}
        self._sync()

    def _sync(self):
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def _logits(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])

    def _train(self, k: int):
        torch = self._torch
        self._opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self._logits(self._xs[k]), self._ys[k])
        loss.backward()
        self._opt.step()
        return loss

    def setup_train(self) -> float:
        torch = self._torch
        self.lstm.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self._opt = torch.optim.Adam(list(self.lstm.parameters()) + list(self.head.parameters()), lr=LEARNING_RATE)
        loss = self._train(0)
        self._sync()
        elapsed = time.perf_counter() - t0
        self.first_loss = float(loss.detach().cpu())
        return elapsed

    def train_step(self, k: int) -> None:
        self._train(k % len(self._xs))
        self._sync()

    def setup_infer(self) -> float:
        t0 = time.perf_counter()
        self.infer_step(0)
        return time.perf_counter() - t0

    def infer_step(self, k: int) -> None:
        with self._torch.inference_mode():
            self._logits(self._xs[k % len(self._xs)])
        self._sync()

    def logits_inference(self, x):
        with self._torch.inference_mode():
            return self._logits(x)

    # Peak memory, CUDA only: reset before a phase, read after it (run.py calls these).
    def reset_peak(self):
        if self.device.type == "cuda":
            self._torch.cuda.reset_peak_memory_stats(self.device)

    def record_peak(self, phase: str):
        if self.device.type == "cuda":
            self._mem[phase] = {"peak_bytes": int(self._torch.cuda.max_memory_allocated(self.device))}

    def memory(self) -> dict:
        source = "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else None
        return {**self._mem, "source": source}


# --------------------------------------------------------------------------------------
# The matmul floor
# --------------------------------------------------------------------------------------


def time_reps(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds for each of ``reps`` calls of ``fn`` (which blocks until its result is ready)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _gemm_weights(k: int, n: int, seed: int) -> np.ndarray:
    """``[k, n]`` (n >= k) whose first k columns are orthogonal: ``x <- (x @ w)[:, :k]``
    keeps x's norm, so a long chain neither overflows nor decays into denormals."""
    if n < k:
        raise ValueError(f"GEMM floor: needs 4H >= I+H, got I+H={k}, 4H={n}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    rest = rng.standard_normal((k, n - k)) / math.sqrt(k)
    return np.concatenate([q, rest], axis=1).astype(np.float32)


def gemm_operands(shape: Shape, seed: int):
    """Per layer: ``x [B, I_l+H]`` random, ``w [I_l+H, 4H]``."""
    rng = np.random.default_rng(seed)
    ops = []
    for i in shape.layer_inputs():
        k = i + shape.hidden
        x = rng.standard_normal((shape.batch, k), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ops.append((x, _gemm_weights(k, 4 * shape.hidden, seed + k)))
    return ops


def gemm_chain_jax(shape: Shape, seed: int) -> Callable[[], object]:
    """A compiled, warmed-up call running T dependent ``[B, I_l+H] x [I_l+H, 4H]`` matmuls per
    layer, all layers (exactly the LSTM forward's matmul FLOPs, one ``lax.scan`` per layer,
    jitted) and blocking until they are done."""
    import jax
    import jax.numpy as jnp

    ops = [(jnp.asarray(x), jnp.asarray(w)) for x, w in gemm_operands(shape, seed)]

    def chain(ops):
        outs = []
        for x, w in ops:
            k = x.shape[1]

            def body(x, _, w=w, k=k):
                return (x @ w)[:, :k], None

            x, _ = jax.lax.scan(body, x, None, length=shape.steps)
            outs.append(x)
        return outs

    f = jax.jit(chain)
    run = lambda: jax.block_until_ready(f(ops))  # noqa: E731
    run()  # compile + warm up
    return run


def gemm_chain_torch(shape: Shape, seed: int, device: str) -> Callable[[], object]:
    """The same chain of matmuls in eager PyTorch (``torch.mm``), warmed up."""
    import torch

    dev = torch.device(device)
    ops = [(torch.from_numpy(x).to(dev), torch.from_numpy(w).to(dev)) for x, w in gemm_operands(shape, seed)]

    def chain():
        with torch.inference_mode():
            for x, w in ops:
                k = x.shape[1]
                for _ in range(shape.steps):
                    x = torch.mm(x, w)[:, :k]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    chain()  # warm up
    return chain


PEAK_GEMM_CPU = (1024, 512, 1024)  # M, K, N: at the peak of 2 cores here (~130 ms per chain)
PEAK_GEMM_GPU = (8192, 8192, 8192)
PEAK_GEMM_CHAIN = 8  # dependent matmuls per timed repetition


def peak_gemm_operands(m: int, k: int, n: int, seed: int):
    """``x [m, k]`` and ``w [k, n]`` (n >= k) for a norm-preserving chain, as in the floor."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, _gemm_weights(k, n, seed + 1)


def measure_peak_gemm_jax(mkn, reps: int, seed: int) -> list[float]:
    """Seconds for ``PEAK_GEMM_CHAIN`` dependent ``[M, K] x [K, N]`` matmuls in jitted JAX:
    the machine's attainable matmul rate, for bounds no LSTM at these FLOPs can beat."""
    import jax
    import jax.numpy as jnp

    x, w = (jnp.asarray(a) for a in peak_gemm_operands(*mkn, seed))
    k = mkn[1]

    def body(x, _):
        return (x @ w)[:, :k], None

    f = jax.jit(lambda x: jax.lax.scan(body, x, None, length=PEAK_GEMM_CHAIN)[0])
    jax.block_until_ready(f(x))
    return time_reps(lambda: jax.block_until_ready(f(x)), reps)


def measure_peak_gemm_torch(mkn, reps: int, seed: int, device: str) -> list[float]:
    """The same chain in eager PyTorch (``torch.mm``)."""
    import torch

    dev = torch.device(device)
    x0, w = (torch.from_numpy(a).to(dev) for a in peak_gemm_operands(*mkn, seed))
    k = mkn[1]

    def chain():
        with torch.inference_mode():
            x = x0
            for _ in range(PEAK_GEMM_CHAIN):
                x = torch.mm(x, w)[:, :k]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    chain()
    return time_reps(chain, reps)


def torch_threads(want: Optional[int] = None) -> dict:
    """Sets torch's intra-op threads (default ``os.cpu_count()``) and reports what it got."""
    import torch

    want = want or os.cpu_count() or 1
    torch.set_num_threads(want)
    return {"requested": want, "torch_num_threads": torch.get_num_threads(),
            "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
