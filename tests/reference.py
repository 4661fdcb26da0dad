"""Independent NumPy (float64) reference implementation of the stacked LSTM.

This module deliberately imports neither ``jax`` nor ``lstm_jax``: it is a
from-scratch re-statement of the semantics the library must implement, with
hand-written backpropagation through time, so that the tests can compare the
library against something that shares no code (and no autodiff) with it.

Conventions
-----------
* ``params`` is a sequence with one ``(w_ih, w_hh, b)`` triple per layer
  (anything unpackable into three arrays works, e.g. ``LSTMLayerParams``):
  ``w_ih`` [in, 4H], ``w_hh`` [H, 4H], ``b`` [4H], gate order (i, f, g, o).
* ``h0`` / ``c0`` are sequences with one [B, H] array per layer.
* ``output_masks``: ``None`` or one entry per layer, each ``None`` or a
  [B, T, H] array (already scaled, i.e. values 0 or 1/(1-rate)).
* ``recurrent_masks``: ``None`` or one entry per layer, each ``None`` or a
  [B, H] array (already scaled).
* ``lengths``: ``None`` (all sequences have length T) or [B] ints in [0, T].

Semantics, per layer l with input X_0 = xs:
    z   = x_t W_ih + (h_{t-1} * rmask_l) W_hh + b,   z = [z_i, z_f, z_g, z_o]
    i   = sigmoid(z_i); f = sigmoid(z_f + forget_bias)
    g   = tanh(z_g);    o = sigmoid(z_o)
    c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
  For t >= lengths[b] the state of sequence b is carried unchanged and its
  output y_t is 0.  The carried h is never dropped (rmask only affects the
  h that is multiplied by W_hh).  Y_l = y * omask_l, X_{l+1} = Y_l,
  ys = Y_top.  The final state (per layer) is never dropped.

Everything is computed in float64 regardless of the input dtypes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "sigmoid",
    "lstm_forward",
    "lstm_backward",
    "lstm_loss_and_grads",
    "classifier_forward",
    "classifier_backward",
    "classifier_loss_and_grads",
    "Adam",
    "train_classifier_adam",
]

F64 = np.float64


def _f64(a):
    return None if a is None else np.asarray(a, dtype=F64)


def sigmoid(x):
    """Numerically stable logistic function (float64)."""
    x = np.asarray(x, dtype=F64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _as_layers(params):
    layers = []
    for p in params:
        w_ih, w_hh, b = p
        layers.append((_f64(w_ih), _f64(w_hh), _f64(b)))
    return layers


def _per_layer(x, n):
    if x is None:
        return [None] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"expected {n} per-layer entries, got {len(x)}")
    return [_f64(a) for a in x]


# ---------------------------------------------------------------------------
# LSTM stack: forward (with cache) and hand-written BPTT backward
# ---------------------------------------------------------------------------


def lstm_forward(
    params,
    xs,
    h0=None,
    c0=None,
    *,
    lengths=None,
    output_masks=None,
    recurrent_masks=None,
    forget_bias=1.0,
):
    """Forward pass of the stacked LSTM.

    Returns ``(ys, (h_T, c_T), cache)`` where ``ys`` is [B, T, H_top],
    ``h_T`` / ``c_T`` are lists with one [B, H] array per layer and ``cache``
    holds everything :func:`lstm_backward` needs.
    """
    layers = _as_layers(params)
    n = len(layers)
    xs = _f64(xs)
    B, T, _ = xs.shape
    if lengths is None:
        lengths = np.full((B,), T, dtype=np.int64)
    lengths = np.asarray(lengths).astype(np.int64)
    if lengths.shape != (B,) or np.any(lengths < 0) or np.any(lengths > T):
        raise ValueError("lengths must be [B] ints in [0, T]")
    # valid[b, t] = 1.0 if t < lengths[b]
    valid = (np.arange(T)[None, :] < lengths[:, None]).astype(F64)

    omasks = _per_layer(output_masks, n)
    rmasks = _per_layer(recurrent_masks, n)

    h_init, c_init = [], []
    for l, (_, w_hh, _) in enumerate(layers):
        H = w_hh.shape[0]
        h_init.append(np.zeros((B, H)) if h0 is None else _f64(h0[l]))
        c_init.append(np.zeros((B, H)) if c0 is None else _f64(c0[l]))

    layer_caches = []
    h_fin, c_fin = [], []
    inp = xs
    for l, (w_ih, w_hh, b) in enumerate(layers):
        H = w_hh.shape[0]
        assert w_ih.shape == (inp.shape[-1], 4 * H), (w_ih.shape, inp.shape)
        assert w_hh.shape == (H, 4 * H) and b.shape == (4 * H,)
        rmask = rmasks[l]
        h, c = h_init[l], c_init[l]
        steps = []
        y = np.zeros((B, T, H))
        for t in range(T):
            x_t = inp[:, t, :]
            hd = h if rmask is None else h * rmask
            z = x_t @ w_ih + hd @ w_hh + b
            zi, zf, zg, zo = np.split(z, 4, axis=-1)
            i = sigmoid(zi)
            f = sigmoid(zf + forget_bias)
            g = np.tanh(zg)
            o = sigmoid(zo)
            c_new = f * c + i * g
            tc = np.tanh(c_new)
            h_new = o * tc
            v = valid[:, t][:, None]
            steps.append(
                dict(x=x_t, hd=hd, c_prev=c, i=i, f=f, g=g, o=o, tc=tc, v=v)
            )
            y[:, t, :] = v * h_new
            h = np.where(v > 0, h_new, h)
            c = np.where(v > 0, c_new, c)
        h_fin.append(h)
        c_fin.append(c)
        out = y if omasks[l] is None else y * omasks[l]
        layer_caches.append(dict(steps=steps, rmask=rmask, omask=omasks[l]))
        inp = out

    cache = dict(layers=layers, layer_caches=layer_caches, T=T, B=B)
    return inp, (h_fin, c_fin), cache


def lstm_backward(cache, dys, dh_T=None, dc_T=None):
    """Backpropagation through time, written out by hand.

    Args:
      cache: from :func:`lstm_forward`.
      dys: cotangent of ``ys`` ([B, T, H_top]), or None for zero.
      dh_T, dc_T: per-layer cotangents of the final state (lists of [B, H],
        entries may be None), or None for all-zero.

    Returns a dict with
      ``params``: list per layer of ``(dw_ih, dw_hh, db)``,
      ``xs``: [B, T, in],
      ``h0``, ``c0``: lists per layer of [B, H].
    """
    layers = cache["layers"]
    lcs = cache["layer_caches"]
    n = len(layers)
    T, B = cache["T"], cache["B"]
    dh_T = [None] * n if dh_T is None else list(dh_T)
    dc_T = [None] * n if dc_T is None else list(dc_T)

    H_top = layers[-1][1].shape[0]
    dY = np.zeros((B, T, H_top)) if dys is None else _f64(dys).copy()

    grads_params = [None] * n
    dh0 = [None] * n
    dc0 = [None] * n
    for l in reversed(range(n)):
        w_ih, w_hh, b = layers[l]
        H = w_hh.shape[0]
        lc = lcs[l]
        steps, rmask, omask = lc["steps"], lc["rmask"], lc["omask"]
        # Y_l = y * omask  ->  dy = dY * omask
        dy = dY if omask is None else dY * omask
        dw_ih = np.zeros_like(w_ih)
        dw_hh = np.zeros_like(w_hh)
        db = np.zeros_like(b)
        dx = np.zeros((B, T, w_ih.shape[0]))
        dh = np.zeros((B, H)) if dh_T[l] is None else _f64(dh_T[l]).copy()
        dc = np.zeros((B, H)) if dc_T[l] is None else _f64(dc_T[l]).copy()
        for t in reversed(range(T)):
            s = steps[t]
            v = s["v"]  # [B, 1], 1.0 where the step is valid
            i, f, g, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
            # On a valid step: h_t = h_new, c_t = c_new, y_t = h_new.
            # On an invalid step: h_t = h_{t-1}, c_t = c_{t-1}, y_t = 0.
            dh_new = v * (dh + dy[:, t, :])
            dc_new = v * dc
            # h_new = o * tanh(c_new)
            do = dh_new * tc
            dc_new = dc_new + dh_new * o * (1.0 - tc * tc)
            # c_new = f * c_prev + i * g
            di = dc_new * g
            dg = dc_new * i
            df = dc_new * s["c_prev"]
            dc_prev = dc_new * f
            # gate nonlinearities (forget_bias shifts z_f: d/dz_f is unchanged)
            dzi = di * i * (1.0 - i)
            dzf = df * f * (1.0 - f)
            dzg = dg * (1.0 - g * g)
            dzo = do * o * (1.0 - o)
            dz = np.concatenate([dzi, dzf, dzg, dzo], axis=-1)  # [B, 4H]
            # z = x W_ih + hd W_hh + b
            dw_ih += s["x"].T @ dz
            dw_hh += s["hd"].T @ dz
            db += dz.sum(axis=0)
            dx[:, t, :] = dz @ w_ih.T
            dhd = dz @ w_hh.T
            dh_prev = dhd if rmask is None else dhd * rmask
            # carry: valid rows flow through the cell, invalid rows pass through
            dh = dh_prev + (1.0 - v) * dh
            dc = dc_prev + (1.0 - v) * dc
        grads_params[l] = (dw_ih, dw_hh, db)
        dh0[l] = dh
        dc0[l] = dc
        dY = dx  # X_l = Y_{l-1}
    return dict(params=grads_params, xs=dY, h0=dh0, c0=dc0)


def lstm_loss_and_grads(params, xs, h0, c0, R1, R2, R3, **fwd_kwargs):
    """Linear probe loss used by the tests and its gradients.

    loss = sum(ys * R1) + sum_l sum(h_T[l] * R2[l] + c_T[l] * R3[l])
    """
    ys, (hT, cT), cache = lstm_forward(params, xs, h0, c0, **fwd_kwargs)
    loss = float(np.sum(ys * _f64(R1)))
    for l in range(len(hT)):
        loss += float(np.sum(hT[l] * _f64(R2[l])) + np.sum(cT[l] * _f64(R3[l])))
    grads = lstm_backward(cache, R1, [_f64(r) for r in R2], [_f64(r) for r in R3])
    return loss, (ys, hT, cT), grads


# ---------------------------------------------------------------------------
# Softmax classifier head on the last valid output
# ---------------------------------------------------------------------------


def classifier_forward(ys, lengths, w_out, b_out, labels):
    """logits = ys[b, lengths[b]-1] @ w_out + b_out; mean cross-entropy.

    Requires lengths >= 1.  Returns ``(loss, cache)``.
    """
    ys = _f64(ys)
    B, T, _ = ys.shape
    lengths = np.asarray(lengths).astype(np.int64)
    if np.any(lengths < 1) or np.any(lengths > T):
        raise ValueError("classifier head needs lengths in [1, T]")
    labels = np.asarray(labels).astype(np.int64)
    last = ys[np.arange(B), lengths - 1]  # [B, H]
    logits = last @ _f64(w_out) + _f64(b_out)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    sumexp = e.sum(axis=-1, keepdims=True)
    logp = logits - m - np.log(sumexp)
    loss = -np.mean(logp[np.arange(B), labels])
    probs = e / sumexp
    cache = dict(last=last, probs=probs, labels=labels, lengths=lengths,
                 shape=ys.shape, w_out=_f64(w_out))
    return float(loss), cache


def classifier_backward(cache):
    """Returns ``(dys, dw_out, db_out)`` for the mean cross-entropy loss."""
    B, T, H = cache["shape"]
    labels = cache["labels"]
    dlogits = cache["probs"].copy()
    dlogits[np.arange(B), labels] -= 1.0
    dlogits /= B
    dw_out = cache["last"].T @ dlogits
    db_out = dlogits.sum(axis=0)
    dlast = dlogits @ cache["w_out"].T
    dys = np.zeros((B, T, H))
    dys[np.arange(B), cache["lengths"] - 1] = dlast
    return dys, dw_out, db_out


def classifier_loss_and_grads(params, w_out, b_out, xs, labels, *, lengths,
                              h0=None, c0=None, output_masks=None,
                              recurrent_masks=None, forget_bias=1.0):
    """Full model: LSTM stack -> last valid top output -> linear -> softmax CE.

    Returns ``(loss, grads)`` with ``grads = dict(params=[(dw_ih, dw_hh, db),
    ...], w_out=..., b_out=..., xs=..., h0=[...], c0=[...])``.
    """
    ys, _, cache = lstm_forward(
        params, xs, h0, c0, lengths=lengths, output_masks=output_masks,
        recurrent_masks=recurrent_masks, forget_bias=forget_bias)
    loss, ccache = classifier_forward(ys, lengths, w_out, b_out, labels)
    dys, dw_out, db_out = classifier_backward(ccache)
    g = lstm_backward(cache, dys)
    g["w_out"] = dw_out
    g["b_out"] = db_out
    return loss, g


# ---------------------------------------------------------------------------
# Adam (Kingma & Ba), exactly as optax.adam computes it
# ---------------------------------------------------------------------------


class Adam:
    """Adam on a flat list of float64 arrays.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    mhat = m / (1 - b1^t);  vhat = v / (1 - b2^t)
    p <- p - lr * mhat / (sqrt(vhat) + eps)

    ``bias_correction_dtype``: None (exact, float64) or e.g. ``np.float32`` to
    reproduce optax running in float32, which evaluates ``1 - b**t`` in that
    dtype with b rounded to it (1 - float32(0.999) = 0.0009999871: a 1.3e-5
    relative error in vhat's correction); the moments themselves use the
    Python-float (1 - b) either way, as optax does.
    """

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, bias_correction_dtype=None):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.bc_dtype = bias_correction_dtype
        self.m = None
        self.v = None
        self.t = 0

    def step(self, params, grads):
        params = [_f64(p) for p in params]
        grads = [_f64(g) for g in grads]
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        b1, b2 = self.b1, self.b2
        if self.bc_dtype is None:
            bc1, bc2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        else:
            dt = self.bc_dtype
            bc1 = float(dt(1) - dt(b1) ** dt(self.t))
            bc2 = float(dt(1) - dt(b2) ** dt(self.t))
        out = []
        for k, (p, g) in enumerate(zip(params, grads)):
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * g
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * g * g
            mhat = self.m[k] / bc1
            vhat = self.v[k] / bc2
            out.append(p - self.lr * mhat / (np.sqrt(vhat) + self.eps))
        return out


def train_classifier_adam(params, w_out, b_out, xs, labels, *, lengths,
                          steps, lr, h0=None, c0=None, output_masks=None,
                          recurrent_masks=None, forget_bias=1.0,
                          b1=0.9, b2=0.999, eps=1e-8, bias_correction_dtype=None):
    """Run ``steps`` Adam steps on the LSTM parameters and the head.

    Only the LSTM weights and the head are trained (xs and the initial state
    are data).  Returns ``(params, w_out, b_out, losses)`` with ``params`` a
    list of ``(w_ih, w_hh, b)`` and ``losses`` the loss before each step.
    """
    layers = _as_layers(params)
    flat = [a for layer in layers for a in layer] + [_f64(w_out), _f64(b_out)]
    opt = Adam(lr, b1=b1, b2=b2, eps=eps, bias_correction_dtype=bias_correction_dtype)
    losses = []
    n = len(layers)
    for _ in range(steps):
        ps = [tuple(flat[3 * l:3 * l + 3]) for l in range(n)]
        loss, g = classifier_loss_and_grads(
            ps, flat[-2], flat[-1], xs, labels, lengths=lengths, h0=h0, c0=c0,
            output_masks=output_masks, recurrent_masks=recurrent_masks,
            forget_bias=forget_bias)
        losses.append(loss)
        gflat = [a for layer in g["params"] for a in layer] + [g["w_out"], g["b_out"]]
        flat = opt.step(flat, gflat)
    ps = [tuple(flat[3 * l:3 * l + 3]) for l in range(n)]
    return ps, flat[-2], flat[-1], losses
