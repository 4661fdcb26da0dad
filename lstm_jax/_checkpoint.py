"""Checkpoints with orbax-checkpoint: one ``CheckpointManager`` in ``WORKDIR/checkpoints``.

Each checkpoint holds two items:

* ``state``: the :class:`TrainState` (params, optimizer state, step, PRNG key);
* ``meta``: JSON with the run's configuration, the data-order position (seed, epoch,
  batch within the epoch) and the accumulated training wall time.

Retention: the latest ``keep`` checkpoints plus the one with the best validation
accuracy (an ``AnyPreservationPolicy`` of ``LatestN`` and ``BestN``); checkpoints saved
at an evaluation carry ``{"val_accuracy", "val_loss"}`` as their orbax metrics.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves only a temporary directory, which is ignored (and removed
by ``cleanup_tmp_directories``) -- ``latest_step`` only ever sees finished checkpoints.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

CHECKPOINT_DIR = "checkpoints"


def _quiet_orbax():
    # Orbax logs every save/restore through absl at INFO/WARNING; keep the CLI's output clean.
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # pragma: no cover - absl ships with orbax
        pass


def _best_metric(metrics) -> float:
    return float(metrics["val_accuracy"])


class Checkpoints:
    """Saves and restores :class:`TrainState` + metadata under ``directory``.

    Args:
      directory: the checkpoint folder (created unless ``read_only``).
      keep: how many of the latest checkpoints to keep (the best one is kept in addition).
      read_only: open existing checkpoints without writing or cleaning anything.
    """

    def __init__(self, directory: os.PathLike | str, *, keep: int = 3, read_only: bool = False):
        _quiet_orbax()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=int(keep)),
            ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # -- queries ---------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the highest validation accuracy; the latest step when no
        checkpoint carries metrics (e.g. no validation split)."""
        steps = [s for s in self.all_steps() if self._manager.metrics(s) is not None]
        if not steps:
            return self.latest_step()
        return self._manager.best_step()

    def metrics(self, step: int) -> Optional[dict]:
        return self._manager.metrics(step)

    # -- save / restore --------------------------------------------------------------------
    def save(self, step: int, state, meta: dict, metrics: Optional[dict] = None) -> None:
        """Saves ``state`` (fetched to host first, so donated device buffers are safe to
        reuse at once) and ``meta`` (JSON-serialisable) as ``step``; blocks until written."""
        ocp = self._ocp
        host_state = jax.device_get(state)
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        ocp = self._ocp
        out = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, template) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` of ``step``; ``template`` is a state of the same
        structure (e.g. a freshly created one) that fixes the pytree types, shapes and dtypes."""
        ocp = self._ocp
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), template)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        state = jax.tree.map(jnp.asarray, out["state"])
        # StandardRestore rebuilds containers from the template's structure.
        state = jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(state))
        return state, dict(out["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def has_checkpoints(workdir: os.PathLike | str) -> bool:
    """True when ``WORKDIR/checkpoints`` holds at least one finished checkpoint."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return False
    return any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())
