"""RHD's annotation pickle (``anno_<split>.pickle``, written by Python 2: read with ``encoding="latin1"``), read without
trusting it: a pickle can call any importable function while it loads, so ``RestrictedUnpickler`` resolves only builtin
containers, scalars and the running numpy's functions that numpy pickles name (``numpy.core.*``, ``numpy._core.*``)."""

import builtins
import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

NUM_KEYPOINTS = 42
_ENTRY_SHAPES = {"xyz": (NUM_KEYPOINTS, 3), "uv_vis": (NUM_KEYPOINTS, 3), "K": (3, 3)}


class AnnotationError(ValueError):
    """An annotation file that is missing its structure, is truncated, or holds malformed entries."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global outside the admitted table (a possible code-execution payload)."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles call it to rebuild ``bytes``, restricted to latin-1."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # From numpy's own reductions, not private modules by name: the running numpy's functions, whichever wrote the file.
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        table.update({(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar,
                      (f"{core}.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0]})
    return table


_BUILTIN_NAMES = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool")
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__") for name in _BUILTIN_NAMES},
    ("_codecs", "encode"): _latin1_bytes, **_numpy_globals(),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler of a binary ``file`` that admits only plain containers, str/bytes/int/float/bool/None and numpy
    arrays, dtypes and scalars: any other global raises UnsafePickleError naming ``path`` and ``module.name``."""

    def __init__(self, file: io.BufferedIOBase, path: str | os.PathLike):
        super().__init__(file, encoding="latin1")
        self.path = Path(path)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self.path}: refusing to load global '{module}.{name}' (only plain containers, "
                                    "numbers, strings and numpy arrays are admitted in an annotation pickle)") from None


def _validate_entry(path: Path, key: Any, entry: Any) -> tuple[int, dict[str, np.ndarray]]:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        raise AnnotationError(f"{path}: sample ids must be integers, got {key!r}")
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: sample {key}: expected a dict with 'xyz', 'uv_vis', 'K', got "
                              f"{type(entry).__name__}")
    checked = {}
    for field, shape in _ENTRY_SHAPES.items():
        if field not in entry:
            raise AnnotationError(f"{path}: sample {key}: missing field '{field}'")
        try:
            value = np.asarray(entry[field], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise AnnotationError(f"{path}: sample {key}: field '{field}' is not numeric ({error})") from error
        if value.shape != shape:
            raise AnnotationError(f"{path}: sample {key}: field '{field}' must have shape {shape}, got {value.shape}")
        if not np.all(np.isfinite(value)):
            raise AnnotationError(f"{path}: sample {key}: field '{field}' holds non-finite values")
        checked[field] = value
    return int(key), checked


def load_annotations(path: str | os.PathLike) -> dict[int, dict[str, np.ndarray]]:
    """An RHD annotation pickle read with ``RestrictedUnpickler`` and checked: ``{sample_id: {'xyz': [42, 3] metres,
    camera frame, 'uv_vis': [42, 3] pixel u, v and a visibility flag (visible iff == 1), 'K': [3, 3]}}`` (keypoints
    0..20 left hand, 21..41 right) as float64 arrays, by sample id (other fields dropped). FileNotFoundError,
    UnsafePickleError (a refused global) or AnnotationError (a corrupt file, malformed entries), naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RHD annotation file not found: {path}")
    with open(path, "rb") as file:
        try:
            data = RestrictedUnpickler(file, path).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # a corrupt pickle can fail with almost any exception type
            raise AnnotationError(f"{path}: no readable annotation pickle ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a dict sample_id -> entry, got {type(data).__name__}")
    entries = dict(_validate_entry(path, key, entry) for key, entry in data.items())
    return {key: entries[key] for key in sorted(entries)}


def save_annotations(path: str | os.PathLike, annotations: dict[int, dict[str, np.ndarray]], protocol: int = 4) -> None:
    """Write ``annotations`` (``{sample_id: {'xyz', 'uv_vis', 'K'}}``) in the RHD pickle layout, as float32 arrays in
    ascending sample-id order, so equal input gives byte-identical files."""
    path = Path(path)
    entries = dict(_validate_entry(path, key, entry) for key, entry in annotations.items())
    payload = {key: {field: entries[key][field].astype(np.float32) for field in _ENTRY_SHAPES}
               for key in sorted(entries)}
    with open(path, "wb") as file:
        pickle.dump(payload, file, protocol=protocol)
