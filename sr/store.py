"""Where results are kept: the cache and runs folders, atomic writes, per-entry locks, and the digest of the code
and library versions that made a cached result.

Every stage that keeps something on disk (the FP32 ONNX export, calibrated QDQ models, TensorRT plans, weights,
checkpoints) goes through this module, so an engine never imports the calibration module to find a folder and
an interrupted job never leaves a half-written file behind.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from types import CodeType, ModuleType
from typing import Iterator, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = PROJECT_ROOT / "cache"  # $SR_CACHE_DIR overrides it
RUNS_DIR = PROJECT_ROOT / "runs"  # models trained in the app
TEMP_PREFIX = ".tmp-"  # every temp file or folder this module makes starts with it
STALE_SECONDS = 3600.0  # temp leftovers older than this belong to a crashed writer
DEFAULT_CACHE_MB = 2048  # $SR_CACHE_MAX_MB overrides it: the calibration cache's size cap


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder.

    Args:
        cache_dir: an explicit folder; None reads $SR_CACHE_DIR at call time, else `cache/` in the project.

    Returns:
        the folder's path (not created).
    """
    return Path(cache_dir or os.environ.get("SR_CACHE_DIR") or CACHE_DIR)


class Memo:
    """The one kind of process-wide memo: a thread-safe LRU map of at most `size` entries. A miss is made
    outside the lock (two threads may both make it; the values are equal); a lookup never races an eviction
    (each cache used to have its own dict, eviction rule and check-then-read race with another thread's clear)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key, make):
        """The value remembered under `key`, made by `make()` (and remembered) on a miss."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key, value) -> None:
        """Remember `value` under `key` (evicting the least recently used beyond `size`)."""
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def peek(self, key, default=None):
        """The value under `key`, or `default` (no making, no reordering)."""
        with self.lock:
            return self.items.get(key, default)


_DIGESTS = Memo(4096)  # (real path, size, mtime, inode) -> SHA-256


def file_identity(path: str | os.PathLike) -> tuple:
    """What a memo of something read from a file is keyed by: the file's real path, size, modification time in
    nanoseconds and inode (a file replaced by a rename, as every write here is, gets a new inode). The one file
    identity of the library.

    Raises:
        FileNotFoundError: no such file.
    """
    status = os.stat(path)
    return os.path.realpath(path), status.st_size, status.st_mtime_ns, status.st_ino


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks (remembered while its size and mtime stay).

    Args:
        path: the file.

    Returns:
        64 hex digits.

    Raises:
        FileNotFoundError: no such file.
    """
    memo = file_identity(path)

    def hashed() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    return _DIGESTS.get(memo, hashed)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would flip a process-wide setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` for a writer that wants a file name (safetensors, torch.save); renamed onto
    `path` when the block ends without an exception, removed otherwise.

    Example:
        >>> with atomic_path("weights/model.safetensors") as temp:
        ...     save_file(tensors, temp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix()}{path.name}.")
    os.close(handle)
    os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; the published file gets the usual permissions
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` through a temp file in the same folder, fsync and a rename.

    Args:
        data: the bytes.
        path: the destination (its folder is created).

    Returns:
        `path`.
    """
    with atomic_path(path) as temp:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `<path>.lock` for the block: one writer per entry across threads and processes
    (flock locks belong to an open file, so two threads of one process exclude each other too).

    Args:
        path: the entry the lock stands for.
        wait: block until the lock is free; False yields False at once when someone else holds it.

    Yields:
        True while the lock is held, False when `wait` is off and it was taken.
    """
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def temp_dir(parent: str | os.PathLike) -> Path:
    """A new empty temp folder inside `parent` (created), for building an entry before `publish_dir`."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix()))


def publish_dir(work: Path, entry: Path) -> None:
    """Move a finished folder into place.

    Call it holding `locked(entry)`: an existing `entry` was found invalid by the caller under the same lock, so it
    is replaced; nobody else's entry is ever deleted.

    Args:
        work: the finished temp folder (from `temp_dir`, same file system).
        entry: its final path.
    """
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(work, entry)


def _temp_prefix() -> str:
    """The start of this process's temp names: TEMP_PREFIX and the process id (see `remove_temps_of`)."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def remove_temps_of(pid: int, root: str | os.PathLike | None = None) -> int:
    """Delete every temp file or folder that process `pid` left under the cache (it was killed mid-write: the
    box does this after stopping one).

    Args:
        pid: the dead writer's process id.
        root: where to look, recursively (the cache root by default).

    Returns:
        how many were removed.
    """
    root, removed = Path(root) if root is not None else cache_root(), 0
    prefix = f"{TEMP_PREFIX}{pid}-"
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if name.startswith(prefix):
                item = Path(folder) / name
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
                removed += 1
        dirs[:] = [d for d in dirs if not d.startswith(prefix)]
    return removed


def remove_stale_temps(folder: str | os.PathLike, older_than: float = STALE_SECONDS) -> int:
    """Delete temp files and folders that crashed writers left in `folder`.

    Args:
        folder: where to look (not recursive).
        older_than: seconds since the last change; younger ones may belong to a live writer.

    Returns:
        how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    for item in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if now - item.stat().st_mtime < older_than:
                continue
            shutil.rmtree(item) if item.is_dir() else item.unlink()
            removed += 1
        except OSError:
            continue  # another process removed or is still using it
    return removed


def touch(path: str | os.PathLike) -> None:
    """Mark a cache entry as just used (its modification time orders the eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass


def disk_bytes(path: str | os.PathLike) -> int:
    """The bytes a file, or every file under a folder, holds."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def cache_cap_bytes() -> int:
    """The cache's size cap: $SR_CACHE_MAX_MB (read at call time), else DEFAULT_CACHE_MB."""
    return int(float(os.environ.get("SR_CACHE_MAX_MB") or DEFAULT_CACHE_MB) * 1024 * 1024)


def evict(folder: str | os.PathLike, max_bytes: int, keep=None, kinds: Sequence[str] | None = None,
          hold_seconds: float = 0.0) -> list[Path]:
    """Delete the least recently used entries of the cache until all of it holds at most `max_bytes`.

    The cap is one total over every kind of entry (`folder`'s siblings: calibrations, statistics, exports,
    uploaded models, OpenVINO twins, refined models, TensorRT plans). An entry is a file or folder directly inside
    one of those folders (temp items and lock files aside); "used" is its modification time (`touch`). An entry
    whose lock another thread or process holds is skipped.

    Args:
        folder: the folder of the entry just written (its parent is the cache root).
        max_bytes: the cap.
        keep: an entry never deleted (the one just written), or several (what the caller is still using).
        kinds: only these entry folders are counted and may be evicted (all of them by default: the one cap).
        hold_seconds: an entry used more recently than this stays (it is counted, never deleted).

    Returns:
        the deleted entries.
    """
    kept = [Path(keep)] if isinstance(keep, (str, os.PathLike)) else [Path(k) for k in (keep or [])]
    root = Path(folder).parent
    if not root.is_dir():
        return []
    counted = [item for item in root.iterdir() if item.is_dir() and not item.name.startswith(TEMP_PREFIX)
               and (kinds is None or item.name in kinds)]
    entries = [item for kind in counted for item in kind.iterdir() if not item.name.startswith(TEMP_PREFIX)
               and not item.name.endswith(".lock") and not any(k == item or item in k.parents for k in kept)]
    measured = {item: found for item in entries if (found := _size_and_mtime(item)) is not None}
    total = sum(size for size, _ in measured.values()) + \
        sum(disk_bytes(k) for k in kept if k.exists() and k.parent.parent == root)
    deleted, now = [], time.time()
    for item, (size, used) in sorted(measured.items(), key=lambda pair: pair[1][1]):
        if total <= max_bytes:
            break
        if now - used < hold_seconds:
            continue  # held: used within the hold
        with locked(item, wait=False) as held:
            if not held:
                continue  # in use
            try:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            except FileNotFoundError:  # its owner removed it meanwhile
                pass
            total -= size
            deleted.append(item)
    return deleted  # lock files stay: a waiter may hold one open


def _size_and_mtime(item: Path) -> tuple[int, float] | None:
    """(bytes, last use) of a cache entry, or None for one its owner removed while it was being looked at (the
    app's bundle folders come and go while another request evicts)."""
    try:
        return disk_bytes(item), item.stat().st_mtime
    except FileNotFoundError:
        return None


# the distributions that provide one importable library (ONNX Runtime's GPU wheel provides `onnxruntime` too)
_PROVIDERS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")}


def library_versions(*names: str) -> dict[str, str]:
    """{library: installed version or "missing"} for the libraries that shape a result; a library another
    distribution provides (onnxruntime from onnxruntime-gpu) is reported as "<version> (<distribution>)"."""
    found = {}
    for name in names:
        found[name] = "missing"
        for distribution in _PROVIDERS.get(name, (name,)):
            try:
                version = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
            found[name] = version if distribution == name else f"{version} ({distribution})"
            break
    return found


def short_hash(text: str, length: int = 16) -> str:
    """A cache key.

    Args:
        text: what the key stands for (canonical JSON).
        length: hex digits kept.

    Returns:
        the first `length` hex digits of the SHA-256 of `text`.
    """
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def code_digest(*modules: ModuleType) -> str:
    """A digest of the code that determines a result: each module's source file, plus the compiled code of the
    functions its namespace holds *now* (so a function replaced at run time, e.g. a patched threshold search,
    changes the digest as an edited file does).

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.__name__.encode())
        source = getattr(module, "__file__", None)
        if source and os.path.exists(source):
            digest.update(Path(source).read_bytes())
        for name, value in sorted(vars(module).items()):
            if inspect.isfunction(value):
                digest.update(name.encode())
                _update_with_code(digest, value.__code__)
    return digest.hexdigest()[:16]


def code_digest_of(*names: str) -> str:
    """`code_digest` of modules given by name, for a key defined in a module that the modules it describes import
    (it cannot import them back). They must be loaded already, as they are wherever the result is made: a key
    computed without one of them would differ, so that is refused.

    Returns:
        16 hex digits.

    Raises:
        RuntimeError: a module not imported yet.
    """
    missing = [name for name in names if name not in sys.modules]
    if missing:
        raise RuntimeError(f"a key covers the code of {', '.join(missing)}, which is not imported here")
    return code_digest(*(sys.modules[name] for name in names))


def _update_with_code(digest, code: CodeType) -> None:
    """Feed a code object's bytecode, names and constants (nested code included) to `digest`. marshal.dumps
    would be shorter but is not deterministic: its back-references depend on reference counts."""
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames)).encode())
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            _update_with_code(digest, constant)
        elif isinstance(constant, frozenset):  # `x in {"a", "b"}`: its order follows the per-process hash seed
            digest.update(repr(sorted(map(repr, constant))).encode())
        else:
            digest.update(repr(constant).encode())
