"""Smoke test of the benchmark harness (bench/run.py): it runs, every peer ran, the results
are complete and self-consistent. No timing value is asserted -- only that times are
positive and finite, and that the ratios are the ratios of the reported medians.

Needs torch and flax (``pip install -e '.[bench]'``); without them the test is skipped,
unless ``LSTM_JAX_REQUIRE_TORCH=1`` (set in CI), where it fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
PEER_MODULES = ("torch", "flax")
COMPARED = ("lstm_jax_fused", "lstm_jax_scan", "torch", "flax")


def _require_peers():
    missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    reason = f"bench peers not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    flag = os.environ.get("LSTM_JAX_REQUIRE_TORCH", "").strip().lower()
    if flag in ("1", "true", "yes"):
        pytest.fail(f"{reason}; LSTM_JAX_REQUIRE_TORCH={flag} requires them")
    pytest.skip(reason)


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    _require_peers()
    out = tmp_path_factory.mktemp("bench_results")
    # One torch thread: the harness is what is tested here, and on a loaded CI runner
    # torch's OpenMP barriers with 2 threads can make the run many times slower.
    cmd = [sys.executable, str(RUN), "--quick", "--out", str(out), "--torch-threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    jsons = sorted(out.glob("*.json"))
    assert len(jsons) == 1, f"expected one JSON in {out}, got {[p.name for p in out.iterdir()]}"
    report = json.loads(jsons[0].read_text())
    return report, jsons[0], proc.stdout


def test_every_peer_ran_in_every_quick_config(quick_run):
    report, _, _ = quick_run
    configs = report["configs"]
    assert configs, "no configurations in the report"
    for name, c in configs.items():
        for impl in COMPARED:
            e = c["results"].get(impl)
            assert e is not None, f"{name}: no entry for {impl}"
            assert e["status"] == "ok", f"{name}/{impl}: {e}"
            for phase in ("train", "infer"):
                st = e[phase]
                assert st["n"] >= 1
                for key in ("median_s", "q1_s", "q3_s", "min_s", "max_s", "gflops", "frac_of_floor"):
                    assert _positive_finite(st[key]), f"{name}/{impl}/{phase}/{key} = {st[key]!r}"
                assert st["min_s"] <= st["q1_s"] <= st["median_s"] <= st["q3_s"] <= st["max_s"]
                assert _positive_finite(e[f"{phase}_first_result_s"])
                comp = e[f"{phase}_compile"]
                if impl == "torch":
                    assert comp is None, f"{name}/torch/{phase}: eager torch compiles nothing: {comp}"
                else:
                    # JAX's own durations of the first call: one XLA compilation of the step,
                    # its parts summing to the total, all inside the time to the first result.
                    assert comp["xla_compilations"] >= 1, f"{name}/{impl}/{phase}: {comp}"
                    parts = [comp[k] for k in ("trace_s", "lower_s", "xla_s")]
                    assert all(_positive_finite(p) for p in parts), f"{name}/{impl}/{phase}: {comp}"
                    assert math.isclose(comp["total_s"], sum(parts), rel_tol=1e-9)
                    assert comp["total_s"] <= e[f"{phase}_first_result_s"]
            assert math.isfinite(e["first_loss"])
        assert all(_positive_finite(v) for v in c["flops"].values())
        # The floor's chains were timed in both phases' rounds, min(steps, 2 * rounds) calls each.
        chain_calls = 2 * min(c["timed_steps"], 2 * report["method"]["rounds"])
        for lib in ("jax", "torch"):
            assert _positive_finite(c["gemm"][lib]["gflops"]), f"{name}: GEMM {lib}: {c['gemm'][lib]}"
            assert c["gemm"][lib]["n"] == chain_calls, f"{name}: GEMM {lib}: {c['gemm'][lib]}"
        assert all(_positive_finite(c["floor"][k]) for k in ("gflops", "forward_s", "train_s"))


@pytest.mark.parametrize("impl", ["jax_cudnn", "lstm_jax_pallas"])
def test_gpu_only_impls_are_skipped_on_cpu_and_run_on_gpu(quick_run, impl):
    report, _, _ = quick_run
    for name, c in report["configs"].items():
        e = c["results"][impl]
        if report["platform"] == "cpu":
            assert e["status"] == "skipped" and "GPU only" in e["reason"], f"{name}: {e}"
        else:
            assert e["status"] == "ok", f"{name}: {e}"


def test_bf16_subject_runs_where_there_are_bfloat16_matmul_units(quick_run):
    """lstm_jax_bf16 is timed on a GPU/TPU and on a CPU with AMX-BF16/AVX512-BF16, skipped on
    other CPUs; where it ran, its first loss is within bfloat16's tolerance of float32's."""
    report, _, _ = quick_run
    run = _load_bench_module("run")
    has_units = report["platform"] != "cpu" or bool(run.cpu_bf16_matmul_flags())
    assert report["machine"]["cpu_bf16_matmul"] == run.cpu_bf16_matmul_flags()
    for name, c in report["configs"].items():
        e = c["results"]["lstm_jax_bf16"]
        if not has_units:
            assert e["status"] == "skipped" and "AMX-BF16" in e["reason"], f"{name}: {e}"
            continue
        assert e["status"] == "ok", f"{name}: {e}"
        assert all(_positive_finite(e[phase]["median_s"]) for phase in ("train", "infer"))
        assert c["first_loss_check"]["bf16"]["ok"], f"{name}: {c['first_loss_check']}"


def test_cpu_bf16_matmul_flags_reads_the_flags_line():
    run = _load_bench_module("run")
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n"
    assert run.cpu_bf16_matmul_flags(amx) == ["amx_bf16", "avx512_bf16"]
    zen4 = "flags : fpu avx512f avx512_bf16 avx512_vnni\n"
    assert run.cpu_bf16_matmul_flags(zen4) == ["avx512_bf16"]
    # Zen 1 (the EPYC of bench/results): AVX2 only. "bf16" as part of another word is no flag.
    assert run.cpu_bf16_matmul_flags("flags : fpu avx2 fma not_avx512_bf16x\n") == []
    assert run.cpu_bf16_matmul_flags("model name : ARM\n") == []


def test_ratios_are_ratios_of_the_reported_medians(quick_run):
    report, _, _ = quick_run
    for name, c in report["configs"].items():
        res = c["results"]
        for phase in ("train", "infer"):
            r = c["ratios"][phase]
            for key in ("lstm_jax_fused/torch", "lstm_jax_fused/flax", "lstm_jax_scan/torch",
                        "lstm_jax_scan/flax", "lstm_jax_scan/lstm_jax_fused"):
                a, b = key.split("/")
                want = res[a][phase]["median_s"] / res[b][phase]["median_s"]
                assert math.isclose(r[key], want, rel_tol=1e-9), f"{name}/{phase}/{key}"


def test_same_weights_same_first_loss(quick_run):
    """lstm_jax (fused, scan) and torch start from the same weights and data."""
    report, _, _ = quick_run
    for name, c in report["configs"].items():
        chk = c["first_loss_check"]
        assert chk is not None and set(chk["compared"]) == {"lstm_jax_scan", "torch"}
        assert chk["ok"], f"{name}: first losses differ: {chk}"


def test_testset_inference_ran(quick_run):
    report, _, _ = quick_run
    ts = report["testset"]
    assert ts["sequences"] > 0 and ts["batch"] > 0
    for impl in ("lstm_jax_fused", "torch"):
        e = ts["results"][impl]
        assert e["status"] == "ok", e
        assert _positive_finite(e["pass"]["median_s"]) and _positive_finite(e["sequences_per_s"])
        assert _positive_finite(e["first_result_s"])
    comp = ts["results"]["lstm_jax_fused"]["compile"]
    assert comp["xla_compilations"] >= 1 and 0 < comp["total_s"] <= ts["results"]["lstm_jax_fused"]["first_result_s"]
    assert ts["results"]["torch"]["compile"] is None
    assert _positive_finite(ts["ratios"]["lstm_jax_fused/torch"])


def test_metadata_and_outputs(quick_run):
    report, json_path, stdout = quick_run
    assert report["quick"] is True and report["preliminary"] is True
    assert report["device"] and json_path.name == f"{report['device']}-quick.json"
    m = report["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1
    for pkg in ("jax", "jaxlib", "optax", "flax", "torch", "numpy", "python"):
        assert report["versions"][pkg], f"version of {pkg} missing"
    assert report["date"]
    assert report["torch"]["torch_num_threads"] == 1  # what the test asked for, recorded
    md = json_path.with_suffix(".md")
    assert md.is_file()
    text = md.read_text()
    for name in report["configs"]:
        assert f"## {name}:" in text
    assert "| lstm_jax_fused |" in text and "Ratios" in text
    assert "| lstm_jax_fused |" in stdout  # the table is printed too
    # The host allocator every implementation ran under (default unless --retain-freed-memory).
    assert report["allocator"] == "default"
    assert "host allocator (the whole process, every implementation): default" in text


def test_peak_gemm_and_targets_are_reported(quick_run):
    report, json_path, _ = quick_run
    pk = report["peak_gemm"]
    rates = [pk[lib]["gflops"] for lib in ("jax", "torch")]
    assert all(_positive_finite(r) for r in rates)
    assert pk["gflops"] == max(rates)
    # The peak chain is timed at its fastest repetition: its rate follows from min_s.
    m, k, n = pk["mkn"]
    for lib in ("jax", "torch"):
        assert math.isclose(pk[lib]["gflops"], 2 * m * k * n * pk["chain"] / pk[lib]["min_s"] / 1e9, rel_tol=1e-9)
    names = [row["target"] for row in report["targets"]]
    assert any("tutorial training step, fused / torch" in t for t in names)
    assert "## The issue's targets" in json_path.with_suffix(".md").read_text()


def _load_bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_for_test", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def _config(train_flops, medians, ratios, layers=3, steps=28, first=None, compile_s=None):
    results = {impl: {"train": {"median_s": s}} for impl, s in medians.items()}
    if first is not None:
        results["lstm_jax_fused"]["train_first_result_s"] = first
    if compile_s is not None:
        results["lstm_jax_fused"]["train_compile"] = {"total_s": compile_s}
    return {"shape": {"batch": 128, "steps": steps, "inputs": 28, "hidden": 256, "layers": layers},
            "flops": {"train": train_flops}, "results": results, "ratios": {"train": ratios}}


def test_interleaved_spreads_each_names_steps_over_the_rounds():
    run = _load_bench_module("run")
    calls = []
    fns = {n: (lambda k, n=n: calls.append((n, k))) for n in ("a", "b", "chain")}
    times = run.interleaved(fns, {"a": 7, "b": 7, "chain": 4}, 3, {})
    assert {n: len(t) for n, t in times.items()} == {"a": 7, "b": 7, "chain": 4}
    # Rounds of blocks (a: 3, 2, 2; chain: 2, 1, 1), the first name rotating: a b chain | b chain a | chain a b.
    names = [n for n, _ in calls]
    assert names == ["a"] * 3 + ["b"] * 3 + ["chain"] * 2 + ["b"] * 2 + ["chain"] + ["a"] * 2 + ["chain"] + ["a"] * 2 + ["b"] * 2
    assert [k for n, k in calls if n == "chain"] == [1, 2, 3, 4]
    # An int gives every name the same steps, as before; a failing name is dropped and recorded.
    errors = {}
    fail = lambda k: 1 / 0  # noqa: E731
    times = run.interleaved({"a": fns["a"], "bad": fail}, 5, 5, errors)
    assert list(times) == ["a"] and len(times["a"]) == 5 and "ZeroDivisionError" in errors["bad"]


def test_targets_bounds_follow_from_the_peak_rate():
    run = _load_bench_module("run")
    # 60 GFLOP at a peak of 60 GFLOP/s: 1 s of pure matmul, whatever the implementation.
    tut = _config(60e9, {"lstm_jax_fused": 1.5, "torch": 2.0, "flax": 3.0},
                  {"lstm_jax_fused/torch": 0.75, "lstm_jax_fused/flax": 0.5}, first=2.5)
    seq = lambda t, first, step: _config(1e9, {"lstm_jax_fused": step}, {}, layers=1, steps=t, first=first)  # noqa: E731
    report = {"platform": "cpu", "quick": False, "testset": None, "peak_gemm": {"gflops": 60.0},
              "configs": {"tutorial": tut, "seq16": seq(16, 1.1, 0.1), "seq256": seq(256, 3.0, 1.0)}}
    rows = {r["target"]: r for r in run.targets(report)}
    torch_row = rows["tutorial training step, fused / torch"]
    assert torch_row["met"] is True and math.isclose(torch_row["bound"], 1.0 / 2.0)
    flax_row = rows["tutorial training step, fused / Flax"]
    assert flax_row["met"] is True and math.isclose(flax_row["bound"], 1.0 / 3.0)
    assert rows["tutorial time to the first training step (s)"]["met"] is False  # 2.5 s > 2 s
    # A report without measured compile times: estimated as first step - median step.
    compile_tut = rows["tutorial compile time: first training step − median step (s)"]
    assert math.isclose(compile_tut["measured"], 1.0) and compile_tut["met"] is True  # 2.5 s - 1.5 s
    assert rows["10,000-sequence test-set inference, fused / torch"]["met"] is None  # not measured
    # Compile estimates 1.0 s (T=16) and 2.0 s (T=256): spread 2 > 1.5, not independent of T.
    compile_row = next(r for t, r in rows.items() if t.startswith("compile time"))
    assert math.isclose(compile_row["measured"], 2.0) and compile_row["met"] is False
    assert "first training step − median step" in next(t for t in rows if t.startswith("compile time"))

    # Measured compile times take precedence over the estimate: 2.1 s for the tutorial (not
    # met, though first - median = 1.0 s), and 1.2 s / 1.5 s across T (spread 1.25, met).
    tut["results"]["lstm_jax_fused"]["train_compile"] = {"total_s": 2.1}
    report["configs"]["seq16"] = seq(16, 1.1, 0.1)
    report["configs"]["seq16"]["results"]["lstm_jax_fused"]["train_compile"] = {"total_s": 1.2}
    report["configs"]["seq256"] = _config(1e9, {"lstm_jax_fused": 1.0}, {}, layers=1, steps=256, first=3.0,
                                          compile_s=1.5)
    rows = {r["target"]: r for r in run.targets(report)}
    measured_tut = rows["tutorial compile time: trace + lowering + XLA compile (s)"]
    assert math.isclose(measured_tut["measured"], 2.1) and measured_tut["met"] is False
    title, compile_row = next((t, r) for t, r in rows.items() if t.startswith("compile time"))
    assert math.isclose(compile_row["measured"], 1.25) and compile_row["met"] is True
    assert "trace + lowering + XLA compile" in title and "seq256 T=256: 1.50 s" in title

    report["platform"] = "gpu"
    gpu_rows = {r["target"]: r for r in run.targets(report)}
    speedup = gpu_rows["tutorial training step, Flax / fused (speed-up)"]
    # Flax 3.0 s / fused 1.5 s = 2x, short of 5x; at best 3.0 s / 1 s of matmul = 3x.
    assert math.isclose(speedup["measured"], 2.0) and speedup["met"] is False
    assert math.isclose(speedup["bound"], 3.0)
    # The Pallas candidate's rows: not measured without its entry; then 0.5 s against torch's
    # 2.0 s (met) and 6x Flax's speed (met).
    assert gpu_rows["candidate: tutorial training step, Pallas / torch (cuDNN)"]["measured"] is None
    tut["results"]["lstm_jax_pallas"] = {"train": {"median_s": 0.5}}
    tut["ratios"]["train"]["lstm_jax_pallas/torch"] = 0.25
    gpu_rows = {r["target"]: r for r in run.targets(report)}
    cand = gpu_rows["candidate: tutorial training step, Pallas / torch (cuDNN)"]
    assert math.isclose(cand["measured"], 0.25) and cand["met"] is True and math.isclose(cand["bound"], 0.5)
    cand_flax = gpu_rows["candidate: tutorial training step, Flax / Pallas (speed-up)"]
    assert math.isclose(cand_flax["measured"], 6.0) and cand_flax["met"] is True
    assert gpu_rows["candidate: tutorial training step, Pallas / jax.experimental.rnn (cuDNN)"]["met"] is None


def test_bf16_subject_builds_and_tracks_float32():
    """The lstm_jax_bf16 subject, built on any CPU: same model, bfloat16 matmul operands."""
    _require_peers()
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import jax.numpy as jnp
        import peers
    finally:
        sys.path.remove(str(ROOT / "bench"))
    shape = peers.Shape(batch=8, steps=5, inputs=3, hidden=16, layers=2)
    data = peers.Data.make(shape, sets=2, seed=0)
    weights = peers.init_reference_weights(shape, 0)
    f32 = peers.make_lstm_jax(shape, data, weights, "fused")
    bf16 = peers.make_lstm_jax(shape, data, weights, "fused", matmul_dtype=jnp.bfloat16, name="lstm_jax_bf16")
    assert bf16.name == "lstm_jax_bf16"
    for impl in (f32, bf16):
        assert _positive_finite(impl.setup_train())
        impl.train_step(1)
    run = _load_bench_module("run")
    # Close (bfloat16 keeps 8 significant bits) but not identical: the operands really were rounded.
    assert 0 < abs(bf16.first_loss - f32.first_loss) <= run.BF16_LOSS_TOL


def test_unknown_config_is_rejected(tmp_path):
    proc = subprocess.run([sys.executable, str(RUN), "--configs", "nope", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config" in proc.stderr
    assert not list(tmp_path.iterdir())


ABLATIONS = ROOT / "bench" / "ablations.py"
GEMM_THREADS = ROOT / "bench" / "gemm_threads.py"
PROJECTION = ROOT / "bench" / "projection.py"
WEIGHT_GRADS = ROOT / "bench" / "weight_grads.py"


@pytest.mark.parametrize("script, args, message", [
    (ABLATIONS, ["--variants", "store,remat0"], "unknown variant 'remat0'"),
    (ABLATIONS, ["--configs", "nope"], "unknown config"),
    (GEMM_THREADS, ["--sizes", "12x"], "expected BxH pairs"),
    (GEMM_THREADS, ["--models", "nope"], "unknown config"),
    (PROJECTION, ["--shapes", "128x28x28x256"], "expected BxTxINxHxL"),
    (PROJECTION, ["--shapes", "1x1x0x1x1"], "five positive integers"),
    (PROJECTION, ["--rounds", "0"], "--rounds and --reps"),
    (PROJECTION, ["--chunks", "2,x"], "--chunks: expected comma-separated positive integers"),
    (PROJECTION, ["--chunks", "0"], "--chunks: expected comma-separated positive integers"),
    (WEIGHT_GRADS, ["--shapes", "1x2x3"], "expected BxTxINxHxL"),
    (WEIGHT_GRADS, ["--dtypes", "float16"], "--dtypes: expected a comma-separated subset"),
    (WEIGHT_GRADS, ["--steps", "0"], "--rounds and --steps"),
])
def test_bench_scripts_reject_bad_arguments(script, args, message):
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ablations_variants_agree_with_store(tmp_path):
    """The ablation script checks every variant's first loss and gradients against the first
    variant's and exits non-zero when they differ; here on coef and remat (fused and scan)."""
    out = tmp_path / "ablations.json"
    cmd = [sys.executable, str(ABLATIONS), "--configs", "hidden64", "--variants", "store,coef,remat5,scan_remat9",
           "--steps", "1", "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["configs"]["hidden64"]["variants"]
    assert set(rows) == {"store", "coef", "remat5", "scan_remat9"}
    for name, row in rows.items():
        assert row["grad_rel_err_vs_first"] < 1e-4, name
        assert _positive_finite(row["median_s"]) and _positive_finite(row["xla_temp_bytes"]), name
    # Keeping 1 state in 5 (or 9) instead of every step's activations must shrink the scratch memory.
    assert rows["remat5"]["xla_temp_bytes"] < rows["store"]["xla_temp_bytes"]


def test_gemm_threads_probe_runs(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, str(GEMM_THREADS), "--sizes", "2x3,5x4", "--steps", "3", "--reps", "1",
           "--models", "", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["gemm"]
    assert [(r["batch"], r["hidden"], r["macs"]) for r in rows] == [(2, 3, 2 * 3 * 12), (5, 4, 5 * 4 * 16)]
    assert all(_positive_finite(r["jax_s_per_step"]) for r in rows)


def test_projection_study_runs_every_variant_to_the_same_logits(tmp_path):
    """bench/projection.py times the inference forward with the projection before the loop, in
    it, K steps at a time, and as the library chooses, with outputs over the layers' inputs or
    into new buffers; all compute the same logits, the second way needs less of XLA's scratch
    memory, and the library's choice it reports is the rule's."""
    from lstm_jax import _stack

    out = tmp_path / "p.json"
    cmd = [sys.executable, str(PROJECTION), "--shapes", "3x5x1x16x2,2x3x6x5x1", "--chunks", "1,2", "--rounds", "1",
           "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert [r["shape"]["inputs"] for r in report["shapes"]] == [1, 6]
    assert report["chunks"] == [1, 2] and report["matmul_dtype"] == "float32"
    for row in report["shapes"]:
        assert set(row["median_s"]) == set(row["xla_temp_bytes"]) == {"hoisted", "in_loop", "chunk1", "chunk2",
                                                                     "library", "new_buffers"}
        assert all(_positive_finite(t) for t in row["median_s"].values())
        assert row["max_abs_logit_diff"] < 1e-5
        shape = row["shape"]
        temp = row["xla_temp_bytes"]
        if shape["hidden"] == 16:  # its second layer (16 inputs, B=3) is projected before its loop
            assert row["library"][1] == "hoisted" and temp["library"] < temp["new_buffers"]
        sizes = [shape["inputs"]] + [shape["hidden"]] * (shape["layers"] - 1)
        want = []
        for i in sizes:
            p = _stack._cpu_projection(shape["batch"], i, shape["hidden"], shape["steps"], np.float32, None)
            want.append("in_loop" if p.project_in_loop else "hoisted" if p.project_chunk is None
                        else f"chunk{p.project_chunk}")
        assert row["library"] == want


def test_weight_grads_study_times_both_ways_to_the_same_gradients(tmp_path):
    """bench/weight_grads.py times the training step with transposed-LHS and row-major weight
    gradients, in float32 and bfloat16; both ways give the same gradients, and the library's
    choice it reports is the rule's."""
    import jax.numpy as jnp

    from lstm_jax import _stack

    out = tmp_path / "w.json"
    cmd = [sys.executable, str(WEIGHT_GRADS), "--shapes", "3x5x2x4x2,2x1x6x5x1", "--rounds", "1", "--steps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["results"]
    assert [(r["shape"]["steps"], r["dtype"]) for r in rows] == [(5, "float32"), (5, "bfloat16"),
                                                                 (1, "float32"), (1, "bfloat16")]
    for row in rows:
        assert set(row["median_s"]) == {"transposed_lhs", "row_major"}
        assert all(_positive_finite(t) for t in row["median_s"].values())
        assert row["max_rel_grad_diff"] < 1e-4
        matmul_dtype = None if row["dtype"] == "float32" else jnp.bfloat16
        assert row["library_row_major"] == _stack._cpu_row_major_weight_grads(matmul_dtype)


PERSISTENT = ROOT / "bench" / "persistent.py"


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_persistent_study_quick_run(tmp_path, matmul_dtype):
    """bench/persistent.py --quick: every loop ran at every size, and the fractions are the
    ratios of the reported per-step times (no timing value is asserted)."""
    out = tmp_path / "persistent"
    cmd = [sys.executable, str(PERSISTENT), "--quick", "--matmul-dtype", matmul_dtype, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["matmul_dtype"] == (None if matmul_dtype == "float32" else matmul_dtype)
    assert [r["config"] for r in report["results"]] == ["tiny", "tiny_h1"]
    on_gpu = report["platform"] == "gpu"
    for r in report["results"]:
        always = {"empty", "dot", "lstm_jax", "batched_gemm"}
        gpu_only = {"cudnn", "pallas", "pallas_hold"}
        assert always <= set(r["per_step_s"]), r["per_step_s"]
        if on_gpu:  # a GPU candidate either ran or says why not (Triton needs H >= 16)
            assert set(r["per_step_s"]) | set(r["errors"]) == always | gpu_only, r
        else:
            assert set(r["per_step_s"]) == always and r["errors"] == {}, r
        assert all(_positive_finite(s) for s in r["per_step_s"].values())
        for name, s in r["per_step_s"].items():
            assert math.isclose(r["stats"][name]["median_s"] / r["steps"], s, rel_tol=1e-12)
            assert math.isclose(r["fraction_of_lstm_step"][name], s / r["per_step_s"]["lstm_jax"], rel_tol=1e-12)
        assert r["batch_run"] >= r["batch"]
    md = out.with_suffix(".md").read_text()
    assert "| tiny |" in md and "| tiny_h1 |" in md


def _lstm_via_ref(rnn):
    """``rnn.lstm``'s signature, computed by ``rnn.lstm_ref`` (which runs anywhere)."""
    import inspect

    signature = inspect.signature(rnn.lstm)

    def lstm(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(a["weights"], a["input_size"], a["hidden_size"],
                                                          a["num_layers"], a["bidirectional"])
        return rnn.lstm_ref(a["x"], a["h_0"], a["c_0"], w_ih, w_hh, b_ih, b_hh, a["seq_lengths"], a["input_size"],
                            a["hidden_size"], a["num_layers"], a["dropout"], a["bidirectional"])

    return lstm


def test_persistent_study_gpu_loops_run_here(monkeypatch):
    """The GPU-only loops of the study, run on this machine: cuDNN through its reference and
    the Pallas kernels in the interpreter, so that a GPU session finds the plumbing working."""
    from jax.experimental import rnn

    monkeypatch.setattr(rnn, "lstm", _lstm_via_ref(rnn))
    persistent = _load_bench_module("persistent")
    for block in (None, 16, 64):  # 64: capped at H, one block
        loops = persistent.make_loops(batch=16, steps=3, hidden=32, matmul_dtype=None, on_gpu=True,
                                      pallas_interpret=True, block=block)
        assert set(loops) == {"empty", "dot", "lstm_jax", "batched_gemm", "cudnn", "pallas", "pallas_hold"}
        for fn in loops.values():
            fn()


def test_persistent_study_cudnn_call_is_well_formed(monkeypatch):
    """The cuDNN loop only runs on a GPU (even its shape inference needs jaxlib's CUDA
    plugin). Here its call goes to ``jax.experimental.rnn.lstm_ref``, the pure-JAX reference
    with the same semantics, after binding to ``rnn.lstm``'s signature, so that a GPU session
    does not find a malformed call on its lent machine."""
    import jax
    from jax.experimental import rnn

    monkeypatch.setattr(rnn, "lstm", _lstm_via_ref(rnn))
    fn, args = _load_bench_module("persistent").cudnn_forward(batch=3, steps=5, hidden=4)
    out = jax.block_until_ready(fn(*args))
    assert out.shape == (3, 5, 4) and out.dtype == np.float32 and np.all(np.isfinite(out))


def test_persistent_study_times_the_librarys_loop():
    """The loop the study times (``_layer._recurrence`` over projected inputs) is what
    ``lstm_jax.lstm`` computes: same outputs as the public function for one layer."""
    import jax
    import jax.numpy as jnp

    import lstm_jax as lj
    from lstm_jax import _layer

    batch, steps, inputs, hidden = 3, 6, 2, 5
    params = lj.init_lstm(jax.random.key(0), inputs, hidden, 1)
    x = jax.random.normal(jax.random.key(1), (batch, steps, inputs))
    want, _ = lj.lstm(params, x, forget_bias=0.0)
    p = params[0]
    zx = jnp.einsum("tbi,ig->tbg", jnp.swapaxes(x, 0, 1), p.w_ih)
    zeros = jnp.zeros((batch, hidden))
    _, ys = _layer._recurrence(zx, p.b, p.w_hh, zeros, zeros, None, None, 1, False)
    np.testing.assert_allclose(np.swapaxes(np.asarray(ys), 0, 1), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps,batch,hidden,batch_tile,hold,bf16,block", [
    (1, 16, 16, 16, False, False, None),
    (5, 20, 16, 16, False, False, None),  # batch padded to 32: two programs, the last half empty
    (4, 32, 32, 16, True, False, 16),  # 2 x 2 column blocks per gate
    (3, 16, 16, 16, True, True, None),
    (2, 40, 32, 32, False, True, None),
])
def test_pallas_lstm_equals_the_librarys_loop(steps, batch, hidden, batch_tile, hold, bf16, block):
    """bench/pallas_lstm.py (in Pallas's interpreter) computes what ``_layer._recurrence``
    computes, with float32 or bfloat16 matmul operands."""
    import jax
    import jax.numpy as jnp

    from lstm_jax import _layer

    pallas_lstm = _load_bench_module("pallas_lstm")
    rng = np.random.default_rng(steps * 1000 + batch)
    zx = jnp.asarray(rng.standard_normal((steps, batch, 4 * hidden), dtype=np.float32))
    b = jnp.asarray(0.1 * rng.standard_normal(4 * hidden, dtype=np.float32))
    w_hh = jnp.asarray(rng.standard_normal((hidden, 4 * hidden), dtype=np.float32) / np.sqrt(hidden))
    h0, c0 = (jnp.asarray(rng.standard_normal((batch, hidden), dtype=np.float32)) for _ in range(2))
    mm = jnp.bfloat16 if bf16 else None
    got = jax.jit(lambda *a: pallas_lstm.lstm_forward(*a, batch_tile=batch_tile, hold_weights=hold, matmul_dtype=mm,
                                                      block=block, interpret=True))(zx, b, w_hh, h0, c0)
    (h_t, c_t), ys = _layer._recurrence(zx, b, w_hh if mm is None else w_hh.astype(mm), h0, c0, None, None, 1, False)
    for g, want in zip(got, (ys, h_t, c_t)):
        assert g.shape == want.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,batch,inputs,hidden,block,batch_tile,hold,bf16,lengths,dropout,remat", [
    (1, 16, 3, 16, 16, 16, False, False, False, False, None),
    (6, 20, 5, 16, 16, 16, False, False, True, False, None),  # batch padded to 32: the last program mostly padding
    (4, 32, 1, 32, 16, 16, True, False, False, True, None),  # 2 x 2 column blocks per gate
    (5, 24, 2, 16, 16, 16, False, False, True, True, None),
    (3, 16, 4, 16, 16, 16, True, True, False, False, None),
    (2, 40, 2, 32, 32, 32, False, True, True, True, None),
    (3, 16, 3, 64, 16, 16, False, False, True, True, None),  # 4 x 4 blocks
    # remat_chunk: T a multiple of the chunk; not (padded with invalid steps); lengths and
    # dropout across chunks; a chunk of 1 and one longer than T; bfloat16.
    (6, 16, 3, 16, 16, 16, False, False, False, False, 2),
    (7, 20, 2, 32, 16, 16, True, False, True, True, 3),
    (5, 16, 2, 16, 16, 16, False, False, False, True, 1),
    (3, 16, 2, 16, 16, 16, False, False, True, False, 4),
    (5, 16, 3, 16, 16, 16, False, True, True, True, 2),
])
def test_pallas_layer_values_and_gradients_equal_the_librarys(steps, batch, inputs, hidden, block, batch_tile, hold,
                                                              bf16, lengths, dropout, remat):
    """bench/pallas_lstm.py's layer (forward and backward kernels, in Pallas's interpreter)
    against the library's autodiff reference ``layer_scan``: outputs, and the gradients of
    every argument (the recurrent dropout mask's too) under cotangents on all three outputs,
    with lengths from 0 to T, without and with ``remat_chunk``. With bfloat16 operands,
    against the library's ``layer_fused`` with the same ``matmul_dtype``: the same roundings
    (autodiff through ``layer_scan`` rounds its backward's operands elsewhere)."""
    import jax
    import jax.numpy as jnp

    from lstm_jax import _layer

    pallas_lstm = _load_bench_module("pallas_lstm")
    rng = np.random.default_rng(steps * 1000 + batch + inputs)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    args = (0.5 * normal(inputs, 4 * hidden), normal(hidden, 4 * hidden) / np.sqrt(hidden), 0.1 * normal(4 * hidden),
            normal(steps, batch, inputs), normal(batch, hidden), normal(batch, hidden))
    cot = (normal(steps, batch, hidden), normal(batch, hidden), normal(batch, hidden))
    mm = jnp.bfloat16 if bf16 else None
    valid = None
    if lengths:
        seq_len = rng.integers(0, steps + 1, batch)
        seq_len[:2] = (0, steps)
        valid = jnp.asarray(np.arange(steps)[:, None] < seq_len[None, :])
    names = ["w_ih", "w_hh", "b", "xs", "h0", "c0"]
    if dropout:
        args += (jnp.asarray((rng.random((batch, hidden)) > 0.3) / 0.7, jnp.float32),)
        names.append("rmask")

    def with_loss(layer):
        def run(*a):
            return layer(*a[:6], valid, *a[6:])

        def loss(*a):
            return sum(jnp.sum(out * c) for out, c in zip(run(*a), cot))
        return jax.jit(lambda *a: (run(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))

    got, got_grads = with_loss(lambda *a: pallas_lstm.lstm_layer(*a, batch_tile=batch_tile, hold_weights=hold,
                                                                 matmul_dtype=mm, block=block, remat_chunk=remat,
                                                                 interpret=True))(*args)
    reference = _layer.layer_fused if bf16 else _layer.layer_scan
    want, want_grads = with_loss(lambda *a: reference(*a, matmul_dtype=mm))(*args)
    def close(g, w, name):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, name
        assert np.abs(w).max() > 0, name  # a value that could be wrong
        # bfloat16: where the two round an operand to different sides (their float32 sums
        # differ in the last bit), the results differ by about bfloat16's epsilon (2**-8) of
        # the array's scale.
        tol = dict(rtol=0, atol=2**-8 * np.abs(w).max()) if bf16 else dict(rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, w, err_msg=name, **tol)

    for g, w, name in zip(got, want, ("ys", "h_T", "c_T")):
        close(g, w, name)
    assert len(got_grads) == len(names)
    for g, w, name in zip(got_grads, want_grads, names):
        close(g, w, f"d {name}")


def test_pallas_subject_trains_as_the_fused_layer():
    """The GPU-only lstm_jax_pallas subject of bench/run.py, built here in Pallas's
    interpreter: the same first loss as lstm_jax's fused layer, and the same parameters after
    two Adam steps."""
    _require_peers()
    import jax

    peers = _load_bench_module("peers")
    shape = peers.Shape(batch=8, steps=5, inputs=3, hidden=16, layers=2)
    data = peers.Data.make(shape, sets=2, seed=0)
    weights = peers.init_reference_weights(shape, 0)
    fused = peers.make_lstm_jax(shape, data, weights, "fused")
    sys.path.insert(0, str(ROOT / "bench"))  # peers imports pallas_lstm by name, as bench/run.py runs it
    try:
        pallas = peers.make_lstm_jax_pallas(shape, data, weights, interpret=True)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert pallas.name == "lstm_jax_pallas"
    for impl in (fused, pallas):
        assert _positive_finite(impl.setup_train())
        impl.train_step(1)
    assert abs(pallas.first_loss - fused.first_loss) <= 1e-6
    flat = lambda impl: jax.tree.leaves(impl._state[0])  # noqa: E731
    for a, b in zip(flat(pallas), flat(fused), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_pallas_dots_follow_the_default_matmul_precision():
    """float32 operands: IEEE float32 dots under "highest" (bench/run.py's default), Triton's
    TF32 default otherwise, as XLA's dots on a GPU; bfloat16 operands: no precision asked."""
    import jax
    import jax.numpy as jnp

    pallas_lstm = _load_bench_module("pallas_lstm")
    config = lambda mm: pallas_lstm._Config(2, 16, 16, 16, False, mm, 4, True)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        full = config(jnp.float32)
        assert full.precision == jax.lax.Precision.HIGHEST
        assert config(jnp.bfloat16).precision is None
    with jax.default_matmul_precision("tensorfloat32"):
        tf32 = config(jnp.float32)
        assert tf32.precision is None
    assert full != tf32  # separate entries in the kernel caches


def test_pallas_layer_rejects_bad_input():
    import jax.numpy as jnp

    pallas_lstm = _load_bench_module("pallas_lstm")
    w_ih, w_hh, b = jnp.zeros((3, 64)), jnp.zeros((16, 64)), jnp.zeros(64)
    with pytest.raises(ValueError, match="valid: expected bool"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, jnp.zeros((2, 16, 3)), jnp.zeros((16, 16)), jnp.zeros((16, 16)),
                               jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="rmask"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, jnp.zeros((2, 16, 3)), jnp.zeros((16, 16)), jnp.zeros((16, 16)),
                               None, jnp.ones((16, 8)))
    xs, h = jnp.zeros((2, 16, 3)), jnp.zeros((16, 16))
    with pytest.raises(ValueError, match="w_ih"):
        pallas_lstm.lstm_layer(jnp.zeros((4, 64)), w_hh, b, xs, h, h)
    with pytest.raises(ValueError, match="h0, c0"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, xs, jnp.zeros((8, 16)), h)
    with pytest.raises(TypeError, match="xs: expected float32"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, xs.astype(jnp.bfloat16), h, h)
    with pytest.raises(ValueError, match="batch_tile"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, xs, h, h, batch_tile=8)
    with pytest.raises(ValueError, match="block"):
        pallas_lstm.lstm_layer(w_ih, w_hh, b, xs, h, h, block=32)  # more than H
    for chunk in (0, 2.0, True):
        with pytest.raises(ValueError, match="remat_chunk: expected None or a positive int"):
            pallas_lstm.lstm_layer(w_ih, w_hh, b, xs, h, h, remat_chunk=chunk)


def test_pallas_lstm_lowers_to_triton_for_cuda():
    """The kernel passes Pallas's Triton lowering for a CUDA target (cross-lowered here, no
    GPU needed): what Triton supports (shapes, ops) is checked before a GPU session runs it."""
    import jax
    import jax.numpy as jnp
    from jax import export

    pallas_lstm = _load_bench_module("pallas_lstm")
    def cross_lower(fn, *args):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        return exported.mlir_module().count("__gpu$xla.gpu.triton")

    args = (jnp.zeros((3, 32, 128)), jnp.zeros(128), jnp.zeros((32, 128)), jnp.zeros((32, 32)), jnp.zeros((32, 32)))
    for hold in (False, True):
        assert cross_lower(lambda *a, hold=hold: pallas_lstm.lstm_forward(*a, hold_weights=hold,
                                                                          matmul_dtype=jnp.bfloat16), *args) == 1
    # Training: the forward kernel saving residuals and the backward kernel, float32 (IEEE dots)
    # and bfloat16 operands.
    layer_args = (jnp.zeros((8, 128)), jnp.zeros((32, 128)), jnp.zeros(128), jnp.zeros((3, 32, 8)),
                  jnp.zeros((32, 32)), jnp.zeros((32, 32)))
    valid, rmask = jnp.ones((3, 32), bool), jnp.ones((32, 32))
    # remat_chunk: the forward kernel in the forward's loop over chunks, the forward kernel
    # saving residuals and the backward kernel in the backward's (three in the module).
    for hold, mm, extra, remat, calls in ((False, None, (), None, 2), (True, jnp.bfloat16, (), None, 2),
                                          (False, None, (valid, rmask), None, 2), (False, None, (valid, rmask), 2, 3)):
        def loss(*a, hold=hold, mm=mm, extra=extra, remat=remat):
            ys, h_t, c_t = pallas_lstm.lstm_layer(*a, *extra, hold_weights=hold, matmul_dtype=mm, remat_chunk=remat)
            return jnp.sum(ys) + jnp.sum(h_t) + jnp.sum(c_t)
        assert cross_lower(jax.value_and_grad(loss, argnums=tuple(range(6))), *layer_args) == calls


@pytest.mark.parametrize("hidden,batch_tile,match", [(12, 16, "hidden"), (8, 16, "hidden"), (16, 8, "batch_tile"),
                                                     (16, 24, "batch_tile")])
def test_pallas_lstm_rejects_sizes_triton_cannot_run(hidden, batch_tile, match):
    import jax.numpy as jnp

    pallas_lstm = _load_bench_module("pallas_lstm")
    with pytest.raises(ValueError, match=match):
        pallas_lstm.lstm_forward(jnp.zeros((2, 16, 4 * hidden)), jnp.zeros(4 * hidden), jnp.zeros((hidden, 4 * hidden)),
                                 jnp.zeros((16, hidden)), jnp.zeros((16, hidden)), batch_tile=batch_tile)


def test_compile_timer_counts_one_compilation_and_nothing_when_cached():
    """peers.CompileTimer sees JAX's own compile events: a new function compiles once, with
    every part's duration inside the wall time around it; a cached call reports no figure."""
    import time

    import jax
    import jax.numpy as jnp

    peers = _load_bench_module("peers")
    fn = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((8, 8))
    t0 = time.perf_counter()
    with peers.CompileTimer() as timer:
        jax.block_until_ready(fn(x))
    wall = time.perf_counter() - t0
    first = timer.result()
    assert first["xla_compilations"] == 1
    assert all(_positive_finite(first[k]) for k in ("trace_s", "lower_s", "xla_s"))
    assert first["total_s"] <= wall
    y = jax.block_until_ready(x + 1)  # an eager op compiles too: not inside the timer
    with peers.CompileTimer() as timer:
        jax.block_until_ready(fn(y))
    assert timer.result() is None
