"""``serve`` under load: concurrent clients against a real server process on 127.0.0.1, then a tenth malformed.

It starts ``python -m transferkit serve --model MODEL`` (the command a user runs) on a free loopback port,
warms it up, then runs ``--clients`` concurrent clients (asyncio + httpx, one ELPV cell PNG per request,
each client sending its next request when the last is answered) for ``--seconds``: requests per second,
p50/p95/p99 latency, failed requests, the server's resident memory (``/proc/PID/status`` VmRSS, sampled each
second) from the end of the warm-up to the end, and the CPU seconds the clients and the server used (they
share the machine's cores). Then the same again with every tenth request malformed (not an image, a
truncated PNG, a decompression-bomb header, a wrong content type, too many files, in turn): every good
request must still be answered 200, every malformed one refused with a 4xx. Prints one JSON object.

    python benchmarks/serve_load.py --model runs/export/model.int8.onnx --clients 16 --seconds 60 \\
        --out benchmarks/results/serve-load-amd-epyc.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, save  # noqa: E402


def _elpv_cells(count: int) -> list[tuple[str, bytes]]:
    import elpv_dataset

    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    files = sorted(folder.glob("*.png"))[-count:]
    return [(f.name, f.read_bytes()) for f in files]


def _bomb_header() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", 60_000, 60_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _malformed(kind: int, good: bytes) -> dict[str, Any]:
    """The keyword arguments of one malformed request, of five kinds in turn."""
    return [
        {"files": [("files", ("notes.png", b"this is not an image"))]},
        {"files": [("files", ("cut.png", good[: len(good) // 3]))]},
        {"files": [("files", ("bomb.png", _bomb_header()))]},
        {"content": b'{"image": "..."}', "headers": {"content-type": "application/json"}},
        {"files": [("files", (f"{i}.png", good)) for i in range(40)]},
    ][kind % 5]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    url: str, cells: list[tuple[str, bytes]], clients: int, seconds: float, malformed_every: int, pid: int
) -> dict[str, Any]:
    latencies: list[float] = []
    good_failures: list[str] = []
    bad_statuses: list[int] = []
    rss: list[float] = [_rss_mb(pid)]
    counter = 0
    stop_at = time.perf_counter() + seconds
    cpu0, server0, wall0 = time.process_time(), _cpu_seconds(pid), time.perf_counter()

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.perf_counter() < stop_at:
            counter += 1
            n = counter
            name, data = cells[n % len(cells)]
            if malformed_every and n % malformed_every == 0:
                response = await http.post("/predict", **_malformed(n // malformed_every, data))
                bad_statuses.append(response.status_code)
                continue
            start = time.perf_counter()
            try:
                response = await http.post("/predict", files=[("files", (name, data, "image/png"))])
                ok = response.status_code == 200 and len(response.json()["predictions"]) == 1
                reason = f"{response.status_code}: {response.text[:120]}"
            except httpx.HTTPError as err:
                ok, reason = False, f"{type(err).__name__}: {err}"
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                good_failures.append(reason)

    async def sample() -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(1.0)
            rss.append(_rss_mb(pid))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(sample(), *(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - wall0
    rss.append(_rss_mb(pid))
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "seconds": round(wall, 1),
        "good_requests": len(latencies) + len(good_failures),
        "good_answered_200": len(latencies),
        "failed_good_requests": len(good_failures),
        "failures": good_failures[:10],
        "requests_per_second": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(q[49], 1),
            "p95": round(q[94], 1),
            "p99": round(q[98], 1),
            "max": round(max(latencies), 1),
        },
        "malformed_requests": len(bad_statuses),
        "malformed_statuses": {str(s): bad_statuses.count(s) for s in sorted(set(bad_statuses))},
        "malformed_all_4xx": all(400 <= s < 500 for s in bad_statuses),
        "server_rss_mb": {"start": round(rss[0], 1), "end": round(rss[-1], 1), "max": round(max(rss), 1)},
        "server_rss_growth_mb": round(rss[-1] - rss[0], 1),
        "client_cpu_seconds": round(time.process_time() - cpu0, 1),
        "client_cpu_share_of_one_core": round((time.process_time() - cpu0) / wall, 2),
        "server_cpu_seconds": round(_cpu_seconds(pid) - server0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model to serve (an int8 .onnx for the target)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="passed on to serve")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        raise SystemExit("--clients must be >= 1 and --seconds > 0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "transferkit",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        *args.serve_args,
    ]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-load-{port}.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve exited with {server.returncode}; see {log.name}")
            try:
                info = httpx.get(f"{url}/info", timeout=2).json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("serve did not answer within 120 s") from None
                time.sleep(0.3)
        cells = _elpv_cells(64)
        asyncio.run(_phase(url, cells, args.clients, args.warmup, 0, server.pid))  # warm-up, not reported
        clean = asyncio.run(_phase(url, cells, args.clients, args.seconds, 0, server.pid))
        mixed = asyncio.run(_phase(url, cells, args.clients, args.seconds, 10, server.pid))
        alive = httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    report = {
        "provenance": provenance(),
        "model": info,
        "serve_command": " ".join(["python", "-m", "transferkit", *command[3:]]),
        "clients": args.clients,
        "images": "64 ELPV cells, 300 x 300 gray PNG, one per request",
        "load": clean,
        "load_with_a_tenth_malformed": mixed,
        "server_alive_after": alive,
        "targets": {
            "zero_failed_requests": clean["failed_good_requests"] == 0 and mixed["failed_good_requests"] == 0,
            "rss_growth_at_most_50_mb": clean["server_rss_growth_mb"] <= 50,
            "every_good_request_answered_with_malformed_ones": mixed["failed_good_requests"] == 0,
            "malformed_all_4xx": mixed["malformed_all_4xx"],
        },
    }
    save(report, args.out)


if __name__ == "__main__":
    main()
