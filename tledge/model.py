"""The merged network (backbone + head) and its checkpoint: what tune writes and every later step loads.

The network outputs logits (no softmax): export, bench, predict and the deploy runtime all apply softmax
themselves where they show probabilities.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tledge import backbones


class Classifier(nn.Module):
    """Pretrained backbone (ImageNet classifier removed) followed by a new head; returns logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_head(kind: str, in_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.2) -> nn.Module:
    """``linear``: one Linear layer. ``mlp``: Linear-ReLU-Dropout-Linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown head kind {kind!r}; choices: linear, mlp")


def build_classifier(card: dict[str, Any]) -> Classifier:
    """The architecture described by a model card, random weights (load the checkpoint next)."""
    spec = backbones.get(card["backbone"]["name"])
    net = spec.build_arch()
    if spec.family == "inception":
        net.aux_logits = False
        net.AuxLogits = None
    backbones.set_submodule(net, spec.head_path, nn.Identity())
    h = card["head"]
    head = make_head(h["kind"], h["in_features"], len(card["classes"]), h.get("hidden", 512), h.get("dropout", 0.2))
    return Classifier(net, head)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    from tledge.fsutil import atomic_path

    # clone(): safetensors refuses tensors that share storage, and views of parameters may do so.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def load_classifier(run_dir: str | os.PathLike, card: dict[str, Any] | None = None) -> Classifier:
    """Rebuild the merged network of a finished run from its model card and checkpoint (eval mode)."""
    from safetensors.torch import load_file

    from tledge import card as card_mod

    from tledge.export.artefacts import checkpoint_sha256

    run = Path(run_dir)
    card = card or card_mod.read(run)
    ckpt = run / card.get("checkpoint", "checkpoint.safetensors")
    checkpoint_sha256(run, card)  # missing, or not the file the card describes: a clear error naming it
    model = build_classifier(card)
    model.load_state_dict(load_file(str(ckpt)), strict=True)
    return model.eval()
