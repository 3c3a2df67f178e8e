"""Where a benchmark's figures come from: the commit, the command line, the machine, library versions, the date.

Every benchmark script adds ``provenance()`` to the JSON it prints, and ``save()`` writes that JSON to a
results file, so each figure quoted in README.md, docs/ or a recipe header can be traced to the code and
the machine that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_LIBRARIES = ("torch", "torchvision", "timm", "lightning", "albumentations", "numpy", "transferkit")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The instruction-set flags that decide which kernels run (AVX2, AVX-512, VNNI, AMX): int8 speed
    depends on them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f)
    except OSError:
        pass
    return []


def _memory_gb() -> float | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The record a results file carries: commit (and whether the tree had uncommitted changes), the
    command line, CPU model, cores, memory, GPU, OS, Python and library versions, and the UTC date."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(argv[0], ROOT) if argv and os.path.isabs(argv[0]) else (argv[0] if argv else "")
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", shlex.quote(script), *map(shlex.quote, argv[1:])]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cpu_flags": _cpu_flags(),
            "cores": os.cpu_count(),
            "memory_gb": _memory_gb(),
            "gpu": _gpu(),
            "os": platform.platform(),
        },
        "versions": versions,
    }


def write(report: dict[str, Any], out: str | os.PathLike) -> None:
    """Write ``report`` as JSON to ``out`` without printing it (a partial file, rewritten as a run goes on)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def save(report: dict[str, Any], out: str | os.PathLike | None) -> None:
    """Print ``report`` as JSON and, with ``out``, write it there too (a results file)."""
    text = json.dumps(report, indent=2) + "\n"
    print(text, end="")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
