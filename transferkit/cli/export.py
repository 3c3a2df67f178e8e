"""``python -m transferkit export``: a checkpoint to ONNX or TorchScript for serving."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from transferkit.inference.export import EXPORT_FORMATS, export_checkpoint


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit export",
        description=(
            "Export a transferkit checkpoint (BatchNorm folded, eval mode) to ONNX or TorchScript. Inputs: "
            "images (B, 3, S, S) through the eval pipeline; outputs: logits and probabilities (B, C). "
            "The eval pipeline, input size, mean, std and class names go to <name>.preprocessing.json "
            "beside it (and into the ONNX file's metadata)."
        ),
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a transferkit .ckpt file")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument(
        "--out", default=None, help="the file to write (default: next to the checkpoint, same name)"
    )
    args = parser.parse_args(list(argv))
    result = export_checkpoint(args.ckpt_path, args.format, args.out)
    print(f"exported {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format})")
    print(f"  {result.folded_batchnorms} BatchNorm layers folded into the layers before them")
    if result.max_abs_diff is not None:
        print(f"  max |logit difference| vs the checkpoint model: {result.max_abs_diff:.2e}")
    print(f"preprocessing: {result.preprocessing}")
    return 0
