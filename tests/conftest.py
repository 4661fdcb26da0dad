# ==========================================================================
# BEGIN data fixtures (owned by lstm_jax/data.py + tests/test_data.py)
# ==========================================================================
import os as _data_os
from pathlib import Path as _DataPath

import pytest as _data_pytest

#: Where Debian's `dataset-fashion-mnist` package installs the IDX files.
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@_data_pytest.fixture
def fashion_mnist_dir() -> _DataPath:
    """Folder with the real Fashion-MNIST IDX files, or skip the test.

    The folder is ``$LSTM_JAX_FASHION_MNIST_DIR`` if set, else
    /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``).
    When the files are absent the test is skipped -- unless
    ``LSTM_JAX_REQUIRE_DATA=1`` (set in CI), where it fails instead, so that CI
    can never silently skip the real-data tests.  Function-scoped (it only
    stats 4 files) so that tests can monkeypatch the environment.
    """
    folder = _DataPath(
        _data_os.environ.get("LSTM_JAX_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR
    )
    missing = [
        name
        for name in _FASHION_MNIST_FILES
        if not any((folder / (name + ext)).is_file() for ext in (".gz", ""))
    ]
    if missing:
        reason = (
            f"Fashion-MNIST IDX files not found in {folder} (missing {', '.join(missing)}); "
            "install them with `apt-get install dataset-fashion-mnist` or set "
            "LSTM_JAX_FASHION_MNIST_DIR"
        )
        required = _data_os.environ.get("LSTM_JAX_REQUIRE_DATA", "").strip().lower()
        if required in ("1", "true", "yes"):
            _data_pytest.fail(f"{reason} (LSTM_JAX_REQUIRE_DATA={required} requires them)")
        _data_pytest.skip(reason)
    return folder


# ==========================================================================
# END data fixtures
# ==========================================================================
