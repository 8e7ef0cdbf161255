"""Atomic writes: every artifact appears complete under its final name, or not at all.

A file or folder is built under a temporary sibling name, synced, and renamed into place; an
existing target is replaced only with `overwrite=True` (and then by a rename too, so a reader
never sees a half-written one). The temporary is removed if anything fails, disk full included.

`workdir_lock` keeps two processes out of one workdir: an exclusive `fcntl.flock` on a lock
file, which the OS drops when its holder exits or is killed, so no stale lock survives a crash.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator, Mapping


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
    return write_file_atomic(path, lambda tmp: _write_json(tmp, obj), overwrite=overwrite)


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


# ------------------------------------------------------------------------------- workdir lock

LOCK_FILE = ".lock"


class WorkdirLockedError(FileExistsError):
    """Another live process holds the workdir's lock."""


def lock_path(workdir, *, beside: bool = False) -> str:
    """`workdir/.lock`, or with `beside` the sibling `.<name>.lock` (for targets whose output
    folder must not exist or must be empty when they start, e.g. the Fisher and Gram launchers)."""
    workdir = os.path.abspath(os.fspath(workdir)).rstrip(os.sep)
    if beside:
        parent, name = os.path.split(workdir)
        return os.path.join(parent, f".{name}{LOCK_FILE}")
    return os.path.join(workdir, LOCK_FILE)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def workdir_lock(workdir, *, beside: bool = False) -> Iterator[str]:
    """Hold an exclusive, non-blocking `fcntl.flock` on `lock_path(workdir, beside)` for the
    with-block; yields the lock file's path. The holder writes its pid into the file.

    A second process (or a second lock in this one) gets `WorkdirLockedError` (a FileExistsError)
    naming the workdir and the holder's pid, at once. The OS releases the lock when the holder
    exits or is killed (SIGKILL included), so a dead run never leaves a stale lock: the next one
    takes it. The folder holding the lock file is created if missing; on leaving, the lock file
    is removed (still under the lock), and so is that folder if this call created it and it is
    empty, so a run that fails before writing anything leaves no trace.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    path = lock_path(workdir, beside=beside)
    folder = os.path.dirname(path)
    created = not os.path.isdir(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} exists and is not a folder (workdir {workdir})")
    os.makedirs(folder, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(f"workdir {workdir} is in use by another run (pid {pid}, lock file "
                                         f"{path}); wait for it to finish or use another --workdir") from None
            raise
        try:  # the file may have been unlinked by a holder leaving between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:
            os.unlink(path)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only if still empty
        finally:
            os.close(fd)


# ------------------------------------------------------------- artifact folders: JSON header + orbax arrays

def read_header(directory, meta_file: str, fmt: str, version: int | tuple[int, ...], error: type[Exception],
                what: str) -> dict:
    """Validate and return `directory/meta_file`, a JSON header {"format": fmt, "format_version":
    version, ...} (`version`: one int, or the tuple of versions a reader converts); anything else
    raises `error` naming the path (a missing folder: FileNotFoundError)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, meta_file)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no {what} folder at {directory}")
    if not os.path.isfile(path):
        raise error(f"{directory} is not an mdt_jax {what}: {meta_file} is missing")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                    f"expected {fmt!r} (not a {what})")
    versions = version if isinstance(version, tuple) else (version,)
    if isinstance(meta.get("format_version"), bool) or meta.get("format_version") not in versions:
        raise error(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def orbax_writer(tree) -> Callable[[str], None]:
    """A `write_dir_atomic` writer that saves `tree` (host copies) as an orbax pytree at its path."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    def write(path):
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, jax.tree.map(np.asarray, tree))
        ckptr.wait_until_finished()
    return write


def orbax_read(path, error: type[Exception], what: str, *, check: Callable[[Any], None] | None = None,
               target=None):
    """Restore the orbax pytree at `path` as NumPy arrays.

    `check(shapes)` first sees the stored layout (a tree of zero arrays) and may raise; `target`
    (a tree of arrays) fixes the restored structure, else the stored one is used. Whatever orbax or
    tensorstore raise on a missing, truncated or corrupt folder becomes `error` naming `path`.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    try:
        ckptr = ocp.StandardCheckpointer()
        stored = ckptr.metadata(path)
        stored = getattr(stored, "item_metadata", stored)
        shapes = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(stored),
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        if check is not None:
            check(shapes)
        out = ckptr.restore(path, shapes if target is None else target)
    except error:
        raise
    except Exception as e:  # orbax/tensorstore raise many types
        raise error(f"{path} could not be read (corrupt or truncated {what}): "
                    f"{type(e).__name__}: {str(e)[:300]}") from None
    return jax.tree.map(np.asarray, out)


def read_config_artifact(directory, meta_file: str, fmt: str, version: int | tuple[int, ...], error: type[Exception],
                         what: str, from_dict: Callable[[Any], Any]) -> tuple[Any, dict]:
    """(config, metadata) of a model-like artifact whose header holds {"config": ..., "metadata": ...};
    the config is rebuilt by `from_dict`, whose TypeError/ValueError becomes `error`."""
    meta = read_header(directory, meta_file, fmt, version, error, what)
    try:
        cfg = from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise error(f"{os.path.join(os.fspath(directory), meta_file)}: bad config: {e}") from None
    return cfg, meta.get("metadata") or {}


def read_params_dir(directory, error: type[Exception], what: str, shapes,
                    check: Callable[[Any, str], None] | None = None):
    """The orbax pytree in `directory/params`, restored into the layout of `shapes` (a tree of
    ShapeDtypeStructs). The stored layout must match `shapes` path for path, in shape and dtype
    (`trees.check_shapes`, naming every missing, extra or mis-shaped path) before anything is
    restored; `check(tree, where)` then vets the stored layout and the restored values."""
    import jax
    import numpy as np

    from mdt_jax import trees

    want = trees.shapes(shapes, dtypes=True)

    def vet(tree, where):
        trees.check_shapes(tree, want, error=error, prefix=f"{where} do not fit the {what}", dtypes=True)
        if check is not None:
            check(tree, where)

    pdir = os.path.join(os.fspath(directory), "params")
    if not os.path.isdir(pdir):
        raise error(f"{directory}: params/ is missing (incomplete {what})")
    target = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
    params = orbax_read(pdir, error, what, target=target, check=lambda stored: vet(stored, f"arrays stored in {pdir}"))
    vet(params, pdir)
    return params


# ------------------------------------------------------------------------------- keyed store

@dataclasses.dataclass(frozen=True)
class Codec:
    """How a `Store` entry is laid out. A file entry (KEY + `suffix`) is written by `write(tmp,
    value)`; a folder entry (KEY/, `suffix` "") by the writers `write(value) -> {name:
    writer(path)}` (`write_dir_atomic`'s). `read(path, error, what, **kw)` reads either."""

    suffix: str
    write: Callable[..., Any]
    read: Callable[..., Any]


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _read_json(path, error, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path} could not be read (corrupt {what}): {type(e).__name__}: {e}") from None


def _write_npz(path, arrays):
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _read_npz(path, error, what):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / numpy raise several types on a damaged file
        raise error(f"{path} could not be read (corrupt {what}): {type(e).__name__}: {e}") from None


JSON = Codec(".json", _write_json, _read_json)
"""A JSON value in KEY.json."""
NPZ = Codec(".npz", _write_npz, _read_npz)
"""A flat {name: array} dict in KEY.npz, read without pickle."""


def tree_codec(arrays: str = "arrays", header: str | None = None) -> Codec:
    """A pytree of arrays as an orbax folder KEY/`arrays`; with `header`, the value is a pair
    (tree, JSON dict) and the dict is KEY/`header`. `Store.get(key, target=tree)` fixes the
    restored structure (orbax_read)."""
    def write(value):
        tree, meta = value if header else (value, None)
        return {arrays: orbax_writer(tree)} | ({header: lambda p: _write_json(p, meta)} if header else {})

    def read(path, error, what, target=None):
        tree = orbax_read(os.path.join(path, arrays), error, what, target=target)
        return (tree, _read_json(os.path.join(path, header), error, what)) if header else tree
    return Codec("", write, read)


class Store:
    """One folder of named entries, the resume and cache mechanism of every stage: each entry is
    written whole under a temporary sibling name, synced and renamed into place
    (`write_file_atomic` / `write_dir_atomic`), so a SIGKILL at any point leaves each entry
    complete or absent, and a rerun finds exactly the entries that finished. Entries are never
    replaced unless `put(..., overwrite=True)` (a "latest state" entry); a damaged entry raises
    `error` naming its path.

    Users: the study's and pipelines' cached stages (`cached_json`, JSON), the Fisher chunk sums
    (`fisher_stage.PartialFolder`, an orbax tree per chunk), collection waves (`behaviour.collect`,
    NPZ per wave), the CMA-ES state (`search`, one NPZ) and the SAC trainer's state
    (`behaviour.sac`, a tree with a JSON header). Training checkpoints are step-indexed orbax
    CheckpointManager folders instead (train.py, training.train_group)."""

    def __init__(self, folder, codec: Codec, *, error: type[Exception] = ValueError, what: str = "stored entry"):
        self.folder, self.codec, self.error, self.what = os.fspath(folder), codec, error, what

    def path(self, key: str) -> str:
        if not key or os.sep in key or key.startswith("."):
            raise ValueError(f"Store key {key!r}: a plain name (no path separator, not hidden)")
        return os.path.join(self.folder, key + self.codec.suffix)

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def get(self, key: str, **read_kw) -> Any | None:
        """The entry `key`, or None when it was never (completely) written."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        return self.codec.read(path, self.error, self.what, **read_kw)

    def put(self, key: str, value, *, overwrite: bool = False) -> str:
        path = self.path(key)
        if self.codec.suffix:
            return write_file_atomic(path, lambda tmp: self.codec.write(tmp, value), overwrite=overwrite)
        return write_dir_atomic(path, self.codec.write(value), overwrite=overwrite)

    def cached(self, key: str, fn: Callable[[], Any], **read_kw) -> Any:
        """`fn()`'s value, computed once: stored under `key` and read back on later calls, so a
        resumed run skips a stage it finished."""
        if key in self:
            return self.get(key, **read_kw)
        out = fn()
        self.put(key, out)
        return out


def cached_json(path: str, fn: Callable[[], Any]) -> Any:
    """`fn()`'s JSON-able result, computed once and kept at `path` (a `Store` entry)."""
    folder, name = os.path.split(os.path.abspath(path))
    if not name.endswith(".json"):
        raise ValueError(f"cached_json: {path} must end in .json")
    return Store(folder, JSON, what="cached stage").cached(name[:-len(".json")], fn)


def check_run_config(workdir: str, run_config: dict) -> bool:
    """Refuse (FileExistsError naming the differing fields) a workdir whose recorded run config is
    not `run_config` (compared as JSON, the way it is recorded); writes nothing. True when the
    workdir already records this run."""
    path = os.path.join(workdir, "run_config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    new = json.loads(json.dumps(run_config))
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise FileExistsError(f"workdir {workdir} holds a different run (differs in {diff}); "
                              "use a new --workdir")
    return True


def run_config_guard(workdir: str, run_config: dict) -> None:
    """Refuse to reuse a workdir that holds a different run's config; record ours otherwise."""
    if check_run_config(workdir, run_config):
        return
    path = os.path.join(workdir, "run_config.json")
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run_config, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
