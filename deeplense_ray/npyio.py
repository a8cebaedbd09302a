""".npy files from outside the project, read so that data never runs code.

``np.load(allow_pickle=True)`` unpickles an object array with the whole pickle machinery: a crafted file runs
any command. Here an object array (the published DeepLense axion layout ``[image, axion_mass]``) is read by an
unpickler that builds only numpy arrays, dtypes and scalars, plain numbers, strings, lists and tuples; a file
that asks for any other class is refused with :class:`NpyError` naming the file and the class
(``module.name``). Plain (numeric) arrays never touch pickle and are memory-mapped when large.

Every header is checked against the file size before the data is read: a truncated file, or one with bytes
after its data, is an error naming it.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Plain arrays with at least this many data bytes are memory-mapped (read-only) instead of read whole.
MMAP_MIN_BYTES = 16 << 20


class NpyError(ValueError):
    """A .npy file that is unreadable, inconsistent or asks to run code; the message names it."""


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # bytes before the data
    file_size: int

    @property
    def is_object(self) -> bool:
        return bool(self.dtype.hasobject)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data of a plain array (0 for an object array, whose data is a pickle)."""
        return 0 if self.is_object else math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str | os.PathLike[str]) -> NpyHeader:
    """The header of a .npy file, checked against the file size; NpyError naming the file."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read(fh)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise NpyError(f"{path}: unreadable .npy file: {exc}") from None
    header = NpyHeader(tuple(int(v) for v in shape), np.dtype(dtype), bool(fortran_order), offset, size)
    if header.is_object:
        if size <= offset:
            raise NpyError(f"{path}: object array header without data (file of {size} bytes)")
        return header
    want = offset + header.data_bytes
    if size != want:
        what = "truncated" if size < want else f"{size - want} bytes after the data"
        raise NpyError(
            f"{path}: the header says {list(header.shape)} {header.dtype} ({want} bytes with the header), "
            f"the file has {size} bytes ({what})"
        )
    return header


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What np.save's pickle of an object array of arrays and numbers needs, under the module names numpy 1
    (``numpy.core``) and numpy 2 (``numpy._core``) write; ``_codecs.encode`` rebuilds bytes in protocol-2
    pickles (it turns a str into bytes, nothing more)."""
    import codecs

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class RefusedClassError(pickle.UnpicklingError):
    """The pickle of a .npy file asked for a class or function outside the admitted set."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, path: Any):
        super().__init__(fh, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedClassError(
                f"{self._path}: refused to unpickle {module}.{name}: a .npy object array may hold only numpy "
                "arrays, dtypes, scalars, numbers, strings, lists and tuples (data files never run code)"
            ) from None


def _load_object_array(path: Path, header: NpyHeader) -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(header.offset)
        try:
            array = _DataOnlyUnpickler(fh, path).load()
        except RefusedClassError as exc:
            raise NpyError(str(exc)) from None
        except Exception as exc:  # a malformed pickle raises anything: each one is a bad file
            raise NpyError(f"{path}: unreadable object array: {type(exc).__name__}: {exc}") from None
        end = fh.tell()
    if not isinstance(array, np.ndarray):
        raise NpyError(f"{path}: the object array's pickle holds a {type(array).__name__}, not an array")
    if tuple(array.shape) != header.shape:
        raise NpyError(f"{path}: the header says shape {list(header.shape)}, the data {list(array.shape)}")
    if end != header.file_size:
        raise NpyError(f"{path}: {header.file_size - end} bytes after the object array's data")
    return array


def read_npy(path: str | os.PathLike[str], *, mmap_min_bytes: int = MMAP_MIN_BYTES) -> np.ndarray:
    """The array of a .npy file: an object array through the data-only unpickler, a plain array read whole
    or, from ``mmap_min_bytes`` of data, memory-mapped read-only. NpyError naming the file."""
    path = Path(path)
    header = read_header(path)
    if header.is_object:
        return _load_object_array(path, header)
    try:
        if header.data_bytes >= mmap_min_bytes:
            order = "F" if header.fortran_order else "C"
            return np.memmap(path, header.dtype, "r", header.offset, header.shape, order)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise NpyError(f"{path}: unreadable .npy file: {exc}") from None
