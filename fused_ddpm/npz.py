""".npz files that are the same bytes for the same arrays, written atomically.

``np.savez`` leaves the zip entry metadata to numpy's and Python's defaults, which have
changed between versions (older numpy stamped the current time into every entry, so two
identical runs gave different files). :class:`NpzWriter` writes the layout ``np.load``
reads (stored, uncompressed, zip64 ``.npy`` entries, as ``np.savez``) with every metadata
field fixed: date 1980-01-01 00:00:00, made on Unix, permissions 0644. :func:`atomic_npz` writes to a temporary file
in the target's directory and renames it over the target only once everything is written
and flushed to disk, so an interrupted run never leaves a file under the final name.

Arrays can be streamed in chunks (:meth:`NpzWriter.stream`), so a large sample set is never
held in memory twice.
"""
from __future__ import annotations

import contextlib
import os
import uuid
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, Union

import numpy as np

__all__ = ["NpzWriter", "atomic_npz", "atomic_file", "save_npz"]

ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip entry can hold
_UNIX = 3                          # zip "made by" system: Unix (file mode in external_attr)
_MODE = 0o644


class NpzWriter:
    """Write ``.npy`` entries with fixed metadata into an open binary file ``fileobj``."""

    def __init__(self, fileobj: BinaryIO):
        self._zip = zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)

    def _entry(self, name: str) -> BinaryIO:
        info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.create_system = _UNIX
        info.external_attr = _MODE << 16
        return self._zip.open(info, mode="w", force_zip64=True)

    def array(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` as entry ``name.npy`` (exactly what ``np.save`` writes)."""
        with self._entry(name) as f:
            np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

    @contextlib.contextmanager
    def stream(self, name: str, shape: Sequence[int], dtype) -> Iterator[Callable[[np.ndarray], None]]:
        """Write entry ``name.npy`` of ``shape`` and ``dtype`` chunk by chunk.

        Yields ``put(chunk)``; chunks are C-ordered slices along the first axis, in order.
        Raises ``ValueError`` if the chunks do not add up to ``shape`` exactly.
        """
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        row = tuple(shape[1:])
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": shape}
        rows = 0
        with self._entry(name) as f:
            np.lib.format.write_array_header_1_0(f, header)

            def put(chunk: np.ndarray) -> None:
                nonlocal rows
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != dtype or tuple(chunk.shape[1:]) != row:
                    raise ValueError(f"{name}: chunk {chunk.dtype} {list(chunk.shape)} does not "
                                     f"fit {dtype} {list(shape)}")
                if rows + chunk.shape[0] > shape[0]:
                    raise ValueError(f"{name}: more than {shape[0]} rows written")
                f.write(chunk.data)
                rows += chunk.shape[0]

            yield put
            if rows != shape[0]:
                raise ValueError(f"{name}: {rows} rows written, {shape[0]} declared")

    def close(self) -> None:
        self._zip.close()


@contextlib.contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block completes.

    It is written as a hidden temporary file in ``path``'s directory, flushed and fsynced,
    then renamed over ``path`` (atomic on POSIX and Windows); on any error it is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_npz(path: Union[str, Path]) -> Iterator[NpzWriter]:
    """Yield an :class:`NpzWriter` whose file becomes ``path`` only if the block completes."""
    with atomic_file(path) as f:
        writer = NpzWriter(f)
        try:
            yield writer
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close()          # the file is discarded; just release the zip
            raise
        writer.close()


def save_npz(path: Union[str, Path], *arrays: np.ndarray) -> None:
    """Like ``np.savez(path, *arrays)`` (entries ``arr_0``, ``arr_1``, …), but byte-for-byte
    reproducible and atomic."""
    with atomic_npz(path) as w:
        for i, a in enumerate(arrays):
            w.array(f"arr_{i}", a)
