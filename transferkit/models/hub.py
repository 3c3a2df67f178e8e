"""Weights from the Hugging Face model hub, the local cache first.

The usual cluster workflow downloads weights on a login node (which has network) and trains on compute
nodes (which have none), often with ``HF_HUB_OFFLINE=1``. So ``pretrained="hub"`` looks in the local
Hugging Face cache before it touches the network:

1. the cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``) holds the
   weights: they are loaded from there, with no network call, whether or not ``HF_HUB_OFFLINE`` is set;
2. otherwise, with ``HF_HUB_OFFLINE`` set, or when the hub does not answer within seconds, a
   :class:`~transferkit.errors.HubUnreachableError` says where it looked and what to do;
3. otherwise timm downloads them (into that cache).

Both a timm architecture name (``tf_efficientnet_lite0``, ``resnet50.a1_in1k``: its pretrained config
names the hub repository) and an explicit ``hf-hub:org/name[@revision]`` id work. To fill the cache on a
machine with network::

    python -c "import timm; timm.create_model('resnet50.a1_in1k', pretrained=True)"
    # or: huggingface-cli download timm/resnet50.a1_in1k
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from transferkit.errors import HubUnreachableError

__all__ = [
    "HubWeights",
    "architecture_source",
    "hub_cache_dir",
    "hub_weights",
    "find_cached",
    "create_from_hub",
]

HF_HUB_PREFIX = "hf-hub:"
# what timm's hub loader reads, in its order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubWeights:
    """Where a model's hub weights live: the repository, revision and file names to look for."""

    repo_id: str
    revision: str | None
    files: tuple[str, ...]
    needs_config: bool  # an hf-hub: id: the architecture comes from the repository's config.json

    @property
    def label(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process reads, from the environment at the time of the call."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_weights(name: str) -> HubWeights | None:
    """The hub location of ``name``'s pretrained weights (``None`` when timm names no hub repository)."""
    if name.startswith(HF_HUB_PREFIX):
        repo, _, revision = name[len(HF_HUB_PREFIX) :].partition("@")
        return HubWeights(repo, revision or None, WEIGHT_FILES, needs_config=True)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
    return HubWeights(repo, revision or None, files, needs_config=False)


def find_cached(weights: HubWeights, cache_dir: Path | None = None) -> Path | None:
    """The cached weights file of ``weights`` (with its config.json beside it where one is needed), or None."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_dir or hub_cache_dir()

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(
            weights.repo_id, filename, cache_dir=cache_dir, revision=weights.revision
        )
        return Path(found) if isinstance(found, str) else None  # else None or "known not to exist"

    if weights.needs_config and cached("config.json") is None:
        return None
    for filename in weights.files:
        path = cached(filename)
        if path is not None:
            return path
    return None


def architecture_source(name: str) -> str:
    """What to hand ``timm.create_model`` for ``name`` without hub weights: an ``hf-hub:`` id whose
    repository is cached becomes its ``local-dir:`` snapshot (its config.json names the architecture),
    so rebuilding a model from a checkpoint needs no network; any other name is returned as it is."""
    weights = hub_weights(name) if name.startswith(HF_HUB_PREFIX) else None
    path = find_cached(weights) if weights is not None else None
    return f"local-dir:{path.parent}" if path is not None else name


def create_from_hub(name: str, **timm_kwargs: Any) -> tuple[nn.Module, str]:
    """``timm.create_model(name, pretrained=True, **timm_kwargs)``, from the local cache when it holds the
    weights; returns the model and a description of the weights (``hub:<repo>``)."""
    weights = hub_weights(name)
    if weights is None:  # timm knows only a URL for these weights (no hub repository)
        _check_reachable(name, looked="")
        return _download(name, timm_kwargs), f"hub:{name}"
    path = find_cached(weights)
    if path is not None:
        if weights.needs_config:  # the snapshot directory holds config.json and the weights
            model = timm.create_model(f"local-dir:{path.parent}", pretrained=True, **timm_kwargs)
        else:
            overlay = {**timm_kwargs.pop("pretrained_cfg_overlay", {}), "file": str(path)}
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
        return model, f"hub:{weights.label}"
    looked = (
        f"the local Hugging Face cache ({hub_cache_dir()}) has no {' or '.join(weights.files)} for "
        f"{weights.label}"
    )
    _check_reachable(name, looked)
    return _download(name, timm_kwargs, looked), f"hub:{weights.label}"


def _download(name: str, timm_kwargs: dict[str, Any], looked: str = "") -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as err:  # timm/huggingface raise many types for a failed download
        raise HubUnreachableError(_message(name, f"the download failed: {err}", looked)) from err


def _endpoint() -> str:
    return (
        os.environ.get("TRANSFERKIT_HUB_ENDPOINT")
        or os.environ.get("HF_ENDPOINT")
        or "https://huggingface.co"
    )


def _message(name: str, why: str, looked: str) -> str:
    where = f"{looked}, and " if looked else ""
    return (
        f"weights for '{name}': {where}the model hub ({_endpoint()}) is unreachable: {why}. "
        'Fill the cache on a machine with network (python -c "import timm; timm.create_model('
        f"'{name}', pretrained=True)\") and copy it here or point HF_HUB_CACHE at it."
    )


def _check_reachable(name: str, looked: str) -> None:
    """Fail fast (seconds, not minutes of retries) when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HubUnreachableError(_message(name, "HF_HUB_OFFLINE is set", looked))
    url = urllib.parse.urlparse(_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)

    def connect() -> None:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            pass

    # name resolution ignores socket timeouts, so the whole probe runs under a deadline
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=_PROBE_TIMEOUT_S * 2)
    except FutureTimeout as err:
        raise HubUnreachableError(_message(name, f"no answer from {host}:{port} in time", looked)) from err
    except OSError as err:
        raise HubUnreachableError(_message(name, f"cannot connect to {host}:{port} ({err})", looked)) from err
    finally:
        pool.shutdown(wait=False)
