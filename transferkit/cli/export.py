"""``python -m transferkit export``: a checkpoint to ONNX or TorchScript for serving, optionally INT8."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence

import numpy as np

from transferkit.errors import ConfigError
from transferkit.inference.export import EXPORT_FORMATS, export_checkpoint

# an output's name -> one of its elements, for the check's lines
_ONE = {
    "logits": "logit",
    "probabilities": "probability",
    "standardised": "standardised output",
    "values": "value",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit export",
        description=(
            "Export a transferkit checkpoint (BatchNorm folded, eval mode) to ONNX or TorchScript. Inputs: "
            "images (B, 3, S, S) through the eval pipeline; outputs: the head's raw outputs and what "
            "predict-images gives for one view: single label: logits and probabilities (B, C); multi-label: "
            "logits and probabilities (B, L), one sigmoid per label; regression: standardised and values "
            "(B, T), in the targets' own units. The eval pipeline, input size, mean, std, class names, class "
            "groups, the target (kind, names, a multi-label model's per-label thresholds, a regression model's "
            "target mean and std), the decision and what each output means go to <name>.preprocessing.json "
            "beside it (and into the ONNX file's metadata). With --quantize int8 also <name>.int8.onnx, "
            "calibrated on training (or validation) images of the recipe given with --config, or on "
            "--calibration-images; never on the test split."
        ),
    )
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a transferkit .ckpt file")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    parser.add_argument(
        "--out", default=None, help="the file to write (default: next to the checkpoint, same name)"
    )
    q = parser.add_argument_group("INT8 (ONNX only; ONNX Runtime's static quantisation, QDQ, per-channel)")
    q.add_argument("--quantize", choices=["int8"], default=None, help="also write <name>.int8.onnx")
    q.add_argument(
        "--calibrate-on",
        choices=["train", "val"],
        default="train",
        help="the recipe's split whose images calibrate the ranges (with --config; default: %(default)s)",
    )
    q.add_argument(
        "--calibration-images",
        nargs="+",
        default=None,
        metavar="PATH",
        help="image files or folders to calibrate on instead of a recipe's split (not test images)",
    )
    q.add_argument(
        "--calibration-count", type=int, default=256, help="images to calibrate on (default: %(default)s)"
    )
    q.add_argument(
        "--keep-fp32",
        nargs="*",
        default=[],
        metavar="MODULE",
        help="modules left in float: stem, head, or a module path such as backbone.model.blocks.6",
    )
    q.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights, for serving on x86 CPUs without VNNI (AVX2 only), where 8-bit weights can saturate; "
        "costs accuracy (docs/benchmarks.md)",
    )
    q.add_argument(
        "--weights",
        choices=["int8", "uint8"],
        default="int8",
        help="weight type (default: %(default)s; uint8 with uint8 activations never saturates but runs slowly)",
    )
    q.add_argument(
        "--activations",
        choices=["uint8", "int8"],
        default="uint8",
        help="activation type (default: %(default)s)",
    )
    q.add_argument(
        "--calibration",
        choices=["minmax", "percentile", "entropy"],
        default="percentile",
        help="how activation ranges are set from the calibration images (default: %(default)s)",
    )
    return parser


def _calibration_source(args: argparse.Namespace, rest: list[str], transform) -> tuple[list, str]:
    """Images to calibrate on, ``(datasets of (tensor, label) or file paths, a description)``, split into
    calibration and a held-out check of the int8 model against fp32."""
    if args.calibration_images:
        from transferkit.inference.predict import list_images

        files = list_images(args.calibration_images)
        if not files:
            raise ConfigError(f"no image files in {', '.join(args.calibration_images)} to calibrate on.")
        return files, f"{len(files)} files given with --calibration-images"
    if not rest:
        raise ConfigError(
            "--quantize int8 needs calibration images: the recipe the model was trained with (--config "
            "recipes/X.yaml, its training split is used) or --calibration-images DIR (training images, not test)."
        )
    from transferkit.cli.recipes import load_recipe

    recipe = load_recipe(rest, logger=False)
    dm = recipe.datamodule
    dm.setup("fit")
    dataset = dm.datasets.get(args.calibrate_on)
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"the recipe's {args.calibrate_on} split is empty: nothing to calibrate on.")
    images = dm.image_dataset(dataset.items, dataset.labels, transform)
    return images, f"the {args.calibrate_on} split of '{dm.data.name}' ({len(dataset)} images)"


def _batches(source, indices: Sequence[int], transform, batch_size: int = 16) -> Iterator[np.ndarray]:
    from transferkit.data.images import load_image

    for start in range(0, len(indices), batch_size):
        chunk = []
        for i in indices[start : start + batch_size]:
            item = source[i]
            if isinstance(item, str):
                chunk.append(transform(image=load_image(item))["image"].float().numpy())
            else:
                chunk.append(item[0].float().numpy())
        yield np.stack(chunk)


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(list(argv))
    if args.quantize and args.format != "onnx":
        parser.error("--quantize int8 applies to ONNX: use --format onnx.")
    if not args.quantize and (rest or args.calibration_images):
        parser.error(f"unrecognised arguments: {' '.join(rest)} (a recipe is read for --quantize int8 only)")
    if args.calibration_count < 8:
        parser.error(f"--calibration-count must be at least 8, got {args.calibration_count}.")
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
    if preprocessing.get("class_groups"):
        groups = "; ".join(f"{g} = {', '.join(c)}" for g, c in preprocessing["class_groups"].items())
        print(f"  class groups: {groups} (the most probable group is the verdict)")
    print(f"preprocessing: {result.preprocessing}")
    if args.quantize:
        _quantize(args, rest, result.path)
    return 0


def _quantize(args: argparse.Namespace, rest: list[str], fp32_path) -> None:
    import torch

    from transferkit.inference.exported import load_exported
    from transferkit.inference.quantize import QuantizeSettings, quantize_onnx, vnni

    settings = QuantizeSettings(
        reduce_range=args.reduce_range,
        activations=args.activations,
        weights=args.weights,
        calibration=args.calibration,
        keep_fp32=tuple(args.keep_fp32),
    )
    fp32, transform = load_exported(fp32_path)
    source, described = _calibration_source(args, rest, transform)
    order = np.random.default_rng(0).permutation(len(source)).tolist()
    count = min(args.calibration_count, len(order))
    held_out = order[count : count + 128]  # the same source, not calibrated on: the int8 model's check
    result = quantize_onnx(fp32_path, _batches(source, order[:count], transform), settings=settings)
    print(
        f"quantised {result.path} ({result.size_bytes / 1e6:.2f} MB, fp32 {result.fp32_size_bytes / 1e6:.2f} MB)"
    )
    print(f"  calibrated on {result.calibration_images} images of {described}")
    shown = ", ".join(f"{n} {op}" for op, n in sorted(result.quantized_ops.items()))
    print(f"  int8 ops: {shown}")
    if result.float_ops:
        print(f"  float ops: {', '.join(f'{n} {op}' for op, n in sorted(result.float_ops.items()))}")
    s = settings.describe()
    print(
        f"  settings: QDQ, weights {s['weights']} per channel{' (7-bit: reduce_range)' if s['reduce_range'] else ''}, "
        f"activations {s['activations']}, calibration {s['calibration']}"
        + (f", kept in float: {', '.join(s['keep_fp32'])}" if s["keep_fp32"] else "")
    )
    if vnni() is False and not settings.reduce_range and settings.weights == "int8":
        print(
            "  note: this CPU has no VNNI, where 8-bit weights can saturate: compare the check below with the "
            "fp32 model, and export with --reduce-range if it disagrees more than you accept"
        )
    if held_out:
        int8, _ = load_exported(result.path)
        same = total = 0
        worst = 0.0
        for batch in _batches(source, held_out, transform):
            x = torch.from_numpy(batch)
            a, b = fp32.predict_proba(x, tta="none"), int8.predict_proba(x, tta="none")
            worst = max(worst, float((a - b).abs().max()))
            if fp32.task.kind != "regression":
                agree = fp32.predict_labels(a) == int8.predict_labels(b)
                same += int((agree.all(dim=-1) if agree.ndim > 1 else agree).sum())
            total += len(batch)
        agreement = (
            f"; same prediction as fp32 on {same} of {total}" if fp32.task.kind != "regression" else ""
        )
        print(
            f"  check on {total} held-out images of the same source: max |score difference| {worst:.3f}{agreement}"
        )
    print(f"preprocessing: {result.preprocessing}")
