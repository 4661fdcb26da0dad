"""lstm_jax: a hand-written LSTM in JAX.

Gate order (i, f, g, o), ``x @ w_ih`` layout; see :mod:`lstm_jax._cell` for the equations.
"""

from lstm_jax._cell import lstm_cell
from lstm_jax._classifier import ClassifierParams, classify, init_classifier
from lstm_jax._dropout import make_dropout_masks
from lstm_jax._init import init_lstm, zero_state
from lstm_jax._memory import retain_freed_memory
from lstm_jax._stack import lstm
from lstm_jax._torch import from_torch, to_torch
from lstm_jax._train import (
    TrainConfig,
    TrainState,
    create_train_state,
    evaluate,
    make_optimizer,
    make_train_step,
    train_and_evaluate,
)
from lstm_jax._types import DropoutMasks, LSTMLayerParams, LSTMState

__version__ = "0.1.0"

__all__ = [
    "ClassifierParams",
    "DropoutMasks",
    "LSTMLayerParams",
    "LSTMState",
    "TrainConfig",
    "TrainState",
    "classify",
    "create_train_state",
    "evaluate",
    "from_torch",
    "init_classifier",
    "init_lstm",
    "lstm",
    "lstm_cell",
    "make_dropout_masks",
    "make_optimizer",
    "make_train_step",
    "retain_freed_memory",
    "to_torch",
    "train_and_evaluate",
    "zero_state",
]
