"""MNIST / Fashion-MNIST loading for the sequence classifier, without TensorFlow.

The four IDX files of a dataset (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, gzipped or raw) come from one of two places:

* a local folder (``data_dir=``), read with no network at all -- e.g. Debian's
  ``dataset-fashion-mnist`` package installs them in
  ``/usr/share/datasets/fashion-mnist``;
* otherwise ``tensorflow_datasets.download.DownloadManager``, which downloads
  them once into TFDS's download folder and verifies the size and sha256 that
  TFDS registers for its ``mnist`` / ``fashion_mnist`` builders.  Only TFDS's
  pure-Python download code and checksum registry are used; TensorFlow is
  neither imported nor needed.

The IDX format is parsed with NumPy, every file is validated (magic number,
dtype, sizes, counts, label range, image size) and any problem raises
:class:`DataError` with a one-line message.  The parsed arrays are cached as an
``.npz`` (keyed by the dataset name and the source files' paths, sizes and
modification times) so that a second run starts at once.

The last ``val_size`` training images (5,000 by default, as in TensorFlow's
old ``input_data`` module the LSTM tutorials used) form a validation split for
checkpoint selection; the test split is meant for reporting only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
import uuid
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "DEFAULT_VAL_SIZE",
    "FILE_KEYS",
    "IDX_FILENAMES",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DataError",
    "Source",
    "Splits",
    "batch_indices",
    "default_cache_dir",
    "default_download_dir",
    "download_idx_files",
    "epoch_permutation",
    "find_idx_files",
    "load_dataset",
    "read_idx",
    "tfds_sources",
    "to_sequences",
    "validation_size",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SIZE = 28
DEFAULT_VAL_SIZE = 5000
# The training-set size the default ``val_size`` refers to; smaller training
# sets get a proportionally smaller validation split (see validation_size()).
_REFERENCE_TRAIN_SIZE = 60000

FILE_KEYS: tuple[str, ...] = ("train_images", "train_labels", "test_images", "test_labels")
IDX_FILENAMES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Bump when parsing/validation changes so that stale caches are not reused.
_CACHE_FORMAT = 1
_PROBE_TIMEOUT_S = 3.0

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_GZIP_MAGIC = b"\x1f\x8b"

_HOW_TO_GET_FILES = (
    "either download the 4 files {files} (e.g. from {base}) into a folder and pass "
    "data_dir=<folder> (--data-dir), or for Fashion-MNIST on Debian/Ubuntu run "
    "`apt-get install dataset-fashion-mnist` and pass "
    "data_dir=/usr/share/datasets/fashion-mnist"
)


class DataError(ValueError):
    """A dataset file or argument is missing, unreadable or malformed."""


class Source(NamedTuple):
    """Where to download one IDX file and what TFDS expects it to be.

    Attributes:
      url: http(s) URL of the (gzipped) file.
      size: expected size in bytes of the downloaded file.
      sha256: expected sha256 hex digest of the downloaded file.
    """

    url: str
    size: int
    sha256: str


class Splits(NamedTuple):
    """A dataset split into train / validation / test.

    Images are ``uint8`` arrays of shape ``[n, 28, 28]`` (row-major pixels,
    0 = background); labels are ``int32`` arrays of shape ``[n]`` with values
    in ``[0, NUM_CLASSES)``.  Validation examples are the *last* ``n_val``
    examples of the original training file and are not in ``train_*``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """Returns the file's bytes, gunzipped if it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: expected an IDX file, found a directory") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
    if not raw:
        raise DataError(f"{path}: file is empty; expected an IDX file")
    # Sniff the content rather than trusting the extension: a ".gz" that was
    # already gunzipped (or the reverse) is still read correctly.
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        data = gzip.decompress(raw)
    except EOFError:
        raise DataError(
            f"{path}: truncated gzip file (compressed stream ends early); "
            "re-download or re-copy it"
        ) from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e}); re-download or re-copy it") from e
    if not data:
        raise DataError(f"{path}: gzip file decompresses to nothing; expected an IDX file")
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (raw or gzipped) into a NumPy array.

    IDX layout: two zero bytes, a type code byte (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), a byte with the number
    of dimensions ``d``, ``d`` big-endian uint32 sizes, then the data in
    row-major big-endian order.

    Args:
      path: the file; gzip compression is detected from its content.

    Returns:
      A writable array of the file's shape (e.g. ``[n, 28, 28]`` for images,
      ``[n]`` for labels) in the native byte order of the file's dtype.

    Raises:
      DataError: missing/empty file, bad magic number, unknown type code, zero
        dimensions, truncated gzip, or data size disagreeing with the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: only {len(data)} bytes; expected an IDX header of at least 4 bytes"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected 0x0000 followed by "
            "a type code and a dimension count (is this an IDX file?)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: unknown IDX type code 0x{code:02X}; expected one of "
            + ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header; {ndim} dimensions need {header_len} bytes, "
            f"file has {len(data)}"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {what}; header says shape {'x'.join(map(str, shape))} "
            f"({expected} data bytes), file has {found} data bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # astype(copy) gives a writable array in native byte order.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _check_array(
    path: Path, array: np.ndarray, *, ndim: int, what: str
) -> None:
    """Checks that an IDX array is uint8 with the expected number of dims."""
    if array.dtype != np.uint8:
        raise DataError(
            f"{path}: {what} must have IDX type code 0x08 (unsigned byte), found "
            f"{array.dtype.name}"
        )
    if array.ndim != ndim:
        raise DataError(
            f"{path}: {what} must have {ndim} dimension(s), found shape "
            f"{'x'.join(map(str, array.shape))}"
        )


def _read_split(
    images_path: Path, labels_path: Path, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates one split's images [n, 28, 28] and labels [n]."""
    images = read_idx(images_path)
    _check_array(images_path, images, ndim=3, what=f"{split} images")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images, found "
            f"{images.shape[1]}x{images.shape[2]}"
        )
    labels = read_idx(labels_path)
    _check_array(labels_path, labels, ndim=1, what=f"{split} labels")
    if len(images) != len(labels):
        raise DataError(
            f"{split} images ({images_path.name}: {len(images)}) and labels "
            f"({labels_path.name}: {len(labels)}) have different counts"
        )
    if len(images) == 0:
        raise DataError(f"{images_path}: {split} split has 0 examples")
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range; "
            f"expected 0..{NUM_CLASSES - 1}"
        )
    return images, labels.astype(np.int32)


# --------------------------------------------------------------------------
# Locating the files: local folder or TFDS download
# --------------------------------------------------------------------------


def _normalize_name(name: str) -> str:
    norm = str(name).strip().lower().replace("-", "_")
    if norm not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return norm


def find_idx_files(data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Finds the four IDX files in a local folder.

    For each standard name (e.g. ``train-images-idx3-ubyte``) the raw file is
    preferred, then ``<name>.gz``; the ``train-images.idx3-ubyte`` spelling
    some mirrors use is accepted too.

    Args:
      data_dir: the folder.

    Returns:
      ``{key: path}`` for each key of :data:`FILE_KEYS`.

    Raises:
      DataError: the folder is missing, not a folder, empty, or lacks a file.
    """
    folder = Path(data_dir).expanduser()
    expected = ", ".join(f"{n}[.gz]" for n in IDX_FILENAMES.values())
    if not folder.exists():
        raise DataError(
            f"data_dir {folder} does not exist; expected a folder with the 4 IDX files {expected}"
        )
    if not folder.is_dir():
        raise DataError(f"data_dir {folder} is not a folder; expected a folder with {expected}")
    try:
        present = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise DataError(f"data_dir {folder}: cannot list folder ({e.strerror or e})") from e
    if not present:
        raise DataError(f"data_dir {folder} is empty; expected the 4 IDX files {expected}")
    found: dict[str, Path] = {}
    for key, base in IDX_FILENAMES.items():
        dotted = base.replace("-idx", ".idx")  # train-images.idx3-ubyte
        for candidate in (base, base + ".gz", dotted, dotted + ".gz"):
            if (folder / candidate).is_file():
                found[key] = folder / candidate
                break
        else:
            shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "")
            raise DataError(
                f"data_dir {folder} has no {base} or {base}.gz; expected the 4 IDX files "
                f"{expected}; found: {shown}"
            )
    return found


def default_download_dir() -> Path:
    """Returns TFDS's download folder (``$TFDS_DATA_DIR/downloads``).

    This is ``~/tensorflow_datasets/downloads`` unless ``TFDS_DATA_DIR`` is set.
    """
    from tensorflow_datasets.core import constants  # pylint: disable=import-outside-toplevel

    return Path(constants.DATA_DIR).expanduser() / "downloads"


def tfds_sources(name: str) -> dict[str, Source]:
    """Returns the URLs and registered checksums TFDS uses for a dataset.

    Both come from TFDS itself, without TensorFlow: the builder class's ``URL``
    (joined with the standard ``.gz`` file names, as the builder does) and its
    ``url_infos`` (the checksum file TFDS ships for the builder).

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"``.

    Returns:
      ``{key: Source}`` for each key of :data:`FILE_KEYS`.

    Raises:
      DataError: unknown name, or TFDS does not register a checksum for a URL.
    """
    name = _normalize_name(name)
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        builder = tfds.builder_cls(name)
        base_url = builder.URL
        url_infos = builder.url_infos or {}
    except Exception as e:  # any TFDS failure becomes one actionable message
        raise DataError(
            f"cannot read the {name} URLs/checksums from tensorflow_datasets ({e}); "
            "check that tensorflow-datasets and importlib_resources are installed"
        ) from e
    sources = {}
    for key, base in IDX_FILENAMES.items():
        url = urllib.parse.urljoin(base_url, base + ".gz")
        info = url_infos.get(url)
        if info is None:
            raise DataError(f"tensorflow_datasets registers no checksum for {url} ({name})")
        sources[key] = Source(url=url, size=int(info.size), sha256=str(info.checksum))
    return sources


def _proxy_for(url: str) -> str | None:
    """Returns the proxy URL requests would use for ``url``, if any."""
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies()
    if not proxies or urllib.request.proxy_bypass(host):
        return None
    scheme = urllib.parse.urlsplit(url).scheme
    return proxies.get(scheme) or proxies.get("all")


def _probe(url: str, timeout: float) -> str | None:
    """Tries a TCP connection to the URL's host (or its proxy).

    Returns None if it connects, else a short reason.  The connection runs in
    a daemon thread joined with a deadline, because name resolution has no
    timeout of its own and may hang on a misconfigured offline machine.
    """
    target = _proxy_for(url) or url
    parts = urllib.parse.urlsplit(target if "://" in target else "http://" + target)
    host = parts.hostname
    if not host:
        return f"no host in URL {target!r}"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"bad port in URL {target!r}"
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=attempt, name="lstm_jax-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    where = f"{host}:{port}" + (" (proxy)" if target is not url else "")
    if not result:
        return f"cannot reach {where}: no answer within {timeout:g} s"
    return None if result[0] is None else f"cannot reach {where}: {result[0]}"


def _already_downloaded(manager, urls: list[str]) -> bool:
    """Whether TFDS has all ``urls`` cached (so no network is needed).

    Uses a private DownloadManager method; if TFDS changes it we merely
    answer False and run the connectivity probe, which costs at most seconds.
    """
    try:
        from tensorflow_datasets.core.download import resource as resource_lib  # pylint: disable=import-outside-toplevel

        for url in urls:
            res = resource_lib.Resource(url=url)
            if not (
                manager._get_checksum_dl_result(res)  # pylint: disable=protected-access
                or manager._get_checksum_dl_result(res, legacy_mode=True)  # pylint: disable=protected-access
            ):
                return False
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def download_idx_files(
    name: str,
    download_dir: str | os.PathLike[str] | None = None,
    *,
    sources: Mapping[str, Source] | None = None,
    probe_timeout: float = _PROBE_TIMEOUT_S,
) -> dict[str, Path]:
    """Downloads (or finds already downloaded) IDX files with TFDS.

    ``tfds.download.DownloadManager`` downloads each file once, verifies its
    size and sha256 and keeps it in ``download_dir``.  Unless every file is
    already there, a TCP connection to the first URL's host (or proxy) is
    tried first, so that an offline machine fails within ``probe_timeout``
    seconds instead of after TFDS's retries (TFDS keeps its own retries, up to
    10 with backoff, for HTTP 5xx answers once the host is reachable).  Files
    are downloaded one at a time, so an error names the file concerned.

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"`` (also the sub-folder of
        ``download_dir`` TFDS uses).
      download_dir: where TFDS keeps downloads; default
        :func:`default_download_dir`.
      sources: ``{key: Source}`` for each of :data:`FILE_KEYS`; default
        :func:`tfds_sources` ``(name)``.  Mainly for tests and mirrors.
      probe_timeout: seconds to wait for the connectivity probe.

    Returns:
      ``{key: path of the downloaded (still gzipped) file}``.

    Raises:
      DataError: offline, download failed, or a file's checksum or size does
        not match (the bad download is deleted).
    """
    name = _normalize_name(name)
    sources = dict(tfds_sources(name) if sources is None else sources)
    missing = [k for k in FILE_KEYS if k not in sources]
    if missing:
        raise DataError(f"sources lacks {', '.join(missing)}; expected keys {', '.join(FILE_KEYS)}")
    download_dir = Path(download_dir).expanduser() if download_dir else default_download_dir()
    urls = [sources[k].url for k in FILE_KEYS]

    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        from tensorflow_datasets.core import utils as tfds_utils  # pylint: disable=import-outside-toplevel
        from tensorflow_datasets.core.download import checksums  # pylint: disable=import-outside-toplevel

        url_infos = {
            s.url: checksums.UrlInfo(
                size=tfds_utils.Size(s.size),
                checksum=s.sha256,
                filename=urllib.parse.urlsplit(s.url).path.rsplit("/", 1)[-1] or None,
            )
            for s in sources.values()
        }
        manager = tfds.download.DownloadManager(
            download_dir=download_dir, url_infos=url_infos, dataset_name=name
        )
    except OSError as e:
        raise DataError(f"cannot use download_dir {download_dir} ({e})") from e
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot set up the tensorflow_datasets DownloadManager ({e})") from e

    if not _already_downloaded(manager, urls):
        reason = _probe(urls[0], probe_timeout)
        if reason is not None:
            base = urls[0].rsplit("/", 1)[0] + "/"
            files = ", ".join(IDX_FILENAMES[k] + ".gz" for k in FILE_KEYS)
            raise DataError(
                f"{name} is not downloaded yet and the network is unavailable ({reason}); "
                + _HOW_TO_GET_FILES.format(files=files, base=base)
            )

    # One file at a time: a failure then names its file, and no other
    # download is still writing when we clean up after it.
    paths: dict[str, Path] = {}
    subdir = download_dir / name
    for key in FILE_KEYS:
        source = sources[key]
        # TFDS downloads into "<file>.tmp.<uuid>" folders and leaves them
        # behind on a checksum error; remember what existed to delete only ours.
        before = set(subdir.glob("*.tmp.*")) if subdir.is_dir() else set()
        try:
            paths[key] = Path(os.fspath(manager.download(source.url)))
        except Exception as e:  # pylint: disable=broad-except
            if subdir.is_dir():
                for leftover in set(subdir.glob("*.tmp.*")) - before:
                    _remove_tree(leftover)
            if type(e).__name__ == "NonMatchingChecksumError":
                raise DataError(_checksum_message(name, source, str(e))) from e
            detail = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise DataError(
                f"downloading {source.url} for {name} failed ({type(e).__name__}: {detail}); "
                + _HOW_TO_GET_FILES.format(
                    files=", ".join(IDX_FILENAMES[k] + ".gz" for k in FILE_KEYS),
                    base=source.url.rsplit("/", 1)[0] + "/",
                )
            ) from e
    return paths


def _checksum_message(name: str, source: Source, tfds_message: str) -> str:
    """One-line message for TFDS's multi-line NonMatchingChecksumError."""
    got = re.search(r"Got: UrlInfo\(size=([^,]+), checksum='([0-9a-f]+)'", tfds_message)
    found = f"got sha256 {got.group(2)} ({got.group(1)})" if got else "got a different file"
    return (
        f"{name}: download of {source.url} refused, its checksum does not match: expected "
        f"sha256 {source.sha256} ({source.size} bytes), {found}; the bad download was "
        "deleted (a mirror or proxy may serve a different file), retry later or pass data_dir"
    )


def _remove_tree(path: Path) -> None:
    """Best-effort removal of a TFDS temporary download folder."""
    try:
        if path.is_dir():
            for child in path.iterdir():
                child.unlink(missing_ok=True)
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


# --------------------------------------------------------------------------
# Cache of parsed arrays
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Returns the folder for parsed-array caches.

    ``$LSTM_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lstm_jax``, else
    ``~/.cache/lstm_jax``.
    """
    if os.environ.get("LSTM_JAX_CACHE_DIR"):
        return Path(os.environ["LSTM_JAX_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lstm_jax"


def _cache_key(name: str, files: Mapping[str, Path]) -> str:
    """Hash of the dataset name and each source file's path, size and mtime."""
    entries: list = [name, _CACHE_FORMAT]
    for key in FILE_KEYS:
        path = Path(files[key])
        try:
            st = path.stat()
        except OSError as e:
            raise DataError(f"{path}: cannot stat file ({e.strerror or e})") from e
        entries.append([key, str(path.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:20]


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Returns the cached arrays, or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in FILE_KEYS}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if (
                images.dtype != np.uint8
                or images.ndim != 3
                or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
                or labels.dtype != np.int32
                or labels.shape != images.shape[:1]
            ):
                raise ValueError("unexpected arrays")
        return arrays
    except Exception as e:  # pylint: disable=broad-except
        # A damaged cache is only a lost speed-up: re-parse and overwrite it.
        warnings.warn(f"ignoring unreadable dataset cache {path} ({e})", stacklevel=3)
        return None


def _save_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes the arrays atomically (temp file + os.replace); never raises."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name in the same folder (so os.replace is atomic); opened
        # with "xb" rather than mkstemp so that the umask, not 0600, applies.
        tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp_name, "xb") as f:
            # Uncompressed: loading is then as fast as reading the file.
            np.savez(f, **{k: arrays[k] for k in FILE_KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path} ({e}); continuing without", stacklevel=3)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------


def validation_size(num_train: int, val_size: int = DEFAULT_VAL_SIZE) -> int:
    """Returns how many of ``num_train`` training examples go to validation.

    Rule: ``val_size`` for the full 60,000-image training sets; for smaller
    training sets the same fraction, ``round(num_train * val_size / 60000)``,
    at least 1, capped at ``val_size``; always leaving at least one training
    example.  ``val_size=0`` means no validation split.

    Args:
      num_train: number of examples in the training file.
      val_size: requested validation size for a 60,000-example training set.

    Returns:
      The number of validation examples, in ``[0, num_train - 1]``.

    Raises:
      DataError: ``val_size`` is negative or not an integer.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or val_size < 0:
        raise DataError(f"val_size must be an integer >= 0, got {val_size!r}")
    if val_size == 0 or num_train <= 1:
        return 0
    proportional = max(1, round(num_train * int(val_size) / _REFERENCE_TRAIN_SIZE))
    return int(min(int(val_size), proportional, num_train - 1))


def _read_all(files: Mapping[str, Path]) -> dict[str, np.ndarray]:
    train_images, train_labels = _read_split(files["train_images"], files["train_labels"], "train")
    test_images, test_labels = _read_split(files["test_images"], files["test_labels"], "test")
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


def load_dataset(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    val_size: int = DEFAULT_VAL_SIZE,
    sources: Mapping[str, Source] | None = None,
    probe_timeout: float = _PROBE_TIMEOUT_S,
) -> Splits:
    """Loads MNIST or Fashion-MNIST as train / validation / test splits.

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"`` (``"fashion-mnist"`` works too).
      data_dir: local folder with the 4 IDX files (see :func:`find_idx_files`);
        when given, the network is never used.
      download_dir: TFDS download folder when ``data_dir`` is None; default
        :func:`default_download_dir`.
      cache_dir: folder for the parsed-array cache; default
        :func:`default_cache_dir`.
      use_cache: read/write the parsed-array cache.
      val_size: validation examples taken from the end of the training file;
        see :func:`validation_size` for small datasets.  0 = none.
      sources: override the download URLs/checksums (see
        :func:`download_idx_files`).
      probe_timeout: seconds for the offline check before downloading.

    Returns:
      :class:`Splits` with uint8 images ``[n, 28, 28]`` and int32 labels
      ``[n]``; 55,000 / 5,000 / 10,000 examples for the real datasets.

    Raises:
      DataError: see :func:`read_idx`, :func:`find_idx_files` and
        :func:`download_idx_files`; also images/labels of different counts,
        labels outside 0..9, images that are not 28x28.
    """
    name = _normalize_name(name)
    validation_size(0, val_size)  # validate the argument before any I/O
    if data_dir is not None:
        files = find_idx_files(data_dir)
    else:
        files = download_idx_files(
            name, download_dir, sources=sources, probe_timeout=probe_timeout
        )

    arrays = None
    cache_path = None
    if use_cache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_path = folder / f"{name}-{_cache_key(name, files)}.npz"
        arrays = _load_cache(cache_path)
    if arrays is None:
        arrays = _read_all(files)
        if cache_path is not None:
            _save_cache(cache_path, arrays)

    n_train = len(arrays["train_images"])
    n_val = validation_size(n_train, val_size)
    cut = n_train - n_val
    return Splits(
        train_images=arrays["train_images"][:cut],
        train_labels=arrays["train_labels"][:cut],
        val_images=arrays["train_images"][cut:],
        val_labels=arrays["train_labels"][cut:],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
    )


def to_sequences(images: np.ndarray) -> np.ndarray:
    """Turns uint8 images into float32 pixel sequences scaled to [0, 1].

    Each image of ``rows`` x ``cols`` pixels is read as ``rows`` timesteps of
    ``cols`` features (28 timesteps of 28 pixels for MNIST).

    Args:
      images: uint8 array ``[..., rows, cols]``, e.g. ``[n, 28, 28]``.

    Returns:
      float32 array of the same shape, ``images / 255``.

    Raises:
      DataError: not uint8 or fewer than 2 dimensions.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"to_sequences expects uint8 images, got dtype {images.dtype}")
    if images.ndim < 2:
        raise DataError(
            f"to_sequences expects images of shape [..., rows, cols], got shape {images.shape}"
        )
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


def _check_nonneg_int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Returns the example order for one epoch, a pure function of its args.

    The generator is seeded with ``(seed, epoch)``, so a run resumed at epoch
    ``e`` sees exactly the order the uninterrupted run would have (for a given
    NumPy version), without replaying earlier epochs.

    Args:
      num_examples: dataset size ``n``.
      seed: non-negative run seed.
      epoch: non-negative epoch number.

    Returns:
      int64 array ``[n]``, a permutation of ``0..n-1``.
    """
    n = _check_nonneg_int(num_examples, "num_examples")
    seed = _check_nonneg_int(seed, "seed")
    epoch = _check_nonneg_int(epoch, "epoch")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """Returns one epoch's shuffled example indices grouped in full batches.

    The trailing ``num_examples % batch_size`` examples of the epoch's
    permutation are dropped so that every batch has the same shape (one jit
    compilation); since the permutation changes every epoch, different
    examples are dropped each time.

    Args:
      num_examples: dataset size ``n``.
      batch_size: examples per batch, ``1 <= batch_size <= n``.
      seed: non-negative run seed.
      epoch: non-negative epoch number.

    Returns:
      int64 array ``[n // batch_size, batch_size]``; deterministic in
      ``(num_examples, batch_size, seed, epoch)``.

    Raises:
      DataError: non-positive batch size, or larger than ``num_examples``.
    """
    n = _check_nonneg_int(num_examples, "num_examples")
    batch_size = _check_nonneg_int(batch_size, "batch_size", minimum=1)
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the {n} examples")
    perm = epoch_permutation(n, seed=seed, epoch=epoch)
    num_batches = n // batch_size
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size)
