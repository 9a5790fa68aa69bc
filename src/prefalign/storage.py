"""Writes a full disk cannot turn into a file taken for good, and the checksums that catch one that did.

Every file prefalign reads back (checkpoints, the reference cache, final/, curate's and split's outputs) is
written under a temporary name in its own folder and renamed once whole: a rename within a folder is atomic,
so the name a reader opens is either the old file, the new one complete, or absent. A write that runs out of
space (ENOSPC; EDQUOT over a quota; EFBIG over RLIMIT_FSIZE, the limit `ulimit -f` sets) becomes a
StorageError naming the file, the bytes it was writing and the bytes free, with the partial file removed."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import faults
from .errors import StorageError, TrainingError

# what "the disk cannot take this write" looks like to a process
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_errno(e: BaseException) -> int | None:
    """The errno of a disk-full error, or None. Libraries written in Rust (safetensors' save_file, the
    tokenizers' save) raise their own error types with the OS error only in the text: `(os error 28)`."""
    if isinstance(e, StorageError):
        return None
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(m.group(1))
    return code if code in DISK_FULL else None


def free_bytes(path: str | Path) -> int | None:
    """Bytes free on the filesystem `path` is (or would be) on; None where that cannot be read."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def remove(path: str | Path) -> None:
    """A partial file or folder gone, whatever it is; nothing raised (it may never have been made)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def finite(value: float | None) -> float | None:
    """`value`, or None when it is missing or not finite: JSON has no NaN (a bare NaN makes a file invalid), so
    the files prefalign writes hold null for a figure that could not be measured (or is undefined)."""
    return value if value is not None and math.isfinite(value) else None


def storage_error(path: str | Path, needed: int | None, e: BaseException, at_least: bool = False) -> StorageError:
    """`needed`: the bytes being written; `at_least`: those written so far of a file whose size is not known
    in advance (curate's output)."""
    free = free_bytes(path)
    why = {errno.EFBIG: "the file-size limit (ulimit -f) was reached",
           errno.EDQUOT: "the disk quota is exceeded"}.get(disk_full_errno(e), "no space left on the device")
    need = "an unknown number of bytes" if needed is None else f"{'at least ' if at_least else '~'}{needed:,} bytes"
    have = f"{free:,} bytes free there" if free is not None else "free space unknown"
    return StorageError(f"{path}: {why} while writing it ({need} to write, {have}); nothing half-written was "
                        "kept: free space (or point the output elsewhere) and run again")


@contextmanager
def disk_full(path: str | Path, needed: int | Callable[[], int | None] | None, *partial: str | Path) -> Iterator[None]:
    """A disk-full OSError inside becomes a StorageError about `path`; the `partial` files are removed first.
    `needed`: the bytes being written (or a function that says, read when the error happens)."""
    try:
        yield
    except Exception as e:
        if disk_full_errno(e) is None:
            raise
        for p in partial:
            remove(p)
        raise storage_error(path, needed() if callable(needed) else needed, e) from e


def fsync(path: str | Path) -> None:
    """To the disk, not only to the page cache: after a power loss a renamed file must hold its bytes
    (a folder's fsync makes its entries, a rename's among them, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """`path` and its missing parents, each new folder's entry fsynced in its parent: after a power loss
    a folder made here must still be there, or every file later committed into it is lost with it."""
    p = Path(path)
    missing = [q for q in (p, *p.parents) if not q.exists()][::-1]  # outermost first
    p.mkdir(parents=True, exist_ok=True)
    for q in missing:
        fsync(q.parent)
    return p


def tmp_name(path: str | Path) -> Path:
    """The temporary name `path` is written under: in its own folder (a rename there is atomic) and hidden.
    One name per file, so the next write replaces what a killed one left (one writer per run folder: its lock)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp")


def aside_name(path: str | Path) -> Path:
    """Where a folder being replaced waits while its successor is renamed in (replace_folder)."""
    p = Path(path)
    return p.with_name(f".{p.name}.old")


def restore_aside(path: str | Path) -> None:
    """A replace killed between its two renames left the old folder aside and none at `path`: it goes
    back (the new one, if it got in, wins and the old is removed). Call before a save and a resume."""
    p, old = Path(path), aside_name(path)
    if not old.is_dir():
        return
    if p.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, p)
        fsync(p.parent)


def replace_folder(tmp: Path, path: Path) -> None:
    """`tmp` becomes `path`, a folder of that name renamed aside first and removed only once the new one is
    in: a kill at any moment leaves a complete folder, at `path` or aside (restore_aside puts it back),
    where removing the old one first would leave none."""
    restore_aside(path)
    if path.is_dir():
        os.replace(path, aside_name(path))
        faults.point("folder.replace", path)
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(aside_name(path), ignore_errors=True)


def commit(tmp: Path, path: Path) -> None:
    """`tmp`, written whole, becomes `path` (a folder replaces a folder of that name), each file fsynced."""
    for f in [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []:
        fsync(f)
    fsync(tmp)
    if tmp.is_dir():
        replace_folder(tmp, path)
        return
    os.replace(tmp, path)
    fsync(path.parent)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ a folder's checksums

CHECKSUMS = "checksums.json"


def file_entry(path: str | Path) -> dict[str, object]:
    """checksums.json's entry of one file: its sha256 and its size in bytes."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _own_sum(files: dict) -> str:
    """The manifest's hash of itself: a bit flip in checksums.json that still parses changes it."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_checksums(folder: Path, known: dict[str, dict] | None = None) -> Path:
    """folder/checksums.json: the sha256 and size of every file under `folder` (subfolders too), each read
    back from the disk unless `known` has its entry (files other processes hashed), and fsynced."""
    known = known or {}
    files = {name: known.get(name) or file_entry(folder / name) for name in _files(folder)}
    path = folder / CHECKSUMS
    path.write_text(json.dumps({"checksums": files, "self_sha256": _own_sum(files)}, indent=1, sort_keys=True) + "\n")
    fsync(path)
    return path


def _unread(path: Path, e: OSError) -> TrainingError:
    return TrainingError(f"{path}: could not read it ({e.strerror or e}); nothing was moved: retry once it reads "
                         "(a read error is not a checksum mismatch, so the checkpoint is not taken for corrupt)")


def verify_checksums(folder: Path) -> str | None:
    """What is wrong with `folder` against its checksums.json (the first problem found), or None. Only
    what the files hold (missing, unparsable, the wrong size or hash) is a problem; an error reading them
    (EIO, too many open files) is a TrainingError, so a good checkpoint is never quarantined for it."""
    try:
        manifest = json.loads((folder / CHECKSUMS).read_text())
        files = manifest["checksums"]
        if manifest["self_sha256"] != _own_sum(files):
            return f"{CHECKSUMS} does not match its own checksum (the manifest itself is corrupt)"
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing"
    except OSError as e:  # not what the folder holds but reading it (EIO, EMFILE...): no verdict
        raise _unread(folder / CHECKSUMS, e) from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKSUMS} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    extra = sorted(set(_files(folder)) - expected.keys())
    if extra:
        return f"{extra[0]} is not listed in {CHECKSUMS}"
    for name, (size, digest) in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            what = "empty" if actual == 0 else ("truncated" if actual < size else "longer than written")
            return f"{name} is {what} ({actual:,} bytes, {size:,} written)"
        try:
            actual_sum = sha256_file(path)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            raise _unread(path, e) from e
        if actual_sum != digest:
            return f"{name} does not match its sha256 (a bit flip, or a write that did not finish)"
    return None


@contextmanager
def whole_append(f, needed: int) -> Iterator[Callable[[bytes], None]]:
    """Appends to the unbuffered binary file `f` (open(path, "ab", buffering=0)) that land whole or not
    at all: a full disk cuts the file back to its length before them (no half line for a reader to
    choke on) and is a StorageError about `f`, `needed` the bytes being appended."""
    start = f.seek(0, os.SEEK_END)

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:  # a write may take only part of it
            view = view[f.write(view):]

    try:
        yield write
    except OSError as e:
        if disk_full_errno(e) is None:
            raise
        try:
            f.truncate(start)
        except OSError:
            pass
        raise storage_error(f.name, needed, e) from e


class AtomicWriter:
    """A text file written under a temporary name in its own folder: `close()` flushes and fsyncs it,
    `commit()` renames it to `path`, `discard()` removes it. A full disk while writing or closing is a
    StorageError naming `path` and the bytes written so far, the partial file removed. `point`: the
    fail point (prefalign/faults.py) each write passes."""

    def __init__(self, path: str | Path, point: str | None = None):
        self.path, self.point, self.bytes = Path(path), point, 0
        self.tmp = tmp_name(self.path)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w", encoding="utf-8")  # (truncates what a killed write left)

    @contextmanager
    def _guard(self, needed: int = 0) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if disk_full_errno(e) is None:
                raise
            self.discard()
            raise storage_error(self.path, self.bytes + needed, e, at_least=True) from e

    def write(self, text: str) -> None:
        size = len(text.encode())
        with self._guard(size):
            if self.point:
                faults.point(self.point, self.path)
            self.file.write(text)
        self.bytes += size

    def close(self) -> None:
        with self._guard():
            self.file.close()
            fsync(self.tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        fsync(self.path.parent)

    def discard(self) -> None:
        try:
            self.file.close()  # flushing what is left may fail again on a full disk: the file goes anyway
        except OSError:
            pass
        remove(self.tmp)


@contextmanager
def replacing(*writers: AtomicWriter) -> Iterator[list[AtomicWriter]]:
    """Files that appear together or not at all: every writer closed (each may find the disk full), then
    every one renamed; an error on the way discards them all, and the files of an earlier run stay.
    Yields the writers' list: one opened inside is appended to it."""
    every = list(writers)
    try:
        yield every
        for w in every:
            w.close()
    except BaseException:
        for w in every:
            w.discard()
        raise
    for w in every:
        w.commit()
