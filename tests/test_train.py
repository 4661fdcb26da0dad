"""Training library: the jitted train step, the optimizer, evaluate(), and the training run
(non-finite loss handling, resume without the CLI)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lstm_jax as lj
from lstm_jax import _train

_spec = importlib.util.spec_from_file_location("_lstm_reference_train", pathlib.Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _small_setup(layers=2, hidden=8, batch=16, steps=10, clip=1.0):
    params = lj.init_classifier(jax.random.PRNGKey(0), 28, hidden, layers, 10)
    opt = lj.make_optimizer(1e-2, steps, clip, "cosine")
    state = lj.create_train_state(jax.random.PRNGKey(1), params, opt)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    return opt, state, images, labels


def test_train_step_changes_every_parameter_and_compiles_once():
    opt, state, images, labels = _small_setup()
    before = jax.device_get(state.params)
    step = lj.make_train_step(opt, dropout=0.5, recurrent_dropout=0.1)
    keys = [np.asarray(state.key)]
    for i in range(4):
        state, metrics = step(state, images, labels)
        keys.append(np.asarray(state.key))
        assert isinstance(metrics["loss"], jax.Array)  # stays on the device
    after = jax.device_get(state.params)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(before),
                          jax.tree.leaves(after)):
        assert np.mean(np.asarray(a) != np.asarray(b)) > 0.5, path[0]
    assert step.trace_count() == 1
    assert step._cache_size() == 1
    assert int(state.step) == 4 and state.step.dtype == jnp.int32
    # The PRNG key advances every step (split inside the step) and is never reused.
    assert len({k.tobytes() for k in keys}) == len(keys)
    # Metrics are sums over the batch plus the mean loss.
    m = jax.device_get(metrics)
    assert m["count"] == len(labels) and 0 <= m["correct"] <= len(labels)
    np.testing.assert_allclose(m["loss"], m["loss_sum"] / m["count"], rtol=1e-6)
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_train_step_donates_the_state():
    opt, state, images, labels = _small_setup(layers=1)
    step = lj.make_train_step(opt, dropout=0.0)
    old = state
    state, _ = step(state, images, labels)
    if jax.default_backend() == "cpu" and not old.params.w_out.is_deleted():
        pytest.skip("this backend ignores buffer donation")
    assert old.params.w_out.is_deleted()


def test_train_step_is_deterministic_and_uses_the_state_key():
    opt, state, images, labels = _small_setup(layers=1)
    step = lj.make_train_step(opt, dropout=0.5, donate=False)
    a, _ = step(state, images, labels)
    b, _ = step(state, images, labels)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    c, _ = step(state._replace(key=jax.random.PRNGKey(99)), images, labels)
    assert not np.array_equal(a.params.w_out, c.params.w_out)


def test_float_and_uint8_images_give_the_same_step():
    from lstm_jax import data

    opt, state, images, labels = _small_setup(layers=1)
    step = lj.make_train_step(opt, dropout=0.0, donate=False)
    a, ma = step(state, images, labels)
    b, mb = step(state, jnp.asarray(data.to_sequences(images)), labels)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    np.testing.assert_allclose(a.params.w_out, b.params.w_out, rtol=1e-6, atol=1e-7)


def test_train_step_rejects_bad_input():
    opt, state, images, labels = _small_setup(layers=1)
    step = lj.make_train_step(opt, dropout=0.0, donate=False)
    with pytest.raises(ValueError, match="labels"):
        step(state, images, labels[:-1])
    with pytest.raises(TypeError, match="labels"):
        step(state, images, labels.astype(np.float32))
    with pytest.raises(ValueError, match="images"):
        step(state, images[0], labels)
    with pytest.raises(TypeError, match="state"):
        step(tuple(state), images, labels)
    with pytest.raises(ValueError, match="dropout"):
        lj.make_train_step(opt, dropout=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        lj.make_train_step("adam")


def test_make_optimizer_schedules_and_clipping():
    sched = _train.make_schedule(1e-3, 1000, "warmup_cosine", warmup_steps=100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(100)), 1e-3, rtol=1e-6)
    assert float(sched(1000)) == pytest.approx(0.0, abs=1e-9)
    assert float(_train.make_schedule(1e-3, 1000, "constant")(777)) == pytest.approx(1e-3)
    assert float(_train.make_schedule(1e-3, 1000, "cosine")(0)) == pytest.approx(1e-3)
    assert float(_train.make_schedule(1e-3, 1000, "linear")(500)) == pytest.approx(5e-4)
    # Clipping: a huge gradient moves each parameter by at most lr (Adam) and the clipped
    # chain equals adam applied to the clipped gradient.
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.array([3e6, -4e6, 0.0])}
    opt = lj.make_optimizer(0.1, 10, clip_norm=1.0, schedule="constant")
    updates, _ = opt.update(grads, opt.init(params), params)
    clipped = {"w": grads["w"] / 5e6}
    ref_opt = optax.adam(0.1)
    ref_updates, _ = ref_opt.update(clipped, ref_opt.init(params), params)
    np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-5)
    for bad, match in (({"lr": -1.0}, "lr"), ({"lr": 0.0}, "lr"), ({"steps": 0}, "steps"),
                       ({"clip_norm": -1.0}, "clip_norm"), ({"schedule": "step"}, "schedule")):
        kwargs = dict(lr=1e-3, steps=10, clip_norm=None, schedule="constant")
        kwargs.update(bad)
        with pytest.raises((ValueError, TypeError), match=match):
            lj.make_optimizer(**kwargs)


def _numpy_logits(params, images):
    layers = [tuple(np.asarray(a, np.float64) for a in p) for p in params.lstm]
    xs = images.astype(np.float64) / 255.0
    ys, _, _ = ref.lstm_forward(layers, xs, forget_bias=1.0)
    return ys[:, -1] @ np.asarray(params.w_out, np.float64) + np.asarray(params.b_out, np.float64)


@pytest.mark.parametrize("batch_size", [10, 37, 64])
def test_evaluate_matches_numpy_with_a_partial_last_batch(batch_size):
    rng = np.random.default_rng(1)
    n = 37
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    params = lj.init_classifier(jax.random.PRNGKey(2), 28, 6, 2, 10)
    logits = _numpy_logits(params, images)
    preds = logits.argmax(-1)
    # Labels: right for about half of the images, so accuracy is neither 0 nor 1.
    labels = np.where(rng.random(n) < 0.5, preds, (preds + 1) % 10).astype(np.int32)
    want_acc = np.mean(preds == labels)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want_loss = -np.mean(logp[np.arange(n), labels])
    got = lj.evaluate(params, images, labels, batch_size=batch_size, return_predictions=True)
    assert got["num_examples"] == n
    assert got["correct"] == int(np.sum(preds == labels))
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-12)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-4)
    np.testing.assert_array_equal(got["predictions"], preds)


def test_evaluate_rejects_bad_input():
    params = lj.init_classifier(jax.random.PRNGKey(2), 28, 4, 1, 10)
    images = np.zeros((5, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        lj.evaluate(params, images, np.zeros(5, np.int32), batch_size=0)
    with pytest.raises(ValueError, match="labels"):
        lj.evaluate(params, images, np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="params"):
        lj.evaluate(params.lstm, images, np.zeros(5, np.int32))


def test_bfloat16_matmuls_in_the_train_step_and_evaluate():
    """matmul_dtype=bfloat16 reaches the LSTM: the loss moves by about bfloat16's rounding of
    the operands (8 significant bits), not more; the parameters and optimiser state stay float32."""
    opt, state, images, labels = _small_setup(hidden=16)
    ref_state = jax.tree.map(jnp.copy, state)
    step32 = _train.make_train_step(opt, dropout=0.0, donate=False)
    step16 = _train.make_train_step(opt, dropout=0.0, donate=False, matmul_dtype=jnp.bfloat16)
    new32, m32 = step32(ref_state, images, labels)
    new16, m16 = step16(state, images, labels)
    loss32, loss16 = float(m32["loss"]), float(m16["loss"])
    assert loss16 != loss32 and abs(loss16 - loss32) <= 2e-2 * abs(loss32)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new16), jax.tree.leaves(new32)))
    # evaluate: the same loss as the train step's forward pass (no dropout), per precision.
    for matmul_dtype, loss in ((None, loss32), (jnp.bfloat16, loss16)):
        got = lj.evaluate(state.params, images, labels, batch_size=16, matmul_dtype=matmul_dtype)
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
    with pytest.raises(TypeError, match="matmul_dtype"):
        lj.evaluate(state.params, images, labels, matmul_dtype="no-such-dtype")
    with pytest.raises(TypeError, match="matmul_dtype"):
        lj.evaluate(state.params, images, labels, matmul_dtype=jnp.int32)


def test_confusion_matrix():
    cm = _train.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_config_validation_names_the_flag():
    lj.TrainConfig().validate()
    for field, value in (("layers", 0), ("hidden", -1), ("batch_size", 0), ("steps", 0), ("lr", -1.0),
                         ("lr", float("nan")), ("dropout", 1.5), ("dropout", 1.0), ("recurrent_dropout", -0.1),
                         ("clip_norm", 0.0), ("eval_every", 0), ("checkpoint_every", 0), ("val_size", -1),
                         ("seed", -1), ("dataset", "cifar"), ("schedule", "step"), ("epochs", 0.0),
                         ("matmul_dtype", "float16")):
        cfg = lj.TrainConfig(**{field: value})
        with pytest.raises(_train.ConfigError, match="--" + field.replace("_", "-")):
            cfg.validate()


def test_resume_config_rejects_architecture_changes():
    stored = lj.TrainConfig(layers=2, hidden=32).to_dict()
    assert _train.resume_config(stored, {}).layers == 2
    assert _train.resume_config(stored, {"steps": 77}).steps == 77
    with pytest.raises(_train.ConfigError, match="--layers"):
        _train.resume_config(stored, {"layers": 3})
    with pytest.raises(_train.ConfigError, match="--hidden"):
        _train.resume_config(stored, {"hidden": 64})
    with pytest.raises(_train.ConfigError, match="--dataset"):
        _train.resume_config(stored, {"dataset": "fashion_mnist"})


def test_workdir_lock_is_exclusive_and_released(tmp_path):
    """flock locks belong to an open file, so a second acquisition in this process conflicts
    as another process's would."""
    import os

    with _train.workdir_lock(tmp_path):
        assert (tmp_path / _train.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(_train.ConfigError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
            with _train.workdir_lock(tmp_path):
                pass
    with _train.workdir_lock(tmp_path):  # released: free again
        pass
