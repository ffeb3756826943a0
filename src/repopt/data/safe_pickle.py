"""Load the Python pickles that CIFAR ships, refusing anything that is not plain data.

pickle can call any importable function while loading, so a downloaded "dataset" could run code. The CIFAR files only
need dicts, lists, strings, ints and numpy arrays; everything else is refused before it is imported.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

try:  # numpy >= 2 moved the internals to numpy._core; old pickles still name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

from .errors import DataError


class _ArrayType:
    """What the pickle gets for numpy.ndarray: a stand-in only `_empty_array` accepts. The class itself, called (by
    REDUCE) or passed to _reconstruct with a shape, would hand back an array of uninitialised memory (as large as the
    pickle asks for) that no __setstate__ ever fills."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refused numpy.ndarray called directly (it returns uninitialised memory)")


_ARRAY = _ArrayType()


def _empty_array(subtype, shape, dtype):
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by __setstate__ with the data
    if subtype is not _ARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"refused numpy _reconstruct with shape {shape!r} (numpy writes (0,), then the "
                                     f"data)")
    return _multiarray._reconstruct(np.ndarray, (0,), dtype)


# (module, name) -> object. Resolved here rather than imported by name, so that an old "numpy.core" reference neither
# triggers numpy 2's deprecation shim nor depends on which numpy wrote the file.
_ALLOWED = {
    ("numpy", "ndarray"): _ARRAY,
    ("numpy", "dtype"): np.dtype,
    # protocols 0-4: arrays are rebuilt by _reconstruct + __setstate__; numpy scalars by scalar()
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    # protocol 5: contiguous arrays are rebuilt from an out-of-band-capable buffer
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
}


_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocols 0-2; allow exactly that call.
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in _LATIN1:
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED[("_codecs", "encode")] = _latin1_encode


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the CIFAR files were written by Python 2
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path} is not a plain-data pickle: it asks to load {module}.{name}, which could run code, "
                f"so it was refused (only dicts, lists, strings, numbers and numpy arrays are allowed)."
            ) from None

    def persistent_load(self, pid):
        raise DataError(f"{self._path} uses pickle persistent ids, which a CIFAR data file never does; refused.")


def load_plain_pickle(path: str | Path):
    """Unpickle ``path`` allowing only builtin containers, numbers, strings and numpy arrays.

    Raises DataError for a missing, truncated or corrupt file, and for any pickle that names another global.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except OSError as e:
        raise DataError(f"{path} could not be read: {e.strerror or e}.") from None
    except EOFError:
        raise DataError(f"{path} is truncated (the pickle ends early); download it again.") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, ValueError, TypeError, ... from a damaged stream
        if "truncated" in str(e):  # a cut-off stream may also surface as UnpicklingError
            raise DataError(f"{path} is truncated (the pickle ends early); download it again.") from None
        raise DataError(f"{path} is not a valid pickle ({type(e).__name__}: {e}); download it again.") from None
