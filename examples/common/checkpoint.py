"""Checkpoints and result files written atomically: a killed run never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHECKPOINT = "checkpoint.pt"  # a run's checkpoint in its folder


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file in ``path``'s folder to write; flushed to disk and renamed over ``path`` when the
    block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save ``state`` to ``path`` atomically.

    Streamed into the temporary file rather than serialised in memory first, so saving costs no
    memory beyond the state itself (a full-size model and its optimizer state are about 160 MB).
    ``state`` must hold only what ``load_checkpoint`` accepts: tensors, numbers, strings, None and
    lists/tuples/dicts of them (state dicts of modules, optimizers and schedulers are such).
    """
    with _atomic_file(path) as f:
        torch.save(state, f)


def _unsafe_reason(exc: Exception) -> str:
    """The line of a torch.load error that says what was wrong, without torch's general advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    specific = [line for line in lines if "weights_only" not in line and "documentation" not in line]
    return f"{type(exc).__name__}: {(specific or lines or ['no detail'])[0]}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved at ``path`` by ``save_checkpoint``, or None if there is none yet.

    Loads with ``weights_only=True``: the file may hold only tensors and plain Python values, so a
    tampered or foreign file cannot run code. Anything else (another kind of file, a truncated one,
    a pickle that refers to other objects) raises RuntimeError naming the file.
    """
    path = Path(path)
    if not path.exists():
        return None

    def refuse(reason: str) -> RuntimeError:
        return RuntimeError(f"checkpoint {path}: not a gpoe_fusion checkpoint or unsafe to load ({reason}); "
                            "delete it to start over")

    try:
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
    except OSError as exc:
        raise RuntimeError(f"checkpoint {path}: cannot be read ({exc})") from exc
    if not is_zip:  # torch.save writes a zip archive; this also catches truncated files
        raise refuse("not a torch zip archive: truncated, or another kind of file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise RuntimeError(f"checkpoint {path}: cannot be read ({exc})") from exc
    except Exception as exc:
        raise refuse(_unsafe_reason(exc)) from exc
    if not isinstance(state, dict):
        raise refuse(f"it holds a {type(state).__name__}, not a dict")
    return state


def write_json(path: str | Path, obj: Any) -> None:
    """JSON-dump ``obj`` (indented) to ``path`` atomically."""
    with _atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())
