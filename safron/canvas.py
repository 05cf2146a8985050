"""The on-disk canvas that finished rows are written to, and the journal that makes renders resumable.

The canvas is a raw uint8 RGB file (height x width x 3, row-major) next to the output. The accumulator
finalises rows straight into a memory-mapped window of it; each window is unmapped as soon as it is written,
because mapped pages count in the process's resident memory and a whole-slide canvas is tens of gigabytes.

The journal is a JSON-lines file: a header that pins everything that determines the output bytes (mask
identity, model hash, geometry, blend, batch size), then one line per finished band with the number of rows
that are final on the canvas. A band's line is appended only after its rows are flushed to disk, so after a
crash the journal never claims rows the canvas does not hold.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import SafronInputError


def side_paths(out_path: Path) -> tuple[Path, Path]:
    """(canvas, journal) paths for a render to `out_path`: next to it, named after it, so users see what they are."""
    return out_path.with_name(out_path.name + ".safron-canvas"), out_path.with_name(out_path.name + ".safron-journal")


class Canvas:
    def __init__(self, path: Path, height: int, width: int, *, create: bool):
        self.path, self.height, self.width = Path(path), height, width
        self.row_bytes = width * 3
        size = height * self.row_bytes
        if create:
            # Sparse: no disk blocks are used until rows are written.
            with open(self.path, "wb") as f:
                f.truncate(size)
        elif not self.path.is_file() or self.path.stat().st_size != size:
            raise SafronInputError(f"cannot resume: canvas {self.path} is missing or has the wrong size")

    @contextmanager
    def rows(self, y0: int, y1: int):
        """A writable (y1-y0, width, 3) view of canvas rows, flushed to disk and unmapped on exit."""
        view = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=y0 * self.row_bytes, shape=(y1 - y0, self.width, 3))
        try:
            yield view
            view.flush()
        finally:
            del view

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Journal:
    """Append-only record of finished bands; `header` must match exactly for a resume to be allowed."""

    def __init__(self, path: Path, header: dict, *, resume: bool):
        self.path = Path(path)
        self.header = header
        self.rows_done = 0
        if resume:
            self.rows_done = self._load()
        else:
            with open(self.path, "w") as f:
                f.write(json.dumps(header, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._file = open(self.path, "a")

    def _load(self) -> int:
        try:
            lines = self.path.read_text().splitlines()
            saved = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            raise SafronInputError(f"cannot resume: no readable journal at {self.path}") from None
        for key, value in self.header.items():
            if saved.get(key) != value:
                raise SafronInputError(
                    f"cannot resume: {key} differs from the interrupted render ({saved.get(key)!r} != {value!r})"
                )
        rows_done = 0
        for line in lines[1:]:
            try:
                rows_done = int(json.loads(line)["rows_done"])
            except (ValueError, KeyError, TypeError):
                break  # a line torn by the crash: everything before it is valid
        return rows_done

    def record(self, rows_done: int) -> None:
        self._file.write(json.dumps({"rows_done": rows_done}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows_done = rows_done

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
