"""Writing a file so that its name holds the complete file or nothing: the content goes to a temporary name beside it
(the same directory, so that the rename is atomic) and is renamed onto the name only when complete; the temporary
file is removed on any failure. Every writer of a finished file (checkpoints, exported models, masks, TensorRT
engine caches) goes through here; resumable outputs (the pyramidal TIFF, an OME-Zarr store) are built under
`partial_path`, which a resumed render reopens. A folder (an OME-Zarr store) is renamed into place by
`replace_folder`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """Where a resumable output (the pyramidal TIFF, an OME-Zarr store) is built before it is renamed onto `path`: a
    fixed name, unlike `temporary_beside`'s, because a render's journal names it and a resumed render reopens it."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def temporary_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name in `path`'s directory, hidden and unique to this call (concurrent writers of one name do not
    collide); whatever is there is removed on exit unless it was renamed away. The file is left to its writer to
    create, so that it gets the permissions the user's umask gives (mkstemp's would be private)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name to write `path`'s content to; when the block ends without an exception, rename it onto
    `path` (replacing what was there)."""
    with temporary_beside(path) as temporary:
        yield temporary
        os.replace(temporary, path)


def replace_folder(complete: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the folder `complete` onto `path`. A folder already at `path` is moved aside first and removed after (a
    folder cannot be renamed onto a full one), so that `path` names the old folder or the new one, never a mix."""
    path = Path(path)
    aside = None
    if path.exists():
        aside = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
        os.replace(path, aside)
    os.replace(complete, path)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
