"""Atomic writes: every artifact appears complete under its final name, or not at all.

A file or folder is built under a temporary sibling name, synced, and renamed into place; an
existing target is replaced only with `overwrite=True` (and then by a rename too, so a reader
never sees a half-written one). The temporary is removed if anything fails, disk full included.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path, write: Callable[[str], None], *, overwrite: bool = False) -> str:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it onto `path`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies, unlike mkstemp
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_path(directory)
    return path


def write_json_atomic(path, obj: Any, *, overwrite: bool = True) -> str:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    return write_file_atomic(path, write, overwrite=overwrite)


def write_dir_atomic(folder, files: Mapping[str, Callable[[str], None]], *, overwrite: bool = False) -> str:
    """Create `folder` holding `files` ({name: writer(path)}) in a temporary sibling, then rename it.

    An existing non-empty folder (or a file) at `folder` is refused unless `overwrite`.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        for name, write in files.items():
            write(os.path.join(tmp, name))
        if os.path.exists(folder):
            old = tmp + ".old"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        fsync_path(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
