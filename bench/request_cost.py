"""Request cost benchmark: CPU instructions a pixel or click costs a worker, against the bare app.

    .venv/bin/python bench/request_cost.py              # under callgrind: instructions a request
    .venv/bin/python bench/request_cost.py --time       # wall time instead, no valgrind needed

On a shared machine the requests a second of bench/tracking.py move with the load by a factor
of two or three within an hour, so a change of a few percent in what a request costs cannot be
seen there. This measures that cost alone, repeatably: requests go through the worker's own
stack in one process, without sockets or wrk: uvicorn's httptools protocol (with the Config
`mailer serve` uses, mailer.tracking.app.uvicorn_config), its ProxyHeadersMiddleware, and the
app, answering into a stub transport on uvloop. Two apps:

  * mailer: the app `mailer serve` builds in each worker (mailer.cli.serve_app, a writer
    process recording the hits), on a SQLite database holding a campaign really sent to
    20,000 contacts (bench/tracking.py's), answering valid tokens taken from its mails;
  * bare: bench/tracking.py's bare Starlette app, the same GIF and redirect with nothing
    behind them: the yardstick.

Under valgrind's callgrind (the default) each measurement is run twice, with N1 and N2
requests, and the difference of the instruction counts divided by N2 - N1 is a request's
cost, start-up and module imports cancelled out: the same count on every run of the same
code, whatever else the machine does. The writer process is not counted (it runs under
SCHED_IDLE; bench/recording.py measures its database's share). Printed: instructions a
request, and mailer's as a ratio to the bare app's. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tracking  # noqa: E402  (bench/tracking.py: the campaign, the bare app, the settings)

OUT = HERE / "out" / "request_cost"
ROUTES = ("pixel", "click")
SERVERS = ("bare", "mailer")
DISTINCT_PATHS = 5_000
WARM_UP = 200  # requests before counting: the link table read, the caches filled


class StubTransport(asyncio.Transport):
    """What a connection's protocol writes to, counting bytes, on a loopback address."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def answer(server: str, route: str, count: int, folder: Path) -> float:
    """Answers `count` requests (after WARM_UP) on one kept-alive connection; returns the
    seconds a request took."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from mailer.tracking.app import uvicorn_config

    paths = (folder / f"{route}.txt").read_text(encoding="utf-8").split()
    random.Random(1).shuffle(paths)
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: {tracking.USER_AGENT}\r\n"
        "\r\n".encode()
        for path in paths[:DISTINCT_PATHS]
    ]
    factory = "tracking:bare_app" if server == "bare" else "mailer.cli:serve_app"
    config = uvicorn_config(factory, log_level="warning")
    config.load()
    app = config.loaded_app
    inner = getattr(app, "app", app)  # inside uvicorn's ProxyHeadersMiddleware
    recorder = getattr(getattr(inner, "state", None), "recorder", None)
    if recorder is not None:
        await recorder.start()
    protocol = HttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = StubTransport()
    protocol.connection_made(transport)

    async def run(n: int) -> None:
        for i in range(n):
            protocol.data_received(requests[i % len(requests)])
            if protocol.tasks:
                await asyncio.gather(*protocol.tasks)

    await run(WARM_UP)
    started = time.perf_counter()
    await run(count)
    seconds = (time.perf_counter() - started) / max(count, 1)
    if recorder is not None:
        await recorder.stop()
        if recorder.stats.recorded < count:
            raise SystemExit(f"{server} {route}: {recorder.stats.recorded} hits for {count}")
    return seconds


def child(server: str, route: str, count: int, folder: Path) -> None:
    os.chdir(folder)  # mailer.toml-free: the settings come from the environment
    import uvloop

    seconds = uvloop.run(answer(server, route, count, folder))
    print(json.dumps({"seconds": seconds}))


def run_child(
    server: str, route: str, count: int, folder: Path, env: dict[str, str], callgrind: bool
) -> tuple[float, int | None]:
    command = [sys.executable, __file__, "--child", server, route, str(count), str(folder)]
    if callgrind:
        out = folder / f"callgrind-{server}-{route}-{count}.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{server} {route} failed:\n{done.stdout}\n{done.stderr}")
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    if not callgrind:
        return seconds, None
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no total:\n{done.stderr}")
    return seconds, int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", action="store_true", help="wall time, without valgrind")
    parser.add_argument("--requests", type=int, nargs=2, default=(200, 3200), metavar=("N1", "N2"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        server, route, count, folder = args.child
        child(server, route, int(count), Path(folder))
        return
    callgrind = not args.time
    if callgrind and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind), or use --time")
    low, high = args.requests
    if not 0 <= low < high:
        raise SystemExit("--requests N1 N2 needs 0 <= N1 < N2")

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-request-cost-") as raw:
        folder = Path(raw)
        database_url = f"sqlite:///{folder / 'mailer.db'}"
        print(f"sending the campaign to {tracking.RECIPIENTS:,} recipients ...", flush=True)
        found = tracking.prepare(database_url, folder)
        (folder / "pixel.txt").write_text("\n".join(found["pixel"]), encoding="utf-8")
        (folder / "click.txt").write_text("\n".join(found["click"]), encoding="utf-8")
        env = {
            **os.environ,
            **tracking.environment(database_url),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        for route in ROUTES:
            for server in SERVERS:
                if callgrind:
                    _, few = run_child(server, route, low, folder, env, True)
                    _, many = run_child(server, route, high, folder, env, True)
                    assert few is not None and many is not None
                    cost = (many - few) / (high - low)
                    unit = "instructions"
                else:
                    cost = run_child(server, route, high, folder, env, False)[0] * 1e6
                    unit = "us"
                results.setdefault(route, {})[server] = cost
                print(f"  {server:<7} {route:<6} {cost:>10,.0f} {unit} a request", flush=True)
    print()
    unit = "instructions" if callgrind else "us"
    print(f"route    bare ({unit})   mailer ({unit})   mailer / bare")
    for route, costs in results.items():
        ratio = costs["mailer"] / costs["bare"]
        print(f"{route:<8} {costs['bare']:>16,.0f} {costs['mailer']:>18,.0f} {ratio:>15.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "when": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "unit": unit,
        "requests": [low, high],
        "results": results,
    }
    (OUT / f"request-cost-{stamp}.json").write_text(json.dumps(payload, indent=2), "utf-8")


if __name__ == "__main__":
    main()
