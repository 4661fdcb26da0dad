"""Tests for lstm_jax.data: IDX parsing, validation, cache, splits, TFDS download.

Everything runs on small synthetic IDX files written by the tests; the TFDS
download path runs the real DownloadManager against an HTTP server on
127.0.0.1.  Only ``test_real_fashion_mnist`` reads the real files (through the
``fashion_mnist_dir`` fixture of conftest.py).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_jax import data
from lstm_jax.data import DataError, Source

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray, *, code: int | None = None, magic: bytes | None = None) -> bytes:
    """Serializes an array in IDX format (big-endian); overrides for corruption."""
    array = np.asarray(array)
    code = _CODES[array.dtype] if code is None else code
    header = (magic if magic is not None else bytes([0, 0, code, array.ndim])) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, payload: bytes, *, gz: bool) -> Path:
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_arrays(n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_dataset(folder: Path, arrays=None, *, gz: bool = True, **payload_overrides) -> dict:
    """Writes the 4 IDX files; ``payload_overrides[key]`` replaces a file's bytes."""
    arrays = make_arrays() if arrays is None else arrays
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in data.IDX_FILENAMES.items():
        payload = payload_overrides.get(key)
        if payload is None:
            payload = idx_bytes(arrays[key])
        write_file(folder / name, payload, gz=gz)
    return arrays


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.uint8),
        np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28),
        np.array([[-3, 1000], [7, -32768]], dtype=np.int16),
        np.array([-1, 2**31 - 1], dtype=np.int32),
        np.array([[0.5, -1.25]], dtype=np.float32),
        np.array([np.pi], dtype=np.float64),
        np.array([-128, 5], dtype=np.int8),
    ],
    ids=["labels-1d", "images-3d", "int16", "int32", "float32", "float64", "int8"],
)
def test_read_idx_roundtrip(tmp_path, array, gz):
    path = write_file(tmp_path / "x-idx-ubyte", idx_bytes(array), gz=gz)
    out = data.read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype  # native byte order, same kind
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # writable, not a view of a bytes object


def test_read_idx_sniffs_gzip_regardless_of_extension(tmp_path):
    labels = np.array([1, 2, 3], dtype=np.uint8)
    misnamed = tmp_path / "labels"  # gzipped content, no .gz suffix
    misnamed.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(data.read_idx(misnamed), labels)
    raw_named_gz = tmp_path / "labels2.gz"  # raw content, .gz suffix
    raw_named_gz.write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(data.read_idx(str(raw_named_gz)), labels)


_IMAGES = np.zeros((2, 28, 28), dtype=np.uint8)
_GOOD = idx_bytes(_IMAGES)


def _truncated_gzip() -> bytes:
    blob = gzip.compress(_GOOD)
    return blob[: len(blob) // 2]


def _bad_crc_gzip() -> bytes:
    blob = bytearray(gzip.compress(_GOOD))
    blob[-8] ^= 0xFF  # CRC32 trailer
    return bytes(blob)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "file is empty"),
        (b"\x00\x00", "only 2 bytes"),
        (b"\x12\x34\x08\x03" + _GOOD[4:], "bad IDX magic number 0x12340803"),
        (idx_bytes(_IMAGES, code=0x0A), "unknown IDX type code 0x0A"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (_GOOD[:-100], r"truncated; header says shape 2x28x28 \(1568 data bytes\), file has 1468"),
        (_GOOD + b"\x00", "has trailing bytes"),
        (_truncated_gzip(), "truncated gzip"),
        (_bad_crc_gzip(), "corrupt gzip"),
        (gzip.compress(b""), "decompresses to nothing"),
    ],
    ids=[
        "empty",
        "short",
        "magic",
        "dtype-code",
        "zero-dims",
        "short-header",
        "truncated-data",
        "trailing-bytes",
        "truncated-gzip",
        "gzip-crc",
        "empty-gzip",
    ],
)
def test_read_idx_corrupt(tmp_path, payload, match):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=match) as info:
        data.read_idx(path)
    message = str(info.value)
    assert str(path) in message  # names the file
    assert "\n" not in message  # one line


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="found a directory"):
        data.read_idx(tmp_path)


# --------------------------------------------------------------------------
# data_dir: happy path and validation errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_from_data_dir(tmp_path, cache_dir, gz):
    arrays = write_dataset(tmp_path / "d", gz=gz)
    splits = data.load_dataset("fashion_mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    assert isinstance(splits, data.Splits)
    n_val = data.validation_size(120)  # 10 for a 120-example training file
    assert n_val == 10
    assert splits.train_images.shape == (110, 28, 28)
    assert splits.val_images.shape == (10, 28, 28)
    assert splits.test_images.shape == (30, 28, 28)
    assert splits.train_images.dtype == np.uint8
    for labels in (splits.train_labels, splits.val_labels, splits.test_labels):
        assert labels.dtype == np.int32 and labels.ndim == 1
    # Validation = the *last* training examples, train = the rest, in order.
    np.testing.assert_array_equal(splits.train_images, arrays["train_images"][:110])
    np.testing.assert_array_equal(splits.val_images, arrays["train_images"][110:])
    np.testing.assert_array_equal(splits.val_labels, arrays["train_labels"][110:])
    np.testing.assert_array_equal(splits.test_labels, arrays["test_labels"])


def test_data_dir_accepts_dotted_names_and_dataset_alias(tmp_path, cache_dir):
    folder = tmp_path / "d"
    folder.mkdir()
    arrays = make_arrays()
    for key, name in data.IDX_FILENAMES.items():
        (folder / name.replace("-idx", ".idx")).write_bytes(idx_bytes(arrays[key]))
    splits = data.load_dataset("Fashion-MNIST", data_dir=str(folder), cache_dir=cache_dir)
    np.testing.assert_array_equal(splits.test_images, arrays["test_images"])


def test_data_dir_errors(tmp_path):
    with pytest.raises(DataError, match=r"data_dir .*nowhere does not exist"):
        data.load_dataset(data_dir=tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        data.load_dataset(data_dir=tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"is empty; expected the 4 IDX files"):
        data.load_dataset(data_dir=tmp_path / "empty")
    write_dataset(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz.*found: t10k-images"):
        data.load_dataset(data_dir=tmp_path / "partial")


def test_unknown_dataset_and_bad_val_size(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        data.load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(DataError, match="val_size must be an integer >= 0, got -1"):
        data.load_dataset(data_dir=tmp_path, val_size=-1)


def _bad_dataset_cases():
    """(files to replace, expected message) for each invalid dataset."""
    arrays = make_arrays()
    bad_labels = arrays["test_labels"].copy()
    bad_labels[7] = 12
    empty = np.zeros((0, 28, 28), np.uint8)
    return {
        "count-mismatch": (
            {"train_labels": idx_bytes(arrays["train_labels"][:-1])},
            r"train images \(train-images-idx3-ubyte.gz: 120\) and labels "
            r"\(train-labels-idx1-ubyte.gz: 119\) have different counts",
        ),
        "label-range": (
            {"test_labels": idx_bytes(bad_labels)},
            r"t10k-labels-idx1-ubyte.gz: label 12 at index 7 is out of range; expected 0..9",
        ),
        "image-size": (
            {"test_images": idx_bytes(np.zeros((30, 32, 32), np.uint8))},
            r"t10k-images-idx3-ubyte.gz: expected 28x28 images, found 32x32",
        ),
        "image-dtype": (
            {"train_images": idx_bytes(arrays["train_images"].astype(np.int16))},
            r"train images must have IDX type code 0x08 \(unsigned byte\), found int16",
        ),
        "label-ndim": (
            {"train_labels": idx_bytes(arrays["train_labels"].reshape(120, 1))},
            r"train labels must have 1 dimension\(s\), found shape 120x1",
        ),
        "image-ndim": (
            {"train_images": idx_bytes(arrays["train_images"].reshape(120, 784))},
            r"train images must have 3 dimension\(s\), found shape 120x784",
        ),
        "empty-split": (
            {"test_images": idx_bytes(empty), "test_labels": idx_bytes(np.zeros(0, np.uint8))},
            "test split has 0 examples",
        ),
        "truncated-gzip": (
            {"train_images": gzip.compress(idx_bytes(arrays["train_images"]))[:-50]},
            "truncated gzip",
        ),
    }


@pytest.mark.parametrize(
    "overrides, match", list(_bad_dataset_cases().values()), ids=list(_bad_dataset_cases())
)
def test_load_rejects_bad_files(tmp_path, cache_dir, overrides, match):
    arrays = make_arrays()
    folder = tmp_path / "d"
    folder.mkdir()
    for key, name in data.IDX_FILENAMES.items():
        blob = overrides.get(key, idx_bytes(arrays[key]))
        # Gzip like the real files, unless the case supplies gzip bytes itself.
        (folder / (name + ".gz")).write_bytes(blob if blob[:2] == b"\x1f\x8b" else gzip.compress(blob))
    with pytest.raises(DataError, match=match) as info:
        data.load_dataset(data_dir=folder, cache_dir=cache_dir)
    assert "\n" not in str(info.value)
    assert not cache_dir.exists()  # nothing invalid was cached


# --------------------------------------------------------------------------
# validation split rule
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_train, val_size, expected",
    [
        (60000, 5000, 5000),  # the real datasets: TF input_data's 55k/5k split
        (60000, 10000, 10000),
        (100000, 5000, 5000),  # never more than asked for
        (6000, 5000, 500),  # proportionate: same 1/12 fraction
        (120, 5000, 10),
        (11, 5000, 1),  # at least one validation example...
        (2, 5000, 1),
        (1, 5000, 0),  # ...but always at least one training example
        (0, 5000, 0),
        (60000, 0, 0),  # 0 = no validation split
        (120, 0, 0),
    ],
)
def test_validation_size_rule(num_train, val_size, expected):
    assert data.validation_size(num_train, val_size) == expected


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_validation_size_rejects_bad_values(bad):
    with pytest.raises(DataError, match="val_size must be an integer >= 0"):
        data.validation_size(100, bad)


def test_val_size_zero_gives_empty_validation_split(tmp_path, cache_dir):
    write_dataset(tmp_path / "d")
    splits = data.load_dataset(data_dir=tmp_path / "d", cache_dir=cache_dir, val_size=0)
    assert splits.train_images.shape == (120, 28, 28)
    assert splits.val_images.shape == (0, 28, 28)
    assert splits.val_labels.shape == (0,)


def test_val_size_custom(tmp_path, cache_dir):
    write_dataset(tmp_path / "d")
    splits = data.load_dataset(data_dir=tmp_path / "d", cache_dir=cache_dir, val_size=60000)
    assert len(splits.val_images) == 119 and len(splits.train_images) == 1


# --------------------------------------------------------------------------
# parsed-array cache
# --------------------------------------------------------------------------


def _forbid_parsing(monkeypatch):
    def fail(path):
        raise AssertionError(f"read_idx({path}) called although the cache should be used")

    monkeypatch.setattr(data, "read_idx", fail)


def test_cache_second_load_does_not_parse(tmp_path, cache_dir, monkeypatch):
    write_dataset(tmp_path / "d")
    first = data.load_dataset("mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    cached = list(cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("mnist-") and cached[0].suffix == ".npz"
    _forbid_parsing(monkeypatch)
    second = data.load_dataset("mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    # A different val_size reuses the same cache (the split is applied after).
    third = data.load_dataset("mnist", data_dir=tmp_path / "d", cache_dir=cache_dir, val_size=0)
    assert len(third.train_images) == 120
    assert len(list(cache_dir.iterdir())) == 1  # no temp files left behind


def test_cache_is_keyed_by_name_and_source_files(tmp_path, cache_dir):
    write_dataset(tmp_path / "d", make_arrays(seed=0))
    a = data.load_dataset("mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    # Same folder, new content (different size and mtime): must re-parse.
    write_dataset(tmp_path / "d", make_arrays(n_train=60, seed=1))
    b = data.load_dataset("mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    assert len(a.train_images) + len(a.val_images) == 120
    assert len(b.train_images) + len(b.val_images) == 60
    data.load_dataset("fashion_mnist", data_dir=tmp_path / "d", cache_dir=cache_dir)
    assert len(list(cache_dir.glob("mnist-*.npz"))) == 2
    assert len(list(cache_dir.glob("fashion_mnist-*.npz"))) == 1


def test_corrupt_cache_is_rebuilt(tmp_path, cache_dir):
    arrays = write_dataset(tmp_path / "d")
    data.load_dataset(data_dir=tmp_path / "d", cache_dir=cache_dir)
    (path,) = cache_dir.iterdir()
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="ignoring unreadable dataset cache"):
        splits = data.load_dataset(data_dir=tmp_path / "d", cache_dir=cache_dir)
    np.testing.assert_array_equal(splits.test_images, arrays["test_images"])
    with np.load(path) as npz:  # rewritten with the right content
        np.testing.assert_array_equal(npz["test_images"], arrays["test_images"])


def test_use_cache_false_and_unwritable_cache(tmp_path, cache_dir):
    write_dataset(tmp_path / "d")
    data.load_dataset(data_dir=tmp_path / "d", cache_dir=cache_dir, use_cache=False)
    assert not cache_dir.exists()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(UserWarning, match="could not write dataset cache"):
        splits = data.load_dataset(data_dir=tmp_path / "d", cache_dir=blocker / "sub")
    assert len(splits.test_images) == 30


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LSTM_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "lstm_jax"


# --------------------------------------------------------------------------
# to_sequences, batch order
# --------------------------------------------------------------------------


def test_to_sequences():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    seq = data.to_sequences(images)
    assert seq.dtype == np.float32 and seq.shape == (1, 2, 2)
    np.testing.assert_allclose(seq, [[[0.0, 1.0], [0.2, 0.4]]], rtol=1e-6)
    assert data.to_sequences(np.zeros((5, 28, 28), np.uint8)).shape == (5, 28, 28)
    with pytest.raises(DataError, match="expects uint8 images, got dtype float32"):
        data.to_sequences(seq)
    with pytest.raises(DataError, match="shape"):
        data.to_sequences(np.zeros(3, np.uint8))


def test_batch_indices_deterministic_per_epoch():
    a = data.batch_indices(103, 10, seed=7, epoch=3)
    assert a.shape == (10, 10) and a.dtype.kind == "i"
    assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 103
    # Pure function of (n, batch_size, seed, epoch): a resumed run reproduces it.
    np.testing.assert_array_equal(a, data.batch_indices(103, 10, seed=7, epoch=3))
    assert not np.array_equal(a, data.batch_indices(103, 10, seed=7, epoch=4))
    assert not np.array_equal(a, data.batch_indices(103, 10, seed=8, epoch=3))
    # Batches are consecutive chunks of the epoch's permutation.
    perm = data.epoch_permutation(103, seed=7, epoch=3)
    assert sorted(perm.tolist()) == list(range(103))
    np.testing.assert_array_equal(a.ravel(), perm[:100])
    assert data.batch_indices(5, 5, seed=0, epoch=0).shape == (1, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=10, batch_size=0, seed=0, epoch=0), "batch_size must be an integer >= 1"),
        (dict(num_examples=10, batch_size=11, seed=0, epoch=0), "larger than the 10 examples"),
        (dict(num_examples=10, batch_size=2, seed=-1, epoch=0), "seed must be an integer >= 0"),
        (dict(num_examples=10, batch_size=2, seed=0, epoch=1.0), "epoch must be an integer >= 0"),
    ],
)
def test_batch_indices_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        data.batch_indices(**kwargs)


# --------------------------------------------------------------------------
# TFDS: registered sources and the real DownloadManager on a local server
# --------------------------------------------------------------------------


def test_tfds_sources_come_from_tfds_without_tensorflow():
    mnist = data.tfds_sources("mnist")
    assert set(mnist) == set(data.FILE_KEYS)
    assert mnist["train_images"] == Source(
        "https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz",
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    )
    fashion = data.tfds_sources("fashion_mnist")
    assert fashion["test_labels"].url.endswith("/t10k-labels-idx1-ubyte.gz")
    assert fashion["test_labels"].size == 5148
    assert all(len(s.sha256) == 64 for s in fashion.values())
    assert "tensorflow" not in sys.modules  # TFDS's download code needs no TF


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serves tmp_path/'www' on 127.0.0.1; yields (base_url, folder, server)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", www, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _serve_dataset(www: Path, base_url: str, arrays=None) -> tuple[dict, dict[str, Source]]:
    arrays = write_dataset(www, arrays, gz=True)
    sources = {}
    for key, name in data.IDX_FILENAMES.items():
        blob = (www / (name + ".gz")).read_bytes()
        sources[key] = Source(base_url + name + ".gz", len(blob), hashlib.sha256(blob).hexdigest())
    return arrays, sources


def test_download_with_tfds_local_server(http_server, tmp_path, cache_dir, monkeypatch):
    base_url, www, server = http_server
    arrays, sources = _serve_dataset(www, base_url)
    dl_dir = tmp_path / "downloads"
    splits = data.load_dataset(
        "mnist", download_dir=dl_dir, cache_dir=cache_dir, sources=sources
    )
    np.testing.assert_array_equal(splits.test_images, arrays["test_images"])
    np.testing.assert_array_equal(splits.val_labels, arrays["train_labels"][110:])
    # TFDS stored the verified downloads under <download_dir>/<name>/.
    stored = sorted(p.name for p in (dl_dir / "mnist").iterdir() if p.suffix == ".gz")
    assert len(stored) == 4
    assert not list((dl_dir / "mnist").glob("*.tmp.*"))
    # Second run: server gone (offline), files already downloaded, arrays
    # cached -> no probe failure, no parsing.
    server.shutdown()
    server.server_close()
    _forbid_parsing(monkeypatch)
    again = data.load_dataset(
        "mnist", download_dir=dl_dir, cache_dir=cache_dir, sources=sources, probe_timeout=0.5
    )
    np.testing.assert_array_equal(again.test_images, arrays["test_images"])


@pytest.mark.parametrize("what", ["sha256", "size"])
def test_download_wrong_checksum_is_refused(http_server, tmp_path, cache_dir, what):
    base_url, www, _ = http_server
    _, sources = _serve_dataset(www, base_url)
    good = sources["train_labels"]
    if what == "sha256":
        sources["train_labels"] = good._replace(sha256="0" * 64)
    else:
        sources["train_labels"] = good._replace(size=good.size + 1)
    dl_dir = tmp_path / "downloads"
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz refused, its checksum does not match") as info:
        data.load_dataset("mnist", download_dir=dl_dir, cache_dir=cache_dir, sources=sources)
    message = str(info.value)
    assert "\n" not in message
    assert f"got sha256 {good.sha256}" in message
    # The refused file is not kept anywhere under the download dir.
    leftovers = [p for p in dl_dir.rglob("*") if "train-labels" in p.name]
    assert leftovers == []


def test_download_http_error(http_server, tmp_path, cache_dir):
    base_url, www, _ = http_server
    _, sources = _serve_dataset(www, base_url)
    sources["test_images"] = sources["test_images"]._replace(url=base_url + "missing.gz")
    with pytest.raises(DataError, match=r"downloading .*missing\.gz for mnist failed .*HTTP code: 404"):
        data.load_dataset("mnist", download_dir=tmp_path / "dl", cache_dir=cache_dir, sources=sources)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_sources(base_url: str) -> dict[str, Source]:
    return {
        key: Source(base_url + name + ".gz", 100, "0" * 64)
        for key, name in data.IDX_FILENAMES.items()
    }


def test_offline_fails_fast_with_instructions(tmp_path, cache_dir, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    sources = _offline_sources(f"http://127.0.0.1:{_closed_port()}/mnist/")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist", download_dir=tmp_path / "dl", cache_dir=cache_dir, sources=sources)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "network is unavailable" in message and "cannot reach 127.0.0.1:" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data_dir=/usr/share/datasets/fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_offline_probe_is_bounded_when_connect_hangs(tmp_path, cache_dir, monkeypatch):
    # Simulates an offline machine whose DNS lookup hangs: the probe thread
    # never finishes, yet load_dataset gives up after probe_timeout.
    def hanging_connect(*args, **kwargs):
        time.sleep(30)
        # Like a real connect that finally gives up (returning None would make the
        # abandoned probe thread fail later, inside some other test).
        raise OSError("timed out")

    monkeypatch.setattr(data.socket, "create_connection", hanging_connect)
    sources = _offline_sources("https://example.invalid/mnist/")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach example\.invalid:443: no answer within 0\.3 s"):
        data.load_dataset(
            "mnist", download_dir=tmp_path / "dl", cache_dir=cache_dir, sources=sources, probe_timeout=0.3
        )
    assert time.monotonic() - start < 3


def test_default_sources_offline(tmp_path, cache_dir):
    # The real TFDS URLs; this machine has no internet, so this must fail
    # fast (DNS error) -- or, with internet, it would download MNIST, which
    # we do not want in unit tests: hence a tiny probe timeout and a skip.
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=1).close()
    except OSError:
        pass
    else:
        pytest.skip("network available; not downloading the real MNIST in unit tests")
    start = time.monotonic()
    with pytest.raises(DataError, match="network is unavailable.*apt-get install dataset-fashion-mnist"):
        data.load_dataset("mnist", download_dir=tmp_path / "dl", cache_dir=cache_dir, probe_timeout=1)
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------
# real data (Debian's dataset-fashion-mnist) and the fixture itself
# --------------------------------------------------------------------------


def test_real_fashion_mnist(fashion_mnist_dir, cache_dir):
    splits = data.load_dataset("fashion_mnist", data_dir=fashion_mnist_dir, cache_dir=cache_dir)
    assert splits.train_images.shape == (55000, 28, 28)
    assert splits.val_images.shape == (5000, 28, 28)
    assert splits.test_images.shape == (10000, 28, 28)
    assert splits.train_labels.shape == (55000,)
    assert splits.val_labels.shape == (5000,)
    assert splits.test_labels.shape == (10000,)
    for labels in (splits.train_labels, splits.val_labels, splits.test_labels):
        assert labels.min() == 0 and labels.max() == 9
    # Fashion-MNIST's test set is exactly balanced: 1,000 per class.
    np.testing.assert_array_equal(np.bincount(splits.test_labels), [1000] * 10)
    assert splits.train_images.dtype == np.uint8 and splits.train_images.max() == 255
    seq = data.to_sequences(splits.test_images[:8])
    assert seq.shape == (8, 28, 28) and 0.0 <= seq.min() and seq.max() <= 1.0


# pytest caches a fixture's outcome within a test, so each environment gets
# its own test.
def test_fashion_mnist_dir_fixture_skips_when_absent(request, monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv("LSTM_JAX_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install dataset-fashion-mnist"):
        request.getfixturevalue("fashion_mnist_dir")


def test_fashion_mnist_dir_fixture_fails_when_required(request, monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("LSTM_JAX_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="LSTM_JAX_REQUIRE_DATA=1 requires them"):
        request.getfixturevalue("fashion_mnist_dir")


def test_fashion_mnist_dir_fixture_finds_files(request, monkeypatch, tmp_path):
    write_dataset(tmp_path / "fm")
    monkeypatch.setenv("LSTM_JAX_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    monkeypatch.setenv("LSTM_JAX_REQUIRE_DATA", "1")
    assert request.getfixturevalue("fashion_mnist_dir") == tmp_path / "fm"
