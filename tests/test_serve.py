"""``serve``: a real uvicorn server on 127.0.0.1 answering as predict-images does, refusing bad requests with
the reason, batching across clients, and staying up through all of it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SERVE_CLASSES, SERVE_GROUPS, Server
from PIL import Image

from transferkit.inference import predict_images
from transferkit.inference.exported import load_exported
from transferkit.inference.loading import load_for_inference
from transferkit.serving import Predictor, ServeSettings

CLASSES = SERVE_CLASSES
GROUPS = SERVE_GROUPS


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height``: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_predict_answers_what_predict_images_writes_for_the_same_files(serve_models):
    paths = sorted(serve_models["images"].iterdir())
    model, transform = load_for_inference(serve_models["ckpt"])
    rows = predict_images(model, transform, [str(p) for p in paths])
    with Server(Predictor.load(serve_models["ckpt"])) as server:
        response = httpx.post(f"{server.url}/predict", files=_files(paths), timeout=60)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["file"] for a in answers] == [p.name for p in paths]
    for answer, row in zip(answers, rows, strict=True):
        assert answer["predicted"] == row["predicted"] and answer["predicted_group"] == row["predicted_group"]
        np.testing.assert_allclose([answer["probs"][c] for c in CLASSES], row["probs"], atol=1e-5)
        np.testing.assert_allclose(list(answer["group_probs"].values()), row["group_probs"], atol=1e-5)
        assert answer["top"][0]["prob"] == max(answer["probs"].values())


def test_the_int8_model_is_served_as_predict_images_predicts_with_it(serve_models):
    paths = sorted(serve_models["images"].iterdir())[:3]
    exported, transform = load_exported(serve_models["int8"])
    rows = predict_images(exported, transform, [str(p) for p in paths])
    with Server(Predictor.load(serve_models["int8"])) as server:
        info = httpx.get(f"{server.url}/info").json()
        body = httpx.post(f"{server.url}/predict?gradcam=1", files=_files(paths), timeout=60).json()
    assert info["format"] == "onnx int8" and info["classes"] == CLASSES and info["class_groups"] == GROUPS
    assert info["gradcam"] is False and "no gradients" in info["gradcam_note"]
    assert "gradcam" not in body and "checkpoint" in body["gradcam_note"]
    for answer, row in zip(body["predictions"], rows, strict=True):
        assert answer["predicted_group"] == row["predicted_group"]
        np.testing.assert_allclose([answer["probs"][c] for c in CLASSES], row["probs"], atol=1e-5)


def test_health_info_and_a_gradcam_overlay_from_a_checkpoint(serve_models):
    image = next(serve_models["images"].glob("*.png"))
    with Server(Predictor.load(serve_models["ckpt"])) as server:
        health = httpx.get(f"{server.url}/health").json()
        info = httpx.get(f"{server.url}/info").json()
        body = httpx.post(
            f"{server.url}/predict?gradcam=true",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
            timeout=60,
        ).json()
        page = httpx.get(f"{server.url}/")
    assert health == {"status": "ok", "queue": 0, "max_queue": 64, "token_required": False}
    assert info["format"] == "checkpoint" and info["kind"] == "single_label" and info["gradcam"] is True
    assert info["model_version"].startswith("best.ckpt@") and info["input_size"][0] == 3
    assert info["limits"]["max_batch"] == 16 and "token" not in info["limits"]
    overlay = Image.open(io.BytesIO(__import__("base64").b64decode(body["gradcam"].split(",", 1)[1])))
    assert (
        overlay.size == tuple(info["input_size"][1:])
        and body["gradcam_class"] == body["predictions"][0]["predicted"]
    )
    assert page.status_code == 200 and "Choose an image" in page.text


def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_stays_up(serve_models, caplog):
    good = next(serve_models["images"].glob("*.jpg")).read_bytes()
    settings = ServeSettings(max_files=3, max_file_mb=0.05, max_pixels=100_000, token="s3cret-token")
    auth = {"authorization": "Bearer s3cret-token"}
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(big, "PNG")
    cases = {
        "no token": (401, "token", {"files": [("files", ("a.jpg", good))]}, {}),
        "not an image": (
            400,
            "not an image",
            {"files": [("files", ("notes.txt", b"hello, not a picture"))]},
            auth,
        ),
        "truncated": (400, "truncated", {"files": [("files", ("cut.jpg", good[: len(good) // 2]))]}, auth),
        "bomb": (413, "pixels", {"files": [("files", ("bomb.png", _png_claiming(60_000, 60_000)))]}, auth),
        "too many pixels": (
            413,
            "100,000 pixels",
            {"files": [("files", ("wide.png", _png_claiming(400, 400)))]},
            auth,
        ),
        "too large a file": (413, "0.05 MB", {"files": [("files", ("big.png", big.getvalue()))]}, auth),
        "too many files": (
            400,
            "too many files",
            {"files": [("files", (f"{i}.jpg", good)) for i in range(4)]},
            auth,
        ),
        "no file": (400, "no image", {"data": {"note": "x"}, "files": []}, auth),
        "wrong type": (
            415,
            "content type",
            {"content": b'{"image": 1}'},
            {**auth, "content-type": "application/json"},
        ),
        "empty": (400, "empty", {"files": [("files", ("empty.png", b""))]}, auth),
    }
    caplog.set_level(logging.INFO, logger="transferkit.serve")
    with (
        Server(Predictor.load(serve_models["ckpt"]), settings) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for name, (status, reason, request, headers) in cases.items():
            if name == "no file":
                response = client.post(
                    "/predict", data=request["data"], headers=headers, files={"x": ("", b"")}
                )
            else:
                response = client.post("/predict", headers=headers, **request)
            assert response.status_code == status, (name, response.text)
            assert reason in response.json()["error"], (name, response.json())
        assert client.get("/health").status_code == 200  # no token needed, still up
        assert client.get("/info").status_code == 401
        ok = client.post("/predict", headers=auth, files=[("files", ("a.jpg", good))])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["predicted"] in CLASSES
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "transferkit.serve" and "POST /predict" in r.getMessage()
    ]
    assert len(lines) == len(cases) + 1  # one line per request
    assert any(" 413 " in line and "reason=" in line and "pixels" in line for line in lines)
    assert lines[-1].startswith("POST /predict 200 images=1 ms=")


def test_requests_from_several_clients_are_batched_together(serve_models):
    paths = sorted(serve_models["images"].iterdir())
    settings = ServeSettings(max_batch=8, max_wait_ms=400)
    with Server(Predictor.load(serve_models["ckpt"]), settings) as server:

        async def clients() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                sent = [client.post("/predict", files=_files([p])) for p in paths]
                return [r.status_code for r in await asyncio.gather(*sent)]

        statuses = asyncio.run(clients())
        sizes = list(server.app.state.batcher.batch_sizes)
    assert statuses == [200] * len(paths)
    assert sum(sizes) == len(paths) and max(sizes) > 1  # one model call served several requests


def test_a_full_queue_answers_503_and_a_slow_answer_504(serve_models):
    predictor = Predictor.load(serve_models["ckpt"])
    real = predictor.predict

    def slow(tensors):  # the model, made slow enough that requests pile up
        time.sleep(0.6)
        return real(tensors)

    predictor.predict = slow
    image = next(serve_models["images"].glob("*.jpg"))
    settings = ServeSettings(max_batch=2, max_wait_ms=0, max_queue=4, max_files=2, timeout_s=5)
    with Server(predictor, settings) as server:

        async def burst(count: int, timeout: float = 60) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
                return await asyncio.gather(
                    *(client.post("/predict", files=_files([image] * 2)) for _ in range(count))
                )

        responses = asyncio.run(burst(6))
        codes = sorted(r.status_code for r in responses)
        full = next(r for r in responses if r.status_code == 503)
        assert httpx.get(f"{server.url}/health").json()["queue"] == 0  # drained
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    assert full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]

    settings = ServeSettings(max_batch=1, max_wait_ms=0, max_queue=8, max_files=2, timeout_s=0.3)
    with Server(predictor, settings) as server:
        late = httpx.post(f"{server.url}/predict", files=_files([image] * 2), timeout=30)
        assert late.status_code == 504 and "0.3 s" in late.json()["error"]
        time.sleep(1.5)
        assert httpx.get(f"{server.url}/health").json()["queue"] == 0  # the late images were dropped


def test_settings_are_validated_when_made():
    with pytest.raises(Exception, match="max_queue \\(4\\) must be at least max_batch \\(8\\)"):
        ServeSettings(max_batch=8, max_queue=4)
    with pytest.raises(Exception, match="token must be at least 8"):
        ServeSettings(token="short")


@pytest.mark.slow
def test_the_serve_command_starts_a_server_bound_to_loopback(serve_models):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "transferkit",
            "serve",
            "--model",
            str(serve_models["int8"]),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer within 90 s"
                time.sleep(0.3)
        image = next(serve_models["images"].glob("*.jpg"))
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", files=_files([image]), timeout=30).json()
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert health.json()["status"] == "ok"
    assert answer["predictions"][0]["predicted_group"] in GROUPS
    assert f"on http://127.0.0.1:{port}/" in err and "onnx int8" in err
    assert "POST /predict 200 images=1" in err  # the request's log line
    assert json.loads(json.dumps(answer))["model_version"].startswith("model.int8.onnx@")
