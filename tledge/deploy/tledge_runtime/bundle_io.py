"""Bundle integrity and safe extraction (standard library only).

Every file of a bundle is listed with its SHA-256 in bundle.json; the runtime refuses to run a bundle
whose files do not match (a tampered or half-copied bundle). Extraction rejects absolute paths, '..',
links that leave the folder, and anything but regular files and folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import gzip
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "bundle.json"
SIGNATURE = "bundle.json.sig"   # ed25519 signature of bundle.json's bytes (`tledge bundle --sign KEY`)
SCHEMA = "tledge.bundle/1"
CRYPTO_HINT = ("pip install cryptography (on a Jetson: sudo apt install python3-cryptography)")


class BundleError(RuntimeError):
    """The bundle is incomplete, modified or unsafe; the message says which file and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    p = root / MANIFEST
    if not p.is_file():
        raise BundleError(f"{p} is missing: {root} is not a tledge bundle (or was copied incompletely).")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{p} is not valid JSON ({exc}): copy the bundle again.") from exc
    if m.get("schema") != SCHEMA:
        raise BundleError(f"{p} has schema {m.get('schema')!r}, this runtime reads {SCHEMA}.")
    return m


def verify(root: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every listed file's hash; BundleError naming the first bad file."""
    manifest = manifest or read_manifest(root)
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p} is missing from the bundle: copy the bundle again (or extract its .tar.gz).")
        if sha256(p) != digest:
            raise BundleError(f"{p} does not match the bundle manifest (SHA-256 differs): the file was modified or "
                              "damaged. Refusing to run it; copy the bundle again from the machine that made it.")
    return manifest


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise BundleError(f"checking a bundle signature needs the cryptography package ({exc}): {CRYPTO_HINT}.") from exc
    return serialization, ed25519


def load_public_key(path: str | os.PathLike) -> Any:
    """An ed25519 public key from a PEM file (`openssl pkey -pubout`, or `tledge bundle-keygen`)."""
    serialization, ed25519 = _ed25519()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the public key {path} ({exc}): pass the PEM file `tledge bundle-keygen` "
                          "wrote (NAME.pub).") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path} is not an ed25519 public key: bundles are signed with ed25519.")
    return key


def verify_signature(root: Path, public_key: str | os.PathLike) -> None:
    """BundleError unless bundle.json carries a valid signature by ``public_key``. With the hash list this
    detects any change to any listed file, also one made together with its hash."""
    key = load_public_key(public_key)
    sig = root / SIGNATURE
    if not sig.is_file():
        raise BundleError(f"{sig} is missing: this bundle is not signed, and --key asks for a signed one. Sign it "
                          "with `tledge bundle RUN --sign KEY`.")
    from cryptography.exceptions import InvalidSignature
    try:
        key.verify(sig.read_bytes(), (root / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(f"{root / MANIFEST} does not match its signature under {public_key}: the bundle was "
                          "changed after signing (or signed with another key). Refusing to run it.") from None


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise BundleError(f"archive member {name!r} would be written outside the bundle folder; refusing to extract.")
    return p


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a bundle .tar.gz into ``dest`` after checking every member; returns the bundle folder."""
    dest_p = Path(dest).resolve()
    if not Path(archive).is_file():
        raise BundleError(f"{archive} does not exist or is not a file: pass the deploy.tar.gz that `tledge bundle` wrote.")
    try:
        with tarfile.open(archive, "r:*") as tar:
            return _extract(tar, dest_p)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BundleError(f"{archive} is not a complete bundle archive ({type(exc).__name__}: {exc}): it is damaged "
                          "or was copied incompletely. Copy deploy.tar.gz again (compare its SHA-256 with the "
                          "original's).") from None


def _extract(tar: tarfile.TarFile, dest_p: Path) -> Path:
    """Check every member (before anything is written), then write them."""
    members = tar.getmembers()
    for m in members:
        _safe_name(m.name)
        if not (m.isfile() or m.isdir()):
            raise BundleError(f"archive member {m.name!r} is a {'link' if m.issym() or m.islnk() else 'special file'}; "
                              "bundles hold only files and folders. Refusing to extract.")
        target = (dest_p / m.name).resolve()
        if dest_p != target and dest_p not in target.parents:
            raise BundleError(f"archive member {m.name!r} resolves outside {dest_p}; refusing to extract.")
    dest_p.mkdir(parents=True, exist_ok=True)
    for m in members:
        target = dest_p / m.name
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        assert src is not None
        with open(target, "wb") as f:
            while block := src.read(1 << 20):
                f.write(block)
    tops = {PurePosixPath(m.name).parts[0] for m in members if m.name}
    return dest_p / tops.pop() if len(tops) == 1 else dest_p
