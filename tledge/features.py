"""Frozen-backbone features: extraction and an on-disk cache.

The cache is keyed by everything that changes a feature vector: the backbone, its weights (hash), the
preprocessing and the image content (SHA-256 from the scan), so renaming or copying a dataset still
hits the cache and editing one image recomputes only that image. Features are stored in shards of
safetensors files, each written atomically as extraction goes, so an interrupted extraction resumes
where it stopped and a half-written shard never looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tledge.console import progress, warn
from tledge.data import Sample
from tledge.errors import NumericsError
from tledge.fsutil import atomic_path, sha256_json, write_json
from tledge.preprocess import ImageLoadError, Preprocess, load_image

FEATURE_VERSION = 2  # bump when the extraction or the shard format changes (2: shards carry a content hash)


def default_cache_dir() -> Path:
    env = os.environ.get("TLEDGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tledge" / "features"


class ImageDataset(Dataset):
    """Samples -> (tensor, label, index). Images that fail to decode after the scan yield a flag
    instead of raising, so one file changed on disk mid-run cannot crash a worker."""

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess, augment: Any = None,
                 pixels: bool = False) -> None:
        # pixels: yield the fitted uint8 pixels (Preprocess.pixels) instead of the finished input tensor
        self.samples, self.preprocess, self.augment, self.pixels = list(samples), preprocess, augment, pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, bool]:
        s = self.samples[i]
        try:
            im = load_image(s.path)
        except ImageLoadError:
            return torch.zeros(self.preprocess.input_shape, dtype=torch.uint8 if self.pixels else torch.float32), \
                s.label, i, False
        if self.augment is not None:
            arr = self.augment(im)
        elif self.pixels:
            arr = self.preprocess.pixels(im)
        else:
            arr = self.preprocess.to_array(im)
        return torch.from_numpy(arr), s.label, i, True


class FeatureCache:
    """Feature vectors by image content hash, for one (backbone, weights, preprocessing) key."""

    def __init__(self, root: str | os.PathLike, key_fields: dict[str, Any]) -> None:
        self.key = sha256_json({"v": FEATURE_VERSION, **key_fields})[:24]
        self.dir = Path(root) / self.key
        self.key_fields = key_fields

    def load_index(self) -> dict[str, tuple[Path, int]]:
        """sha256 -> (shard, row) over every shard whose content hash checks out. A damaged shard (edited,
        truncated, overwritten in place, unreadable) is reported, deleted and its images recomputed: it is
        never trusted, since features that are silently wrong train a wrong model that looks fine."""
        from safetensors import safe_open

        index: dict[str, tuple[Path, int]] = {}
        if not self.dir.is_dir():
            return index
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            why = None
            try:
                with safe_open(str(shard), framework="np") as f:
                    want = (f.metadata() or {}).get("content_sha256")
                    keys, feats = f.get_tensor("sha256"), f.get_tensor("features")
                if want is None:
                    why = "it carries no content hash"
                elif _content_hash(keys, feats) != want:
                    why = "its content does not match its hash"
                elif not np.isfinite(feats).all():
                    why = "it holds non-finite features"
            except Exception as exc:  # noqa: BLE001 - any unreadable shard is dropped, never trusted
                why = f"it cannot be read ({type(exc).__name__})"
            if why:
                warn(f"feature cache: {shard} is damaged ({why}); deleted, its images are recomputed")
                shard.unlink(missing_ok=True)
                continue
            for row, k in enumerate(keys):
                index[bytes(k).hex()] = (shard, row)
        return index

    def get(self, shas: Sequence[str], index: dict[str, tuple[Path, int]]) -> np.ndarray:
        from safetensors import safe_open

        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, s in enumerate(shas):
            shard, row = index[s]
            by_shard.setdefault(shard, []).append((i, row))
        out: np.ndarray | None = None
        for shard, pairs in by_shard.items():
            with safe_open(str(shard), framework="np") as f:
                feats = f.get_tensor("features")
            if out is None:
                out = np.empty((len(shas), feats.shape[1]), np.float32)
            idx = np.array(pairs)
            out[idx[:, 0]] = feats[idx[:, 1]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def put(self, shas: Sequence[str], feats: np.ndarray) -> Path:
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.exists():
            write_json(meta, self.key_fields)
        keys = np.frombuffer(b"".join(bytes.fromhex(s) for s in shas), np.uint8).reshape(len(shas), 32)
        feats = np.ascontiguousarray(feats, np.float32)
        dest = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        with atomic_path(dest) as tmp:
            save_file({"sha256": keys, "features": feats}, str(tmp),
                      metadata={"key": json.dumps(self.key_fields, sort_keys=True),
                                "content_sha256": _content_hash(keys, feats)})
        return dest


def _content_hash(keys: np.ndarray, feats: np.ndarray) -> str:
    """SHA-256 of a shard's image keys and feature bytes (checked before any row is used)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(keys, np.uint8).tobytes())
    h.update(str(feats.shape).encode())
    h.update(np.ascontiguousarray(feats, np.float32).tobytes())
    return h.hexdigest()


def extract(model: torch.nn.Module, samples: Sequence[Sample], preprocess: Preprocess,
            cache: FeatureCache | None, batch_size: int = 64, workers: int = 2,
            shard_size: int = 1024, label: str = "features") -> tuple[np.ndarray, dict[str, Any]]:
    """Features for ``samples`` (in order), computing only those missing from the cache.

    Returns the features and counts {"cached", "computed", "failed"}; failed images (decodable at scan
    time, not any more) get zero vectors and are reported by the caller.
    """
    index = cache.load_index() if cache else {}
    todo = [i for i, s in enumerate(samples) if s.sha256 not in index]
    # Duplicate images (same content) are computed once.
    seen: dict[str, int] = {}
    todo = [i for i in todo if seen.setdefault(samples[i].sha256, i) == i]
    stats = {"cached": len(samples) - len(todo), "computed": 0, "failed": 0}
    failed: set[str] = set()
    computed_feats: dict[str, np.ndarray] = {}
    if todo:
        ds = ImageDataset([samples[i] for i in todo], preprocess)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        pend_sha: list[str] = []
        pend_feat: list[np.ndarray] = []
        model.eval()
        with progress() as prog, torch.inference_mode():
            task = prog.add_task(label, total=len(todo), info=f"{stats['cached']} cached")
            for x, _, idx, ok in loader:
                f = model(x).float().numpy()
                bad = ~np.isfinite(f).all(axis=1) & ok.numpy()
                if bad.any():
                    names = ", ".join(ds.samples[i].path for i in idx[bad].tolist()[:5])
                    raise NumericsError(f"the backbone gave non-finite features (NaN or inf) for {int(bad.sum())} "
                                        f"images, e.g. {names}.",
                                        "check the --weights file (it may be damaged); tledge will not train on them.")
                for j, (i, good) in enumerate(zip(idx.tolist(), ok.tolist())):
                    sha = ds.samples[i].sha256
                    if good:
                        pend_sha.append(sha)
                        pend_feat.append(f[j])
                        computed_feats[sha] = f[j]
                    else:
                        failed.add(sha)
                prog.advance(task, len(idx))
                if cache and len(pend_sha) >= shard_size:
                    cache.put(pend_sha, np.stack(pend_feat))
                    pend_sha, pend_feat = [], []
            if cache and pend_sha:
                cache.put(pend_sha, np.stack(pend_feat))
        stats["computed"] = len(computed_feats)
        stats["failed"] = len(failed)
    cached_shas = [s.sha256 for s in samples if s.sha256 in index]
    cached = cache.get(cached_shas, index) if cache and cached_shas else None
    dim = (cached.shape[1] if cached is not None and cached.size
           else next(iter(computed_feats.values())).shape[0] if computed_feats else 0)
    out = np.zeros((len(samples), dim), np.float32)
    pos = {s: k for k, s in enumerate(cached_shas)}
    for i, s in enumerate(samples):
        if s.sha256 in computed_feats:
            out[i] = computed_feats[s.sha256]
        elif s.sha256 in pos and cached is not None:
            out[i] = cached[pos[s.sha256]]
    return out, {**stats, "failed_shas": sorted(failed)}
