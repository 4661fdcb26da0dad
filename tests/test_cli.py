"""scripts/train.py and scripts/evaluate.py as subprocesses: an end-to-end run on real
Fashion-MNIST, exact resume after a real SIGKILL, and every bad input (exit code 2, one
line on stderr, no traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
EVALUATE = ROOT / "scripts" / "evaluate.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD_FIELDS = ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "steps_per_sec", "wall_time")


_SHARED_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One parsed-data and JAX compilation cache for every subprocess of this module."""
    _SHARED_CACHE[:] = [tmp_path_factory.mktemp("lstm_jax_cache")]
    yield
    _SHARED_CACHE.clear()


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    cache = _SHARED_CACHE[0] if _SHARED_CACHE else tmp / "cache"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(
        JAX_PLATFORMS="cpu",
        LSTM_JAX_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TFDS_DATA_DIR=str(tmp / "tfds"),
        # One XLA thread: the CI machine has 2 cores and the tests run small models.
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run(script: Path, *args, tmp: Path, timeout: float = 600, env_extra: dict | None = None):
    env = _env(tmp)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp)


def write_idx(folder: Path, n_train: int = 300, n_test: int = 60, seed: int = 0) -> Path:
    """Four small, learnable IDX files (the class is a bright row)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 2 * labels + 4, :] = 255
        (folder / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


@pytest.fixture(scope="module")
def tmp_mod(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def idx_dir(tmp_mod) -> Path:
    return write_idx(tmp_mod / "idx")


TINY = ("--dataset", "fashion_mnist", "--layers", "1", "--hidden", "8", "--batch-size", "16", "--eval-batch-size", "64")


@pytest.fixture(scope="module")
def tiny_run(tmp_mod, idx_dir) -> Path:
    """A finished 6-step run on the small IDX files."""
    workdir = tmp_mod / "tiny"
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "3",
            "--workdir", workdir, tmp=tmp_mod)
    assert r.returncode == 0, r.stderr
    return workdir


def assert_one_line_error(r, code=2, pattern=None):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    if pattern:
        assert re.search(pattern, lines[0]), lines[0]


def _params_of(workdir: Path, which="latest"):
    import jax

    from lstm_jax._train import restore_run

    state, config, step = restore_run(workdir, which=which)
    return jax.tree.leaves(jax.device_get(state)), config, step


# ---------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------


def test_help_lists_every_flag_with_its_default(tmp_path):
    r = run(TRAIN, "--help", tmp=tmp_path)
    assert r.returncode == 0
    out = " ".join(r.stdout.split())
    for flag in ("--layers", "--hidden", "--batch-size", "--steps", "--epochs", "--val-size", "--lr", "--dropout",
                 "--variational", "--recurrent-dropout", "--forget-bias", "--clip-norm", "--seed", "--eval-every",
                 "--checkpoint-every", "--dataset", "--data-dir", "--workdir", "--resume", "--overwrite",
                 "--schedule"):
        assert flag in out, flag
    for default in ("(default: 3)", "(default: 256)", "(default: 128)", "(default: 5000)", "(default: 0.002)",
                    "(default: 1.0)", "(default: mnist)"):
        assert default in out, default
    r = run(EVALUATE, "--help", tmp=tmp_path)
    assert r.returncode == 0 and "--workdir" in r.stdout


# ---------------------------------------------------------------------------------------
# End to end on real Fashion-MNIST
# ---------------------------------------------------------------------------------------


def test_end_to_end_fashion_mnist(fashion_mnist_dir, tmp_path):
    workdir = tmp_path / "run"
    r = run(TRAIN, "--dataset", "fashion_mnist", "--data-dir", fashion_mnist_dir, "--layers", "1", "--hidden", "64",
            "--steps", "400", "--eval-every", "200", "--checkpoint-every", "200", "--lr", "3e-3",
            "--workdir", workdir, tmp=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"test accuracy \(.*(\d+) test images\): ([\d.]+)%", r.stdout)
    assert m, r.stdout[-2000:]
    assert "10000 test images" in r.stdout
    test_acc = float(m.group(2))
    print(f"end-to-end 1x64, 400 steps: test accuracy {test_acc:.2f}%")  # shown with pytest -rP
    assert test_acc > 75.0, r.stdout[-2000:]
    assert str(workdir) in r.stdout

    # metrics.jsonl: valid JSON lines with every field, one per evaluation.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [200, 400]
    for rec in records:
        for field in RECORD_FIELDS:
            assert field in rec and rec[field] is not None, field
        assert 0 <= rec["val_accuracy"] <= 1 and rec["train_loss"] > 0 and rec["steps_per_sec"] > 0
    # curves.png: a valid PNG that matplotlib can read.
    png = (workdir / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    img = matplotlib.image.imread(workdir / "curves.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # The checkpoint restores into the configured model.
    leaves, config, step = _params_of(workdir, "best")
    assert config.layers == 1 and config.hidden == 64 and step in (200, 400)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)

    # evaluate.py: same test accuracy, a confusion matrix, errors.png.
    e = run(EVALUATE, "--workdir", workdir, tmp=tmp_path)
    assert e.returncode == 0, e.stderr[-3000:]
    assert f"test accuracy: {test_acc:.2f}%" in e.stdout
    assert "confusion matrix" in e.stdout
    rows = [line for line in e.stdout.splitlines() if re.match(r"^\S+\s+(\d+\s+){10}\s*[\d.]+%$", line)]
    assert len(rows) == 10
    assert sum(int(x) for row in rows for x in row.split()[1:11]) == 10000
    assert (workdir / "errors.png").read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------------------------------
# Resume after SIGKILL
# ---------------------------------------------------------------------------------------


def _finished_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("when", ["after_checkpoint", "random"])
def test_sigkill_and_resume_gives_identical_parameters(tmp_mod, idx_dir, tmp_path, when):
    steps = 60
    common = (*TINY, "--hidden", "16", "--data-dir", idx_dir, "--steps", steps, "--eval-every", "10",
              "--checkpoint-every", "5", "--dropout", "0.5", "--seed", "3", "--log-every", "1")
    ref_dir = tmp_mod / "resume_reference"
    if not (ref_dir / "done").exists():
        r = run(TRAIN, *common, "--workdir", ref_dir, tmp=tmp_mod)
        assert r.returncode == 0, r.stderr[-3000:]
        (ref_dir / "done").write_text("")

    workdir = tmp_path / "killed"
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, str(TRAIN), *map(str, common), "--workdir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    rng = random.Random()
    deadline = time.monotonic() + 300
    try:
        if when == "after_checkpoint":
            # Kill right after the first checkpoint past step 10 is complete.
            while not any(s >= 10 for s in _finished_steps(workdir / "checkpoints")):
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
        else:
            # Kill at a random moment once training has started (possibly mid-save).
            while not _finished_steps(workdir / "checkpoints"):
                assert proc.poll() is None, "the run ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill; make it longer"
    killed_at = _finished_steps(workdir / "checkpoints")
    assert killed_at and max(killed_at) < steps

    # A partially written checkpoint (orbax's temporary directory) must be ignored.
    junk = workdir / "checkpoints" / f"{steps - 1}.orbax-checkpoint-tmp-123456"
    junk.mkdir(exist_ok=True)
    (junk / "garbage").write_bytes(b"\0" * 100)

    r = run(TRAIN, "--workdir", workdir, "--resume", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {max(killed_at)}" in r.stdout

    got, _, got_step = _params_of(workdir, "latest")
    want, _, want_step = _params_of(ref_dir, "latest")
    assert got_step == want_step == steps
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(10, steps + 1, 10))


# ---------------------------------------------------------------------------------------
# Bad input: exit code 2, exactly one line on stderr, no traceback
# ---------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--layers", "0"], r"--layers"),
    (["--hidden", "0"], r"--hidden"),
    (["--batch-size", "0"], r"--batch-size"),
    (["--steps", "0"], r"--steps"),
    (["--epochs", "-1"], r"--epochs"),
    (["--lr", "-1"], r"--lr"),
    (["--lr", "nan"], r"--lr"),
    (["--dropout", "1.5"], r"--dropout"),
    (["--recurrent-dropout", "-0.2"], r"--recurrent-dropout"),
    (["--clip-norm", "-1"], r"--clip-norm"),
    (["--eval-every", "0"], r"--eval-every"),
    (["--checkpoint-every", "0"], r"--checkpoint-every"),
    (["--val-size", "-5"], r"--val-size"),
    (["--seed", "-1"], r"--seed"),
    (["--layers", "two"], r"--layers"),
    (["--dataset", "cifar10"], r"--dataset"),
    (["--matmul-dtype", "float16"], r"--matmul-dtype"),
    (["--no-such-flag"], r"unrecognized"),
    (["--resume", "--overwrite"], r"--overwrite"),
]
#: Checked in a real subprocess; the others call the same main() in-process (faster:
#: each subprocess pays for importing JAX).
SUBPROCESS_FLAGS = {("--layers", "0"), ("--lr", "-1"), ("--dropout", "1.5"), ("--layers", "two"), ("--steps", "0")}


def _load_train_main():
    spec = importlib.util.spec_from_file_location("_train_cli_under_test", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args, pattern", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_nonsensical_flags(tmp_path, idx_dir, args, pattern, capsys):
    argv = ["--dataset", "fashion_mnist", "--data-dir", str(idx_dir), "--workdir", str(tmp_path / "w"), *args]
    if tuple(args) in SUBPROCESS_FLAGS:
        r = run(TRAIN, *argv, tmp=tmp_path)
    else:
        with pytest.raises(SystemExit) as info:
            _load_train_main()(argv)
        out, err = capsys.readouterr()
        r = subprocess.CompletedProcess(argv, info.value.code, out, err)
    assert_one_line_error(r, 2, pattern)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_batch_size_larger_than_the_training_set(tmp_path, idx_dir):
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--batch-size", "100000", "--workdir", tmp_path / "w", tmp=tmp_path)
    assert_one_line_error(r, 2, r"--batch-size")


def test_missing_data_dir(tmp_path):
    r = run(TRAIN, *TINY, "--data-dir", tmp_path / "absent", "--workdir", tmp_path / "w", tmp=tmp_path)
    assert_one_line_error(r, 2, r"does not exist")


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run(TRAIN, *TINY, "--data-dir", tmp_path / "empty", "--workdir", tmp_path / "w", tmp=tmp_path)
    assert_one_line_error(r, 2, r"empty")
    r = run(TRAIN, *TINY, "--data-dir", "", "--workdir", tmp_path / "w", tmp=tmp_path)
    assert_one_line_error(r, 2, r"--data-dir")


@pytest.mark.parametrize("damage", ["truncated", "bad_magic", "bad_label"])
def test_corrupt_idx_file(tmp_path, damage):
    folder = write_idx(tmp_path / "idx", n_train=50, n_test=20)
    if damage == "truncated":
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "bad_magic":
        path = folder / "t10k-labels-idx1-ubyte"
        path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    else:
        path = folder / "train-labels-idx1-ubyte"
        raw = bytearray(path.read_bytes())
        raw[-1] = 42
        path.write_bytes(bytes(raw))
    r = run(TRAIN, *TINY, "--data-dir", folder, "--workdir", tmp_path / "w", tmp=tmp_path)
    assert_one_line_error(r, 2)


def test_no_network_and_no_data_dir(tmp_path):
    closed = "http://127.0.0.1:9"
    r = run(TRAIN, "--dataset", "mnist", "--steps", "2", "--workdir", tmp_path / "w", tmp=tmp_path,
            env_extra={"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
                       "no_proxy": "", "NO_PROXY": ""}, timeout=120)
    assert_one_line_error(r, 2, r"--data-dir")


def test_unwritable_workdir(tmp_path, idx_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--workdir", blocker / "run", tmp=tmp_path)
    assert_one_line_error(r, 2, r"--workdir")
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--workdir", blocker, tmp=tmp_path)
    assert_one_line_error(r, 2, r"--workdir")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--workdir", ro, tmp=tmp_path)
            assert_one_line_error(r, 2, r"not writable")
        finally:
            ro.chmod(0o755)


def test_resume_without_checkpoint(tmp_path, idx_dir):
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--workdir", tmp_path / "w", "--resume", tmp=tmp_path)
    assert_one_line_error(r, 2, r"no checkpoint")
    # Only a partially written (temporary) checkpoint: still nothing to resume from.
    (tmp_path / "w" / "checkpoints" / "5.orbax-checkpoint-tmp-99").mkdir(parents=True)
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--workdir", tmp_path / "w", "--resume", tmp=tmp_path)
    assert_one_line_error(r, 2, r"no checkpoint")


@pytest.mark.parametrize("args", [["--layers", "2"], ["--hidden", "16"], ["--dataset", "mnist"],
                                  ["--forget-bias", "0"]])
def test_resume_with_incompatible_configuration(tiny_run, tmp_mod, args):
    r = run(TRAIN, "--workdir", tiny_run, "--resume", *args, tmp=tmp_mod)
    assert_one_line_error(r, 2, r"incompatible")


def test_existing_checkpoints_need_resume_or_overwrite(tiny_run, tmp_mod, idx_dir):
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--steps", "6", "--workdir", tiny_run, tmp=tmp_mod)
    assert_one_line_error(r, 2, r"--resume.*--overwrite")
    # Resuming a finished run changes nothing and reports again.
    r = run(TRAIN, "--workdir", tiny_run, "--resume", tmp=tmp_mod)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test accuracy" in r.stdout


def test_a_workdir_in_use_by_another_run_is_refused(tiny_run, tmp_mod):
    """Two runs must not write one workdir's checkpoints and metrics: while a process holds
    the workdir's lock (this test, as a running training would), a second run exits 2 naming
    the holder's pid; once it is released, the same command runs."""
    from lstm_jax import _train

    with _train.workdir_lock(tiny_run):
        r = run(TRAIN, "--workdir", tiny_run, "--resume", tmp=tmp_mod)
        assert_one_line_error(r, 2, rf"in use by another training run \(pid {os.getpid()}\)")
    r = run(TRAIN, "--workdir", tiny_run, "--resume", tmp=tmp_mod)
    assert r.returncode == 0, r.stderr[-2000:]


def test_overwrite_starts_over(tiny_run, tmp_path, idx_dir):
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run, workdir)
    args = (*TINY, "--data-dir", idx_dir, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2")
    r = run(TRAIN, *args, "--seed", "1", "--overwrite", "--workdir", workdir, tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [2, 4]
    leaves, config, step = _params_of(workdir)
    assert config.seed == 1 and step == 4


def test_bfloat16_matmuls_train_resume_in_float32_and_evaluate(tmp_path, idx_dir):
    """--matmul-dtype bfloat16 is stored in the checkpoint's config and used by the run and by
    evaluate.py; a run may switch it on resume (the weights are float32 either way)."""
    workdir = tmp_path / "w"
    args = (*TINY, "--data-dir", idx_dir, "--eval-every", "2", "--checkpoint-every", "2", "--workdir", workdir)
    r = run(TRAIN, *args, "--steps", "2", "--matmul-dtype", "bfloat16", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    leaves, config, step = _params_of(workdir)
    assert config.matmul_dtype == "bfloat16" and step == 2
    assert all(leaf.dtype.name == "float32" for leaf in leaves if leaf.dtype.kind == "f")
    r = run(EVALUATE, "--workdir", workdir, tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(TRAIN, "--workdir", workdir, "--resume", "--steps", "4", "--matmul-dtype", "float32", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    leaves, config, step = _params_of(workdir)
    assert config.matmul_dtype == "float32" and step == 4


def test_non_finite_loss_exits_1_naming_the_step(tmp_path, idx_dir):
    r = run(TRAIN, *TINY, "--data-dir", idx_dir, "--steps", "40", "--lr", "1e38", "--schedule", "constant",
            "--clip-norm", "0", "--log-every", "1", "--checkpoint-every", "1", "--workdir", tmp_path / "w",
            tmp=tmp_path)
    assert_one_line_error(r, 1, r"non-finite .* at step \d+")
    bad = int(re.search(r"at step (\d+)", r.stderr).group(1))
    leaves, _, step = _params_of(tmp_path / "w")
    assert step == bad - 1
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_evaluate_bad_input(tmp_path):
    r = run(EVALUATE, "--workdir", tmp_path / "absent", tmp=tmp_path)
    assert_one_line_error(r, 2, r"does not exist")
    (tmp_path / "empty").mkdir()
    r = run(EVALUATE, "--workdir", tmp_path / "empty", tmp=tmp_path)
    assert_one_line_error(r, 2, r"no checkpoint")


def test_evaluate_unknown_step_and_missing_data(tiny_run, tmp_mod):
    r = run(EVALUATE, "--workdir", tiny_run, "--step", "12345", tmp=tmp_mod)
    assert_one_line_error(r, 2, r"--step")
    r = run(EVALUATE, "--workdir", tiny_run, "--data-dir", tmp_mod / "nowhere", tmp=tmp_mod)
    assert_one_line_error(r, 2, r"does not exist")
    r = run(EVALUATE, "--workdir", tiny_run, tmp=tmp_mod)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tiny_run / "errors.png").read_bytes().startswith(PNG_SIGNATURE)
