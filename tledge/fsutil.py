"""Atomic file writes and hashing: a half-written file never looks finished."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        # mkstemp creates 0600, and so do writers that replace the file (safetensors): artefacts get the
        # usual permissions (they are copied to devices and shared). Set after the writer, before the rename.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_p, 0o666 & ~umask)
        with open(tmp_p, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_p, dest)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


def scratch_root() -> Path:
    """Where large temporary files go (preprocessed image sets, GBs at 224 px): ``$TLEDGE_TMP_DIR``, else
    tledge's cache folder, never the system temp folder (often a small RAM disk, and nobody cleans it)."""
    env = os.environ.get("TLEDGE_TMP_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tledge" / "tmp"


def scratch_dir(prefix: str) -> "tempfile.TemporaryDirectory[str]":
    """A temporary folder under scratch_root(), named by host and process id; folders left by processes of
    this host that no longer run (killed with -9, power cut) are removed first."""
    import socket
    import shutil

    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    for old in root.glob(f"{prefix}-{host}-*"):
        try:
            pid = int(old.name[len(prefix) + len(host) + 2:].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}-{host}-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(dest: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        writer(tmp)
    return Path(dest)


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_atomic(dest, lambda p: p.write_text(text, encoding="utf-8"))


def write_text(dest: str | os.PathLike, text: str) -> Path:
    return write_atomic(dest, lambda p: p.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()
