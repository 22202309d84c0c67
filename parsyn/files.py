"""Files that survive a kill: atomic writes, atomic folders, and append-only JSON-lines records.

A write goes to a temporary name beside its target and is renamed over it, so a reader sees the old
file or the new one, never half of one. A JSON-lines file is appended one flushed line per record; a
line cut short by a kill is dropped when the file is read again for appending, so a resumed job counts
nothing twice and loses nothing it had finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("parsyn")


def atomic_write(target: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary path beside `target`, then rename it over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")  # `write` creates it: usual permissions
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_json(target: Path, data: object) -> Path:
    """`data` as indented JSON, written atomically."""
    return atomic_write(target, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed) for the block: across processes, one
    at a time. The lock goes with the process, so a killed holder never blocks the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; when the block ends without error its files are synced
    and it replaces `target`. Until the new folder is in place the old one is kept (as `.NAME.previous`),
    so a kill at any moment leaves a complete folder that `recover_folder` puts back. One process at a
    time per target (a lock beside it), which first recovers what a killed one left. The folder is
    readable by everyone (mode 755), like an ordinary folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(f".{target.name}.lock")):
        recover_folder(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o755)
        try:
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    with file.open("rb") as fh:
                        os.fsync(fh.fileno())
            previous = _previous(target)
            if target.exists():
                shutil.rmtree(previous, ignore_errors=True)  # `target` is complete: an older copy is stale
                os.replace(target, previous)
            os.replace(tmp, target)
            _sync_dir(target.parent)
            shutil.rmtree(previous, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, what: str = "file") -> object:
    """A JSON file's content; one ValueError naming the file when it is not a readable JSON file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    _regular(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from None


def recover_folder(target: Path) -> bool:
    """Undo what a kill inside `atomic_folder` left beside `target`: the previous folder goes back in place
    when the new one never arrived, and stale temporary folders are removed. True if it restored one."""
    target, previous = Path(target), _previous(Path(target))
    restored = False
    if previous.exists() and not target.exists():
        os.replace(previous, target)
        restored = True
    shutil.rmtree(previous, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return restored


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_records(path: Path, *, check: Callable[[dict], None] = lambda r: None, on_error: str = "stop") -> list[dict]:
    """The complete records of a JSON-lines file ([] when it does not exist).

    A last line without its newline is what a kill leaves behind: it is ignored unless it is a whole JSON
    object (only the newline was lost). Any other line that is
    not a JSON object, or that `check` rejects (by raising ValueError, KeyError or TypeError), stops with
    its line number (`on_error="stop"`) or is skipped with a warning naming it (`"skip"`); never silently."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        return []
    _regular(path)
    records, bad = [], []
    for number, raw in enumerate(_complete(path.read_bytes()).split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            check(record)
        except UnicodeDecodeError:
            bad.append(f"{number} (not UTF-8 text)")
            continue
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as error:
            bad.append(f"{number} ({error})")
            continue
        records.append(record)
    if bad:
        message = f"{path}: {len(bad)} malformed line(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        if on_error == "stop":
            raise ValueError(message)
        log.warning("skipped %s", message)
    return records


def _regular(path: Path) -> None:
    """ValueError unless `path` is a regular file (a FIFO or device in its place would block or mislead)."""
    if not path.is_file():
        raise ValueError(f"{path} exists but is not a regular file; move it away to continue")


def _complete(data: bytes) -> bytes:
    """`data` up to its last complete line; a last line that lost only its newline gets it back."""
    if not data or data.endswith(b"\n"):
        return data
    cut = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[cut:]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    return data + b"\n" if whole else data[:cut]


class Records:
    """An append-only JSON-lines file: `open()` cuts a partial last line, `append()` writes and flushes one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def __enter__(self) -> Records:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _regular(self.path)
            data = self.path.read_bytes()
            if _complete(data) != data:  # a kill mid-line: keep only complete lines
                self.path.write_bytes(_complete(data))
        self._fh = self.path.open("a", encoding="utf-8")
        return self

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def extend(self, records: Iterable[dict]) -> None:
        for record in records:
            self.append(record)

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrite the file (atomically) with only the records `predicate` accepts; call before appending."""
        kept = [r for r in read_records(self.path) if predicate(r)]
        atomic_write(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8"))
