"""``python -m transferkit serve --model PATH``: an HTTP server for a checkpoint or an exported model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from transferkit.errors import MissingDependencyError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit serve",
        description=(
            "Serve a transferkit checkpoint (.ckpt) or exported model (.onnx, fp32 or int8) over HTTP: POST "
            "/predict (multipart/form-data images, or one image as the body), GET /health, GET /info, and a page "
            "to try it at GET /. Requests are batched across clients; the queue is bounded (503 when full), "
            "requests time out (504), and file size, pixel and file-count limits are flags. Needs "
            "pip install 'transferkit[serve]'."
        ),
    )
    parser.add_argument("--model", required=True, help="a .ckpt checkpoint or an exported .onnx model")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token",
        default=os.environ.get("TRANSFERKIT_SERVE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on /predict and /info (default: $TRANSFERKIT_SERVE_TOKEN)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=16, help="images per model call (default: %(default)s)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a batch waits to fill (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="images waiting or running before 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before 504 (default: %(default)s)"
    )
    parser.add_argument("--max-files", type=int, default=16, help="images per request (default: %(default)s)")
    parser.add_argument("--max-file-mb", type=float, default=10.0, help="MB per image (default: %(default)s)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="pixels per image, from its header (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="model threads (default: torch's / ONNX Runtime's own)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        import uvicorn
    except ImportError as err:
        raise MissingDependencyError(
            "serve needs FastAPI and uvicorn: pip install 'transferkit[serve]'."
        ) from err
    from transferkit.serving.app import ServeSettings, create_app
    from transferkit.serving.predictor import Predictor

    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_files=args.max_files,
        max_file_mb=args.max_file_mb,
        max_pixels=args.max_pixels,
        token=args.token,
    )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    predictor = Predictor.load(args.model, threads=args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        print(
            f"warning: serving on {args.host} without a token: anyone who can reach it can use the model "
            "(--token or TRANSFERKIT_SERVE_TOKEN)",
            file=sys.stderr,
        )
    _warn_without_vnni(predictor)
    info = predictor.describe()
    print(
        f"serving {info['model_version']} ({info['format']}, {info['kind']}, {len(info['classes'])} classes) "
        f"on http://{args.host}:{args.port}/ - try it in a browser there; POST /predict for programs",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(predictor, settings), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    return 0


def _warn_without_vnni(predictor) -> None:
    quantization = getattr(predictor.model, "quantization", None)
    if not quantization or quantization.get("reduce_range") or quantization.get("weights") == "uint8":
        return
    from transferkit.inference.quantize import vnni

    if vnni() is False:
        print(
            "warning: this CPU has no VNNI and the int8 model has 8-bit weights, whose products can saturate "
            "here: check its predictions against the fp32 model, or export it with --reduce-range",
            file=sys.stderr,
        )
