"""``python -m transferkit export``: a checkpoint to ONNX or TorchScript for serving."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from transferkit.inference.export import EXPORT_FORMATS, export_checkpoint

# an output's name -> one of its elements, for the check's lines
_ONE = {
    "logits": "logit",
    "probabilities": "probability",
    "standardised": "standardised output",
    "values": "value",
}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit export",
        description=(
            "Export a transferkit checkpoint (BatchNorm folded, eval mode) to ONNX or TorchScript. Inputs: "
            "images (B, 3, S, S) through the eval pipeline; outputs: the head's raw outputs and what "
            "predict-images gives for one view: single label: logits and probabilities (B, C); multi-label: "
            "logits and probabilities (B, L), one sigmoid per label; regression: standardised and values "
            "(B, T), in the targets' own units. The eval pipeline, input size, mean, std, class names, the "
            "target (kind, names, a multi-label model's per-label thresholds, a regression model's target "
            "mean and std) and what each output means go to <name>.preprocessing.json beside it (and into "
            "the ONNX file's metadata)."
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
    raw, scores = (_ONE.get(name, name) for name in result.output_names)
    if result.max_abs_diff is not None:
        print(f"  max |{raw} difference| vs the checkpoint model: {result.max_abs_diff:.2e}")
    if result.scores_max_abs_diff is not None:
        print(f"  max |{scores} difference| vs its predictions: {result.scores_max_abs_diff:.2e}")
    preprocessing = json.loads(result.preprocessing.read_text())
    for name in result.output_names:
        print(f"  output {name}: {preprocessing['outputs'][name]}")
    print(f"  decision: {preprocessing['decision']}")
    print(f"preprocessing: {result.preprocessing}")
    return 0
