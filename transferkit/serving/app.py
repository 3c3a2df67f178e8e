"""The HTTP service: ``POST /predict``, ``GET /health``, ``GET /info`` and a page at ``GET /`` (FastAPI).

=====================  ===========================================================================
route                  what it answers
=====================  ===========================================================================
``GET /``              a page to try the model: choose or drop an image, see the top classes (and
                       the Grad-CAM overlay when the model can give one)
``GET /health``        ``{"status": "ok", "queue": ..., "token_required": ...}``, never needs the token
``GET /info``          classes, class groups, input size, kind, model version, the server's limits
``POST /predict``      ``multipart/form-data`` with one or several image files (any field name), or
                       one image as the raw body (``Content-Type: image/...``); ``?gradcam=1`` adds
                       an overlay for the first image (a checkpoint only)
=====================  ===========================================================================

``/predict`` answers ``{"predictions": [{"file", "predicted", "probs", "top", ["predicted_group",
"group_probs"]} ...], "model_version", "ms"}`` (a regression model: ``values``): the numbers
``predict-images`` writes for the same files. With a token (``ServeSettings.token``), ``/predict`` and
``/info`` need ``Authorization: Bearer <token>`` (or ``X-Token``). Refusals name the reason, as JSON
``{"error": ...}``: 400 (no image in the request, a file that is not an image or is truncated, too many
files), 401 (token), 411 (no Content-Length), 413 (a file or the request over its byte limit, an image over
the pixel limit), 415 (a content type that is neither multipart/form-data nor image/*), 503 (the queue is
full; ``Retry-After``), 504 (the request waited longer than its timeout). Each request is logged in one line
(logger ``transferkit.serve``): method, path, status, images, milliseconds, client, and the reason of a
refusal.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from transferkit.errors import ConfigError, ImageReadError, QueueFull, RequestRefused
from transferkit.serving.batcher import Batcher
from transferkit.serving.predictor import Predictor

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("transferkit.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits, validated at construction (``serve --help`` names each flag)."""

    max_batch: int = 16  # images per model call, across requests
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 64  # images waiting or running; beyond it: 503
    timeout_s: float = 30.0  # a request's wait for its answers; beyond it: 504
    max_files: int = 16  # images per request
    max_file_mb: float = 10.0  # bytes per image file
    max_pixels: int = 40_000_000  # width x height per image, checked before decoding
    token: str | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be > 0, got {getattr(self, name)}"
            for name in ("max_batch", "max_queue", "timeout_s", "max_files", "max_file_mb", "max_pixels")
            if not getattr(self, name) > 0
        ]
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_batch:
            problems.append(f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})")
        if self.max_queue < self.max_files:
            problems.append(
                f"max_queue ({self.max_queue}) must be at least max_files ({self.max_files}): a full request must fit"
            )
        if self.token is not None and len(self.token) < 8:
            problems.append("a token must be at least 8 characters")
        if problems:
            raise ConfigError("serve: " + "; ".join(problems) + ".")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)

    def public(self) -> dict[str, Any]:
        """The limits a client may know (not the token)."""
        values = asdict(self)
        values.pop("token")
        values["token_required"] = self.token is not None
        return values


def create_app(predictor: Predictor, settings: ServeSettings = ServeSettings()) -> Any:
    """The FastAPI application serving ``predictor`` under ``settings`` (run it with uvicorn)."""
    page = resources.files("transferkit.serving").joinpath("page.html").read_text()
    batcher = Batcher(predictor.predict, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
    prepare_pool: Any = None

    @asynccontextmanager
    async def lifespan(_app: Any):
        nonlocal prepare_pool
        import concurrent.futures

        prepare_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        batcher.start()
        log.info("serving %s (%s) with %s", predictor.version, predictor.kind, settings.public())
        yield
        await batcher.stop()
        prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="transferkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.predictor = predictor

    def refuse(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    def check_token(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("x-token") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise RequestRefused(401, "a valid token is needed: send 'Authorization: Bearer <token>'")

    @app.middleware("http")
    async def one_line_per_request(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        request.state.images = 0
        request.state.reason = ""
        try:
            response = await call_next(request)
        except Exception as err:  # never take the server down: a 500 with the reason, logged
            log.exception("internal error on %s %s", request.method, request.url.path)
            response = refuse(500, f"internal error ({type(err).__name__}); the server logged it")
        ms = (time.perf_counter() - start) * 1000
        client = request.client.host if request.client else "-"
        reason = f' reason="{request.state.reason}"' if request.state.reason else ""
        log.info(
            "%s %s %d images=%d ms=%.1f client=%s%s",
            request.method,
            request.url.path,
            response.status_code,
            request.state.images,
            ms,
            client,
            reason,
        )
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Any:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Any:
        return {
            "status": "ok",
            "queue": batcher.pending,
            "max_queue": settings.max_queue,
            "token_required": settings.token is not None,
        }

    @app.get("/info")
    async def info(request: Request) -> Any:
        try:
            check_token(request)
        except RequestRefused as refused:
            request.state.reason = refused.reason
            return refuse(refused.status, refused.reason)
        return {**predictor.describe(), "limits": settings.public()}

    async def read_images(request: Request) -> list[tuple[str, bytes]]:
        content_type = (request.headers.get("content-type") or "").lower()
        length = request.headers.get("content-length")
        if length is None:
            raise RequestRefused(411, "send a Content-Length header (chunked uploads are not accepted)")
        cap = settings.max_files * settings.max_file_bytes + 64_000
        if not length.isdigit() or int(length) > cap:
            raise RequestRefused(
                413,
                f"the request is {length} bytes; at most {settings.max_files} files of {settings.max_file_mb:g} MB "
                f"each ({cap:,} bytes) are accepted",
            )
        if content_type.startswith("image/"):
            body = await request.body()
            return [("upload" + _suffix(content_type), body)]
        if not content_type.startswith("multipart/form-data"):
            raise RequestRefused(
                415,
                f"content type '{content_type or 'none'}' is not accepted: send multipart/form-data with image "
                "files, or one image as the body with Content-Type image/jpeg, image/png ...",
            )
        try:
            form = await request.form(max_files=settings.max_files + 1, max_fields=settings.max_files + 8)
        except Exception as err:
            raise RequestRefused(400, f"the multipart body could not be read ({err})") from err
        files = [(v.filename or k, v) for k, v in form.multi_items() if hasattr(v, "read")]
        if len(files) > settings.max_files:
            raise RequestRefused(400, f"too many files: at most {settings.max_files} images per request")
        out = []
        for name, upload in files:
            data = await upload.read(settings.max_file_bytes + 1)
            if len(data) > settings.max_file_bytes:
                raise RequestRefused(
                    413,
                    f"'{name}' is over {settings.max_file_mb:g} MB, this server's limit for one image file",
                )
            out.append((name, data))
        await form.close()
        if not out:
            raise RequestRefused(
                400, "no image in the request: send one or more files in a multipart/form-data body"
            )
        return out

    def prepare(files: list[tuple[str, bytes]]) -> list[Any]:
        tensors = []
        for name, data in files:
            try:
                tensors.append(
                    predictor.prepare(predictor.decode(data, name, max_pixels=settings.max_pixels))
                )
            except ImageReadError as err:
                raise RequestRefused(413 if err.oversized else 400, f"'{name}': {err.reason}") from err
            except Exception as err:  # the pipeline rejected a readable image
                raise RequestRefused(
                    400, f"'{name}': the eval pipeline failed on it ({type(err).__name__})"
                ) from err
        return tensors

    @app.post("/predict")
    async def predict(request: Request, gradcam: bool = False) -> Any:
        start = time.perf_counter()
        try:
            check_token(request)
            if batcher.pending >= settings.max_queue:  # refuse before reading the body
                raise QueueFull(f"the queue is full ({batcher.pending} images); retry in a moment")
            files = await read_images(request)
            request.state.images = len(files)
            loop = asyncio.get_running_loop()
            tensors = await loop.run_in_executor(prepare_pool, prepare, files)
            answers = await batcher.submit(tensors, timeout=settings.timeout_s)
        except RequestRefused as refused:  # QueueFull too: 503 with Retry-After
            request.state.reason = refused.reason
            return refuse(refused.status, refused.reason, refused.headers)
        except TimeoutError:
            reason = f"no answer within {settings.timeout_s:g} s (the server is busy); retry later"
            request.state.reason = reason
            return refuse(504, reason)
        predictions = [{"file": name, **answer} for (name, _), answer in zip(files, answers, strict=True)]
        body: dict[str, Any] = {"predictions": predictions, "model_version": predictor.version}
        if gradcam:
            if predictor.gradcam_note is not None:
                body["gradcam_note"] = predictor.gradcam_note
            else:
                first = predictions[0]
                shown = (
                    first["predicted"] if isinstance(first.get("predicted"), str) else first["top"][0]["name"]
                )
                index = predictor.names.index(shown)
                body["gradcam"] = await asyncio.get_running_loop().run_in_executor(
                    batcher.executor, predictor.gradcam_data_url, tensors[0], index
                )
                body["gradcam_class"] = predictor.names[index]
        body["ms"] = round((time.perf_counter() - start) * 1000, 1)
        return body

    return app


def _suffix(content_type: str) -> str:
    kind = content_type.split(";")[0].split("/", 1)[-1].strip()
    return "." + {"jpeg": "jpg", "svg+xml": "svg"}.get(kind, kind or "img")
