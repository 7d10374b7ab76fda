"""The registry builds every backbone, its metadata matches torchvision, weights load from files, and
offline failures name the file and the folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tledge import backbones
from tledge.errors import UsageError, WeightsError

TV_NAMES = [n for n in backbones.names() if backbones.get(n).weights_url]
REQUIRED = {"resnet18", "resnet50", "vgg16", "inception_v3", "mobilenet_v2", "mobilenet_v3_large",
            "mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0"}


def test_required_backbones_registered() -> None:
    assert REQUIRED <= set(backbones.names())


@pytest.mark.parametrize("name", backbones.names())
def test_builds_and_outputs_feature_dim(name: str) -> None:
    spec = backbones.get(name)
    model, info = backbones.build_backbone(spec, "none")
    assert info["source"] == "none"
    size = max(spec.min_size, 96)
    size += -size % spec.size_multiple
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, spec.feature_dim)


@pytest.mark.parametrize("name", TV_NAMES)
def test_metadata_matches_torchvision(name: str) -> None:
    import torchvision
    spec = backbones.get(name)
    w = torchvision.models.get_model_weights(name)[spec.weights_name]
    assert backbones._tv_preprocess(name, spec.weights_name) == spec.preprocess
    assert w.url == spec.weights_url
    head = backbones.get_submodule(spec.build_arch(), spec.head_path)
    assert isinstance(head, torch.nn.Linear) and head.in_features == spec.feature_dim


def test_unknown_backbone_suggests() -> None:
    with pytest.raises(UsageError, match="did you mean resnet50") as e:
        backbones.get("resnet5")
    assert "mobilenet_v2" in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_from_file(tmp_path: Path, fmt: str) -> None:
    spec = backbones.get("resnet18")
    ref = spec.build_arch()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(ref.state_dict(), str(path))
    else:
        torch.save(ref.state_dict(), path)
    model, info = backbones.build_backbone(spec, str(path))
    assert info["source"] == "file" and len(info["sha256"]) == 64
    torch.testing.assert_close(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_weights_file_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": object()}, path)  # arbitrary objects cannot be read with weights_only=True
    with pytest.raises(WeightsError, match="cannot read weights file"):
        backbones.build_backbone(backbones.get("resnet18"), str(path))


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(backbones.get("resnet18").build_arch().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2"):
        backbones.build_backbone(backbones.get("mobilenet_v2"), str(path))


def test_offline_error_names_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(WeightsError) as e:
        backbones.build_backbone(backbones.get("resnet50"), "imagenet")
    msg = str(e.value)
    assert "resnet50-0676ba61.pth" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg


def test_add_weights_checks_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    fake = tmp_path / "resnet18-f37072fd.pth"
    fake.write_bytes(b"not the real file")
    with pytest.raises(WeightsError, match="corrupt or not the original"):
        backbones.add_weights_file(fake)
    with pytest.raises(WeightsError, match="not the weights file of any registered backbone"):
        backbones.add_weights_file(tmp_path / "other.pth")


def test_real_mobilenet_weights_load_through_hub_cache(mobilenet_weights_available: bool) -> None:
    if not mobilenet_weights_available:
        pytest.fail("mobilenet_v2-b0353104.pth is not in torch's hub cache: run `make setup`")
    model, info = backbones.build_backbone(backbones.get("mobilenet_v2"), "imagenet")
    assert info["sha256"].startswith("b0353104")
    import torchvision
    ref = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref_feat = torch.nn.functional.adaptive_avg_pool2d(ref.features(x), 1).flatten(1)
        torch.testing.assert_close(model(x), ref_feat)


def test_real_efficientnet_lite0_weights_load() -> None:
    model, info = backbones.build_backbone(backbones.get("efficientnet_lite0"), "imagenet")
    assert info["sha256"].startswith("57934424")
