"""Whether two runs ended with the same weights: each checkpoint's ``state_dict``, tensor by tensor.

    python benchmarks/same_weights.py --before RUN_A/.../last.ckpt --after RUN_B/.../last.ckpt \\
        --out benchmarks/results/same-weights-X.json

A refactoring that must not change what a recipe trains is checked by training the same recipe and seed at
the commit before and after it and comparing the final weights exactly (``torch.equal``): a difference in
any tensor, or a tensor only one of them has, is listed. The checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402


def compare(before: str, after: str) -> dict:
    a = torch.load(before, map_location="cpu", weights_only=True)
    b = torch.load(after, map_location="cpu", weights_only=True)
    sa, sb = a["state_dict"], b["state_dict"]
    shared = sorted(set(sa) & set(sb))
    differing = [k for k in shared if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    return {
        "before": {"checkpoint": before, "epoch": a.get("epoch"), "global_step": a.get("global_step")},
        "after": {"checkpoint": after, "epoch": b.get("epoch"), "global_step": b.get("global_step")},
        "tensors": len(shared),
        "only_before": sorted(set(sa) - set(sb)),
        "only_after": sorted(set(sb) - set(sa)),
        "differing": differing,
        "identical": not differing and set(sa) == set(sb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="checkpoint of the run before the change")
    parser.add_argument("--after", required=True, help="checkpoint of the run after it")
    parser.add_argument("--label", default="", help="what the two runs are, for the record")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"benchmark": "same-weights", "label": args.label, **compare(args.before, args.after)}
    report["provenance"] = provenance()
    save(report, args.out)


if __name__ == "__main__":
    main()
