"""sr.store: atomic writes, per-entry locks, the one total cache cap, the memo."""
import os
import threading
from pathlib import Path
import time

import pytest

from sr import store


def test_write_atomic_leaves_the_old_file_whole_when_a_write_fails(tmp_path):
    path = store.write_atomic(b"old", tmp_path / "f.bin")
    with pytest.raises(RuntimeError):
        with store.atomic_path(path) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("the writer died")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_held_lock_keeps_others_out_until_released(tmp_path):
    entry = tmp_path / "entry"
    order = []
    def wait_for_it():
        with store.locked(entry):
            order.append("waiter")

    with store.locked(entry):
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)
        with store.locked(entry, wait=False) as held:
            assert not held  # a second holder is refused while the first holds it
        order.append("holder")
    waiter.join(timeout=10)
    assert order == ["holder", "waiter"]


def test_eviction_is_one_total_over_every_kind_least_recently_used_first(tmp_path):
    root = tmp_path / "cache"
    for kind, names in (("int8", ["a", "b"]), ("user", ["c"])):
        for name in names:
            store.write_atomic(b"x" * 1000, root / kind / name)
            time.sleep(0.01)
    store.touch(root / "int8" / "a")  # used again: now the newest
    deleted = store.evict(root / "int8", 2000, keep=root / "user" / "c")
    assert [p.name for p in deleted] == ["b"] and (root / "int8" / "a").exists() and (root / "user" / "c").exists()


def test_an_entry_its_owner_removes_during_eviction_is_passed_over(tmp_path, monkeypatch):
    """The app's bundle folders come and go under the cache while another request evicts: one that vanishes
    between the listing and its measurement is skipped, and the eviction goes on (it raised FileNotFoundError)."""
    root = tmp_path / "cache"
    for kind, names in (("bundles", ["gone"]), ("int8", ["a", "b"])):
        for name in names:
            store.write_atomic(b"x" * 1000, root / kind / name)
            time.sleep(0.01)
    measure = store.disk_bytes

    def vanishing(path):
        if Path(path).name == "gone":
            Path(path).unlink()
        return measure(path)

    monkeypatch.setattr(store, "disk_bytes", vanishing)
    deleted = store.evict(root / "int8", 1000, keep=root / "int8" / "b")
    assert [p.name for p in deleted] == ["a"] and (root / "int8" / "b").exists()


def test_memo_is_a_bounded_lru_that_makes_each_miss_once_per_thread():
    memo, made = store.Memo(2), []

    def make(value):
        made.append(value)
        return value * 10

    assert memo.get("a", lambda: make(1)) == 10 and memo.get("a", lambda: make(99)) == 10
    memo.get("b", lambda: make(2))
    memo.get("a", lambda: make(99))  # a is the most recent now
    memo.get("c", lambda: make(3))  # evicts b, the least recently used
    assert made == [1, 2, 3] and memo.peek("b") is None and memo.peek("a") == 10 and memo.peek("c") == 30


def test_cache_root_follows_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("SR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert store.cache_root() == tmp_path / "elsewhere" and store.cache_root(tmp_path) == tmp_path
    monkeypatch.delenv("SR_CACHE_DIR")
    assert store.cache_root() == store.CACHE_DIR and os.fspath(store.CACHE_DIR).endswith("cache")


def test_one_file_identity_for_every_memo(tmp_path):
    """`file_identity` changes when a file is rewritten in place or replaced by a rename (a new inode, even with
    the same size and a coarse clock), and the library's memos of files key on it, not on their own tuples."""
    import os
    import re
    from pathlib import Path

    from sr.store import file_identity, write_atomic

    path = tmp_path / "f.bin"
    write_atomic(b"abc", path)
    first = file_identity(path)
    os.utime(path, ns=(0, 0))
    second = file_identity(path)
    stamp = path.stat().st_mtime_ns
    write_atomic(b"xyz", path)  # same size, renamed into place
    os.utime(path, ns=(stamp, stamp))
    assert len({first, second, file_identity(path)}) == 3
    library = Path(__file__).resolve().parent.parent / "sr"
    own = [f"{p.name}: {line.strip()}" for p in library.glob("*.py") for line in p.read_text().splitlines()
           if re.search(r"st_mtime(_ns)?\b.*\)|\.st_ino", line) and "def file_identity" not in line
           and p.name != "store.py"]
    assert not own, own
