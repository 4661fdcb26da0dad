"""lstm_jax.retain_freed_memory: XLA:CPU's per-execution temporary buffer stops costing page
faults. Measured in fresh processes (the setting is process-wide): minor page faults of 24
calls of a jitted function whose temporary buffers are 128 MiB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import lstm_jax as lj
applied = lj.retain_freed_memory() if sys.argv[2] == "retain" else None
import jax, jax.numpy as jnp

def f(x):
    # A scan's stacked outputs, used twice after it: a [64, 128, 2048] float32 temporary (64 MiB).
    _, ys = jax.lax.scan(lambda c, _: (c * 0.5 + 1.0, jnp.tanh(c)), x, None, length=64)
    return jnp.sum(ys * ys[::-1])

f = jax.jit(f)
x = jnp.ones((128, 2048))
f(x).block_until_ready()
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and Linux page-fault counts")
def test_retained_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    default = _probe("default")
    # The premise: by default each call faults the temporary buffer in again (most of its pages).
    assert min(default["faults"][-3:]) > pages // 2, default
    retained = _probe("retain")
    assert retained["applied"] is True
    # With it, the buffer is mostly reused: most calls fault (almost) no new page. Not every
    # one: an aligned block does not always fit the hole the last one left, and glibc then
    # grows the heap (2 to 7 of 24 calls re-faulted the whole buffer in 5 runs here).
    full = [n for n in retained["faults"] if n > pages // 2]
    assert len(full) < len(retained["faults"]) // 2, retained
    assert sum(n < pages // 20 for n in retained["faults"]) > len(retained["faults"]) // 2, retained
