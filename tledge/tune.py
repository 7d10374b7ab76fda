"""`tledge tune`: a new classification head on a pretrained backbone, from an ImageFolder dataset.

Frozen mode (default) computes each image's features once (cached on disk) and trains the head on them,
so a tune costs about one forward pass per image. ``unfreeze > 0`` then fine-tunes the last stages
together with the head (linear probing first, then fine-tuning, as Kumar et al. 2022 recommend so the
random head does not wreck pretrained features).

Everything is written atomically into the run directory; the model card is written last, so its
presence marks a finished run. Training state is checkpointed after every epoch into
``RUN/.resume/`` and ``--resume`` continues from it.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import tledge
from tledge import backbones, card as card_mod
from tledge.console import err, note, progress, status, warn
from tledge.data import ScanReport, format_report, scan, write_index
from tledge.distributed import Dist, maybe_inject_fault
from tledge.errors import NumericsError, RunDirError, UsageError
from tledge.faults import maybe_interrupt
from tledge.features import FeatureCache, ImageDataset, default_cache_dir, extract
from tledge.export import artefacts
from tledge.fsutil import atomic_path, sha256_file, sha256_json
from tledge.model import Classifier, make_head, save_checkpoint
from tledge.preprocess import DEFAULT_RESIZE_MODE, RESIZE_MODES


@dataclass
class TuneConfig:
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"          # "imagenet", "none" or a file path
    image_size: int | None = None      # None: the weights' own input size
    resize_mode: str = "shorter-side+center-crop"  # how images are fitted to the input (preprocess.RESIZE_MODES):
                                                   # tune with what the device does (e.g. DeepStream: stretch)
    head: str = "linear"               # linear | mlp
    hidden: int = 512
    dropout: float = 0.2
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    patience: int = 20
    balance: bool = True               # class-balanced loss (weights n / (k * n_c))
    unfreeze: int = 0                  # last N backbone stages fine-tuned after the head
    ft_epochs: int = 5
    ft_lr: float = 1e-4                # head learning rate in fine-tuning
    ft_backbone_lr_mult: float = 0.1   # backbone lr = ft_lr * this
    ft_batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = 2
    extract_batch_size: int = 64
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def training_key(self) -> dict[str, Any]:
        """The options that change the trained weights (not speed or paths)."""
        d = asdict(self)
        for k in ("workers", "extract_batch_size", "cache_dir", "extra"):
            d.pop(k)
        return d


# ------------------------------------------------------------------------------------------ helpers

def _class_weights(labels: np.ndarray, k: int, balance: bool) -> torch.Tensor:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    if not balance:
        return torch.ones(k)
    w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _cosine(step: int, total: int, base: float, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, t)))


def _set_lr(opt: torch.optim.Optimizer, scale: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * scale


class BNFrozen:
    """Keep every BatchNorm in eval mode while the rest trains: train-mode statistics from small batches
    destroy pretrained features."""

    @staticmethod
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def require_finite(value: torch.Tensor | np.ndarray, what: str) -> None:
    """NumericsError unless every number of ``value`` is finite: a NaN model is never reported as success."""
    ok = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else bool(np.isfinite(value).all())
    if not ok:
        raise NumericsError(f"{what} is not finite (NaN or inf); nothing was saved.",
                            "lower --lr / --ft-lr, check the --weights file, or clear the feature cache "
                            "(--cache-dir) if it was tampered with.")


# ------------------------------------------------------------------------------------ resume state

class ResumeState:
    """Per-epoch training state in RUN/.resume/state.pt (tensors and plain values only, read back with
    weights_only=True), tied to a hash of the options and the dataset."""

    def __init__(self, run_dir: Path, key: str) -> None:
        self.dir = run_dir / ".resume"
        self.file = self.dir / "state.pt"
        self.key = key

    def exists(self) -> bool:
        return self.file.is_file()

    def load(self) -> dict[str, Any]:
        try:
            state = torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise RunDirError(f"cannot read the resume state {self.file} ({exc}).",
                              "run again without --resume to start clean.") from exc
        if state.get("key") != self.key:
            raise RunDirError(
                f"the interrupted run in {self.dir.parent} used other options or data than this command.",
                "repeat the original command with --resume, or drop --resume to start clean.")
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.file) as tmp:
            torch.save({**state, "key": self.key}, tmp)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------- training

def train_head(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, num_classes: int,
               cfg: TuneConfig, resume: ResumeState | None, start: dict[str, Any] | None,
               ) -> tuple[nn.Module, list[dict[str, float]], dict[str, Any]]:
    """AdamW + cosine schedule + label smoothing + class-balanced loss, early stopping on val top-1;
    returns the best head, the per-epoch history and a summary."""
    torch.manual_seed(cfg.seed)
    head = make_head(cfg.head, xtr.shape[1], num_classes, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(ytr, num_classes, cfg.balance),
                                  label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    Xtr, Ytr = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    Xva, Yva = torch.from_numpy(xva), torch.from_numpy(yva).long()
    steps_per_epoch = max(1, math.ceil(len(Xtr) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    best = {"acc": -1.0, "epoch": -1, "state": None}
    epoch0 = 0
    if start and start.get("phase") == "head":
        head.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        history, best, epoch0 = start["history"], start["best"], start["epoch"] + 1
        if start.get("done"):
            epoch0 = cfg.epochs  # the head phase had finished (early stop); go on from its result
        else:
            note(f"resuming head training at epoch {epoch0 + 1}/{cfg.epochs}")
    with progress() as prog:
        task = prog.add_task("head", total=cfg.epochs, completed=epoch0, info="")
        for epoch in range(epoch0, cfg.epochs):
            head.train()
            g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            perm = torch.randperm(len(Xtr), generator=g)
            tot = 0.0
            for s in range(steps_per_epoch):
                _set_lr(opt, _cosine(epoch * steps_per_epoch + s, total, 1.0))
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                loss = loss_fn(head(Xtr[idx]), Ytr[idx])
                require_finite(loss, f"the head's training loss at epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(idx)
            head.eval()
            with torch.no_grad():
                logits = head(Xva)
                vl = eval_loss(logits, Yva).item()
                acc = (logits.argmax(1) == Yva).float().mean().item()
            history.append({"phase": "head", "epoch": epoch + 1, "train_loss": tot / len(Xtr),
                            "val_loss": vl, "val_acc": acc, "lr": opt.param_groups[0]["lr"]})
            if acc > best["acc"]:
                best = {"acc": acc, "epoch": epoch + 1,
                        "state": {k: v.clone() for k, v in head.state_dict().items()}}
            prog.update(task, advance=1, info=f"val top-1 {acc:.4f} (best {best['acc']:.4f} @ {best['epoch']})")
            stop = epoch + 1 - best["epoch"] >= cfg.patience
            if resume:
                resume.save({"phase": "head", "epoch": epoch, "model": head.state_dict(),
                             "optimizer": opt.state_dict(), "history": history, "best": best,
                             "done": stop or epoch + 1 == cfg.epochs})
            if stop:
                note(f"early stop: val top-1 has not improved for {cfg.patience} epochs")
                break
    head.load_state_dict(best["state"])
    return head.eval(), history, {"best_epoch": best["epoch"], "best_val_acc": best["acc"],
                                  "epochs_run": len(history)}


def _augment(pre: Any, crop: int) -> Callable[[Any], np.ndarray]:
    """RandomResizedCrop + horizontal flip (torchvision on PIL), then the card's normalisation. With a
    stretch or letterbox resize mode the image is first fitted as the device will fit it (so the network
    learns the stretched shapes or the black border), and the random crop is taken from that."""
    from torchvision import transforms as T

    aug = T.Compose([T.RandomResizedCrop(crop, scale=(0.35, 1.0), interpolation=T.InterpolationMode(pre.interpolation)),
                     T.RandomHorizontalFlip()])
    fit = pre.resize_mode != DEFAULT_RESIZE_MODE

    def run(im: Any) -> np.ndarray:
        arr = np.asarray(aug(pre.resize_crop(im) if fit else im), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    return run


def evaluate(model: nn.Module, samples: list, pre: Any, cfg: TuneConfig, label: str = "eval",
             d: Dist | None = None) -> np.ndarray:
    """Logits of the full network on ``samples`` (eval mode); with several ranks each evaluates its share
    and the logits are all-gathered in order."""
    from torch.utils.data import DataLoader

    if d is not None and d.enabled:
        mine = evaluate(model, d.shard(samples), pre, cfg, label)
        rows = d.unshard([list(part) for part in d.all_gather(mine)])
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    ds = ImageDataset(samples, pre)
    loader = DataLoader(ds, batch_size=cfg.extract_batch_size, num_workers=cfg.workers)
    out = np.zeros((len(samples), 0), np.float32)
    chunks = []
    model.eval()
    with torch.inference_mode(), progress() as prog:
        task = prog.add_task(label, total=len(samples), info="")
        for x, _, _, _ in loader:
            chunks.append(model(x).float().numpy())
            prog.advance(task, len(x))
    return np.concatenate(chunks) if chunks else out


def finetune(model: Classifier, spec: backbones.BackboneSpec, report: ScanReport, pre: Any, cfg: TuneConfig,
             resume: ResumeState | None, start: dict[str, Any] | None, d: Dist | None = None,
             ) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Fine-tune the last ``cfg.unfreeze`` stages and the head, BatchNorm in eval mode. With several ranks:
    DistributedDataParallel, a DistributedSampler and all-reduced metrics (same global batch size)."""
    from torch.utils.data import DataLoader, DistributedSampler

    d = d or Dist()

    stages = spec.stages(model.backbone)
    if not 0 < cfg.unfreeze <= len(stages):
        raise UsageError(f"--unfreeze {cfg.unfreeze} is out of range: {spec.name} has {len(stages)} stages.",
                         f"pass a number from 1 to {len(stages)}.")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    bb_params = [p for st in stages[-cfg.unfreeze:] for p in st.parameters()]
    for p in bb_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": bb_params, "lr": cfg.ft_lr * cfg.ft_backbone_lr_mult},
                             {"params": model.head.parameters(), "lr": cfg.ft_lr}], weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    ytr = np.array([s.label for s in report.train])
    k = len(report.classes)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(ytr, k, cfg.balance), label_smoothing=cfg.label_smoothing)
    ds = ImageDataset(report.train, pre, augment=_augment(pre, pre.crop))
    yva = np.array([s.label for s in report.val])
    history: list[dict[str, float]] = []
    best = {"acc": -1.0, "epoch": 0, "state": None}
    epoch0 = 0
    if start and start.get("phase") == "finetune":
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        history, best, epoch0 = start["history"], start["best"], start["epoch"] + 1
        note(f"resuming fine-tuning at epoch {epoch0 + 1}/{cfg.ft_epochs}")
    else:
        # Epoch 0 is the linear-probe model itself: fine-tuning must beat it to be kept.
        logits = evaluate(model, report.val, pre, cfg, "val", d)
        best = {"acc": float((logits.argmax(1) == yva).mean()), "epoch": 0,
                "state": {k2: v.clone() for k2, v in model.state_dict().items()}}
    bs = max(1, cfg.ft_batch_size // d.world)  # per rank: the global batch stays ft_batch_size
    net: nn.Module = model
    sampler = None
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=None)
        sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=len(ds) > cfg.ft_batch_size)
    steps = max(1, math.ceil(len(ds) / (bs * d.world)))
    total = cfg.ft_epochs * steps
    for epoch in range(epoch0, cfg.ft_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        torch.manual_seed(cfg.seed * 7919 + epoch + 1000003 * d.rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=cfg.workers)
        else:
            loader = DataLoader(ds, batch_size=bs, shuffle=True, generator=g,
                                num_workers=cfg.workers, drop_last=len(ds) > cfg.ft_batch_size)
        net.train()
        BNFrozen.apply(net)
        tot, n = 0.0, 0
        with progress() as prog:
            task = prog.add_task(f"fine-tune {epoch + 1}/{cfg.ft_epochs}", total=len(loader), info="")
            for s, (x, y, _, ok) in enumerate(loader):
                _set_lr(opt, _cosine(epoch * steps + s, total, 1.0, warmup=min(steps, 50)))
                if not ok.all():
                    x, y = x[ok], y[ok]
                loss = loss_fn(net(x), y)
                require_finite(loss, f"the fine-tuning loss at epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(y)
                n += len(y)
                prog.advance(task)
        tot, n = d.all_reduce_sum([tot, float(n)])
        logits = evaluate(model, report.val, pre, cfg, "val", d)
        acc = float((logits.argmax(1) == yva).mean())
        history.append({"phase": "finetune", "epoch": epoch + 1, "train_loss": tot / max(n, 1),
                        "val_loss": float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(yva).long())),
                        "val_acc": acc, "lr": opt.param_groups[1]["lr"]})
        if d.is_main:
            note(f"fine-tune epoch {epoch + 1}/{cfg.ft_epochs}: val top-1 {acc:.4f}")
        if acc > best["acc"]:
            best = {"acc": acc, "epoch": epoch + 1, "state": {k2: v.clone() for k2, v in model.state_dict().items()}}
        if resume:
            resume.save({"phase": "finetune", "epoch": epoch, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "history": history, "best": best})
        maybe_interrupt(f"finetune:{epoch}")
    model.load_state_dict(best["state"])
    for p in model.parameters():
        p.requires_grad_(False)
    return history, {"best_epoch": best["epoch"], "best_val_acc": best["acc"], "stages": len(stages)}


# ------------------------------------------------------------------------------------------- run

def _versions() -> dict[str, str]:
    import PIL
    import torchvision
    return {"tledge": tledge.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "python": platform.python_version()}


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    finished = card_mod.path(out).is_file()
    if finished and not overwrite:
        raise RunDirError(f"{out} already holds a finished run ({card_mod.path(out)}).",
                          "pass --overwrite to replace it, or choose another --out.")
    if finished and overwrite:
        # The card goes first: if this run is interrupted, the folder must not look finished.
        card_mod.path(out).unlink()
    out.mkdir(parents=True, exist_ok=True)
    # A new checkpoint is coming: nothing made from the old one may survive beside it (graphs, engines,
    # calibration, bench results, the bundle).
    gone = artefacts.invalidate(out)
    if gone:
        note(f"removed what the previous checkpoint in {out} had made: {', '.join(gone)}")


def activation_bytes(net: nn.Module, size: int, probe: int = 64) -> int:
    """Bytes of the two largest activations of one image at ``size`` px (what an inference forward pass holds
    at its peak), measured at ``probe`` px with forward hooks and scaled by area: convolutional activations
    grow with the square of the input size."""
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            sizes.append(o.numel() * o.element_size())
    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            net.eval()(torch.zeros(1, 3, probe, probe))
    finally:
        for h in handles:
            h.remove()
    top = sorted(sizes)[-2:]
    return int(sum(top) * (size / probe) ** 2)


def preflight(spec: backbones.BackboneSpec, pre: Any, cfg: TuneConfig) -> None:
    """Refuse, before any work, what cannot succeed: an --unfreeze beyond the backbone's stages, and an
    input size whose feature extraction (or fine-tuning) needs more memory than this machine has free.
    The estimate: input batches in flight (the batch being computed plus the loaders' prefetch) plus the
    network's peak activations; fine-tuning keeps about three times the activations for the backward pass."""
    import psutil

    net = spec.build_arch()
    if cfg.unfreeze:
        n = len(spec.stages(net))
        if cfg.unfreeze > n:
            raise UsageError(f"--unfreeze {cfg.unfreeze} is out of range: {spec.name} has {n} stages.",
                             f"pass a number from 1 to {n}.")
    image = int(np.prod(pre.input_shape)) * 4
    act = activation_bytes(net, pre.crop, probe=max(64, spec.min_size))
    in_flight = 1 + 4 * max(cfg.workers, 0)  # DataLoader prefetch_factor 4 per worker
    need = cfg.extract_batch_size * (image * in_flight + act)
    if cfg.unfreeze:
        need = max(need, cfg.ft_batch_size * (image * in_flight + 3 * act))
    free = psutil.virtual_memory().available
    if need > 0.8 * free:
        raise UsageError(f"--image-size {pre.crop} needs about {need / 2**30:.1f} GiB for {spec.name} at batch "
                         f"{cfg.extract_batch_size if not cfg.unfreeze else cfg.ft_batch_size} (input batches in flight "
                         f"and peak activations), more than the {free / 2**30:.1f} GiB free here.",
                         f"pass a smaller --image-size (the weights' own is {spec.input_size}).")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_tune(data_dir: str | Path, out_dir: str | Path, cfg: TuneConfig, resume: bool = False,
             overwrite: bool = False, dist: Dist | None = None) -> dict[str, Any]:
    """Scan, extract (cached) features, train the head, optionally fine-tune, and write the run.
    With ``dist`` (torchrun), work is shared across ranks and only rank 0 writes (tledge.distributed)."""
    d = dist or Dist()
    out = Path(out_dir)
    spec = backbones.get(cfg.backbone)
    if cfg.head not in ("linear", "mlp"):
        raise UsageError(f"unknown head '{cfg.head}'; choices: linear, mlp.", "pass --head linear or --head mlp.")
    pre = spec.preprocess if cfg.image_size is None else spec.preprocess.scaled(cfg.image_size)
    if cfg.resize_mode not in RESIZE_MODES:
        raise UsageError(f"unknown resize mode '{cfg.resize_mode}'; choices: {', '.join(RESIZE_MODES)}.",
                         "pass one of them to --resize-mode.")
    pre = pre.with_resize_mode(cfg.resize_mode)
    if pre.crop < spec.min_size:
        raise UsageError(f"--image-size {pre.crop} is below {spec.name}'s minimum of {spec.min_size}.",
                         f"pass --image-size {spec.min_size} or more.")
    if pre.crop % spec.size_multiple:
        raise UsageError(f"--image-size {pre.crop} does not fit {spec.name}: its input must be a multiple of "
                         f"{spec.size_multiple}.", f"pass --image-size {spec.size_multiple} (or a multiple).")
    if cfg.unfreeze < 0:
        raise UsageError(f"--unfreeze {cfg.unfreeze} is negative.", "pass 0 (frozen) or a positive count.")
    for name, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--patience", cfg.patience),
                        ("--ft-epochs", cfg.ft_epochs)):
        if value < 1:
            raise UsageError(f"{name} {value} is not a positive count.", f"pass {name} 1 or more.")
    for name, value in (("--lr", cfg.lr), ("--ft-lr", cfg.ft_lr)):
        if not value > 0:
            raise UsageError(f"{name} {value} is not a positive learning rate.", f"pass e.g. {name} 1e-3.")
    with status(f"checking that {spec.name} at {pre.crop} px fits in this machine's memory"):
        preflight(spec, pre, cfg)
    if d.is_main:
        _prepare_run_dir(out, overwrite)
    d.barrier()
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if d.enabled and d.is_main:
            note(f"distributed tune: world size {d.world}, backend {d.backend}")
        report = scan(data_dir, cfg.val_fraction, cfg.seed, dist=d if d.enabled else None)
        if d.is_main:
            err.print(format_report(report))
        maybe_inject_fault(d, "scan")
        # Seed before building: a randomly initialised backbone must be the same on every rank and run.
        torch.manual_seed(cfg.seed)
        model, winfo = backbones.build_backbone(spec, cfg.weights)
        if winfo["source"] == "none" and d.is_main:
            warn("[bold red]--weights none: the backbone is RANDOMLY INITIALISED, not pretrained. "
                 "Expect poor accuracy; use this only for tests.[/]")
        torch.manual_seed(cfg.seed)
        run_key = sha256_json({"cfg": cfg.training_key(), "data": report.identity(), "weights": winfo.get("sha256")})
        state = ResumeState(out, run_key)
        start = None
        if d.is_main:
            if state.exists():
                if resume:
                    start = state.load()
                else:
                    note(f"{state.dir} holds an interrupted run; starting clean (pass --resume to continue it).")
                    state.clear()
            elif resume:
                note(f"nothing to resume in {out}; starting from the beginning.")
        start = d.broadcast(start)

        cache_key = {"backbone": spec.name, "weights": winfo.get("sha256") or f"random-seed-{cfg.seed}",
                     "preprocess": pre.to_dict(), "dtype": "float32"}
        cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), cache_key)
        t_feat = time.perf_counter()
        # One pass over train and val together: one loader start-up and no pipeline drain in between.
        # With several ranks, each extracts its share (cache shards readable by any world size) and the
        # features are all-gathered in order.
        everything = report.train + report.val
        mine = d.shard(everything)
        feats_mine, fstat = extract(model, mine, pre, cache, cfg.extract_batch_size, cfg.workers, label="features")
        if d.enabled:
            secs = time.perf_counter() - t_feat
            err.print(f"rank {d.rank}/{d.world}: {len(mine)} images ({fstat['computed']} computed) in {secs:.1f}s, "
                      f"{fstat['computed'] / max(secs, 1e-9):.1f} img/s")
            maybe_inject_fault(d, "features")
            parts = d.all_gather((feats_mine, fstat))
            rows = d.unshard([list(p[0]) for p in parts])
            dim = max(p[0].shape[1] for p in parts)
            all_feats = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
            fstat = {"cached": sum(p[1]["cached"] for p in parts), "computed": sum(p[1]["computed"] for p in parts),
                     "failed": sum(p[1]["failed"] for p in parts),
                     "failed_shas": sorted({x for p in parts for x in p[1]["failed_shas"]}), "world_size": d.world}
        else:
            all_feats = feats_mine
        if fstat["failed"]:
            # Files that changed after the scan: drop them, and say so.
            bad = set(fstat["failed_shas"])
            warn(f"{fstat['failed']} images could not be decoded any more and were skipped: "
                 + ", ".join(s.path for s in everything if s.sha256 in bad)[:2000])
        require_finite(all_feats, "the backbone features")
        feats = {}
        n_tr = len(report.train)
        for split, part, rows in (("train", report.train, all_feats[:n_tr]), ("val", report.val, all_feats[n_tr:])):
            keep = [i for i, s in enumerate(part) if s.sha256 not in set(fstat["failed_shas"])]
            setattr(report, split, [part[i] for i in keep])
            feats[split] = rows[keep]
        t_feat = time.perf_counter() - t_feat
        if d.is_main:
            note(f"features: {fstat['computed']} computed, {fstat['cached']} from cache ({cache.dir}) in {t_feat:.1f}s")

        ytr = np.array([s.label for s in report.train])
        yva = np.array([s.label for s in report.val])
        k = len(report.classes)
        t_head = time.perf_counter()
        if start and start.get("phase") == "finetune":
            head = make_head(cfg.head, spec.feature_dim, k, cfg.hidden, cfg.dropout)
            history, head_summary = start["head_history"], start["head_summary"]
        elif d.is_main:
            # The head trains on rank 0 only: on cached features it takes about a second, less than
            # DistributedDataParallel's per-step all-reduce would add.
            head, history, head_summary = train_head(feats["train"], ytr, feats["val"], yva, k, cfg, state, start)
        if d.enabled and not (start and start.get("phase") == "finetune"):
            shared = d.broadcast((head.state_dict(), history, head_summary) if d.is_main else None)
            if not d.is_main:
                head = make_head(cfg.head, spec.feature_dim, k, cfg.hidden, cfg.dropout)
                head.load_state_dict(shared[0])
                head.eval()
                history, head_summary = shared[1], shared[2]
        t_head = time.perf_counter() - t_head
        classifier = Classifier(model, head).eval()
        ft_summary = None
        if cfg.unfreeze:
            head_hist = list(history)
            ft_hist, ft_summary = finetune(classifier, spec, report, pre, cfg,
                                           _FtResume(state, head_hist, head_summary) if d.is_main else None,
                                           start if start and start.get("phase") == "finetune" else None, d)
            history = head_hist + ft_hist
            logits = evaluate(classifier, report.val, pre, cfg, "val", d)
        else:
            with torch.no_grad():
                logits = head(torch.from_numpy(feats["val"])).numpy()
        from tledge.metrics import classification_summary, plot_history, write_history_csv
        val_metrics = classification_summary(logits, yva, report.classes)
        with torch.no_grad():
            train_acc = float((head(torch.from_numpy(feats["train"])).argmax(1).numpy() == ytr).mean()) \
                if not cfg.unfreeze else None

        if not d.is_main:
            d.barrier()  # rank 0 writes the run directory
            return {}
        for name, tensor in classifier.state_dict().items():
            if tensor.is_floating_point():
                require_finite(tensor, f"the trained weight {name}")
        save_checkpoint(classifier, out / "checkpoint.safetensors",
                        {"backbone": spec.name, "classes": ",".join(report.classes)})
        ckpt_sha = sha256_file(out / "checkpoint.safetensors")
        write_history_csv(out / "metrics.csv", history)
        plot_history(out / "training_curve.png", history, f"{spec.name} on {Path(data_dir).name}")
        wall = time.perf_counter() - t0
        card = {
            "tledge_version": tledge.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": "checkpoint.safetensors",
            "checkpoint_sha256": ckpt_sha,
            "output": "logits",
            "backbone": {"name": spec.name, "family": spec.family, "feature_dim": spec.feature_dim,
                         "replaced_layer": spec.head_path, "weights": winfo},
            "head": {"kind": cfg.head, "in_features": spec.feature_dim, "hidden": cfg.hidden,
                     "dropout": cfg.dropout},
            "classes": report.classes,
            "input": {"name": "input", "shape": ["batch", *pre.input_shape], "dtype": "float32"},
            "preprocess": pre.to_dict(),
            "training": {"config": asdict(cfg), "unfreeze": cfg.unfreeze, "head": head_summary,
                         "finetune": ft_summary, "seed": cfg.seed, "world_size": d.world},
            "metrics": {"val": val_metrics, "train_top1": train_acc},
            "timing_s": {"total": round(wall, 3), "features": round(t_feat, 3), "head": round(t_head, 3)},
            "feature_cache": {"dir": str(cache.dir), **{k2: v for k2, v in fstat.items() if k2 != "failed_shas"}},
            "dataset": report.summary(),
            "dataset_sha256": report.identity(),
            "versions": _versions(),
        }
        write_index(report, out)
        card_mod.write(out, card)
        state.clear()
        d.barrier()
        return card
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: finished epochs and cached features are kept; continue with "
                  "`--resume` and the same options (or run again without it to start clean).")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


class _FtResume(ResumeState):
    """Resume state for the fine-tuning phase, carrying the head phase's history along."""

    def __init__(self, base: ResumeState, head_history: list[dict[str, float]], head_summary: dict[str, Any]) -> None:
        super().__init__(base.dir.parent, base.key)
        self.extra = {"head_history": head_history, "head_summary": head_summary}

    def save(self, state: dict[str, Any]) -> None:
        super().save({**state, **self.extra})
