"""s3:// workspaces (issue 8): requests and bytes each command sends and receives, counted at the server.

moto's S3 server runs in this process on 127.0.0.1, behind a WSGI wrapper that counts every request and
the bytes of every request and response body; each command runs as a user runs it (`python -m ckpt`, a
fresh process). Figures:

- `ckpt list` of a task of 10,000 checkpoints: requests (target: a handful) and bytes (the manifest);
- `ckpt promote` of a 1 GiB checkpoint (64 MiB with --quick): bytes through the client per checkpoint
  byte (target ~0: the copy is server-side), and, against a checkpoint 1/16 the size, how many more
  bytes the big one cost per extra checkpoint byte (~0: they do not grow with the checkpoint);
- `ckpt trash-unused` of 1,000 checkpoints: requests (one server-side copy per checkpoint, the rest a
  handful) and bytes (the records, never the checkpoints);
- `ckpt models rename` of the big model: bytes through the client per checkpoint byte (~0: a server-side copy);
- `ckpt du` of the whole workspace: requests (the workspace file, the task listing, one LIST page per 1,000
  objects).

The 10,000 and 1,000 records are written into the manifest directly (the public format), with one small
object per checkpoint where the command needs the objects: saving them one by one would only measure
the setup.

    python benchmarks/bench_s3.py [--quick]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from _bench import QUICK, info, ratio

import ckpt
from ckpt.manifest import Checkpoint, TaskState, task_bytes

BUCKET = "ckpt-bench"


class Counter:
    """WSGI middleware: requests, request body bytes and response body bytes, from `reset()` on."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.sent = 0  # bytes from the client (request bodies)
        self.received = 0  # bytes to the client (response bodies)
        self.methods: dict[str, int] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        with self.lock:
            self.requests += 1
            self.sent += length
            self.methods[environ["REQUEST_METHOD"]] = self.methods.get(environ["REQUEST_METHOD"], 0) + 1
        for chunk in self.app(environ, start_response):
            with self.lock:
                self.received += len(chunk)
            yield chunk


def start_server() -> tuple[str, Counter]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    counter = Counter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, threaded=True, request_handler=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", counter


def ckpt_cmd(env: dict[str, str], *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckpt", *args], env=env, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"ckpt {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def measure(counter: Counter, env: dict[str, str], *args: str) -> tuple[int, int, int, float]:
    counter.reset()
    seconds = ckpt_cmd(env, *args)
    return counter.requests, counter.sent, counter.received, seconds


def fill(ws: Any, name: str, n: int, objects: bool) -> None:
    """Task `name` with `n` records (and, with `objects`, a 64-byte object per checkpoint and its claim)."""
    ws.create_task(name)
    cps = {}
    for i in range(1, n + 1):
        data = i.to_bytes(8, "little") * 8
        cps[i] = Checkpoint(
            i,
            f"checkpoints/{i:06d}.pt",
            len(data),
            hashlib.sha256(data).hexdigest(),
            "2026-01-01T00:00:00+00:00",
            step=i * 100,
            epoch=i // 10,
            metrics={"val_iou": i / n, "loss": 1 / i},
            task=name,
        )
        if objects:
            ws.storage.put(f"tasks/{name}/checkpoints/{i:06d}.pt", data)
    header = ws.task(name).state().header
    ws.storage.put(f"tasks/{name}/task.toml", task_bytes(TaskState(header, cps)))


def put_big(ws: Any, task: str, size: int) -> int:
    """A checkpoint of `size` random bytes, recorded as `Task.save` records it but uploaded in one PUT: moto's
    server (5.2) loses parts of a 1 GiB multipart upload under load, and the upload is not what is measured."""
    data = os.urandom(size)
    t = ws.task(task)
    cp = Checkpoint(0, "", size, hashlib.sha256(data).hexdigest(), "2026-01-01T00:00:00+00:00", task=task)
    number, _ = t._upload_numbered(cp, ".pt", lambda key: ws.storage.put(key, data))
    return int(number)


def main() -> None:
    endpoint, counter = start_server()
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.pop("AWS_PROFILE", None)
    os.environ.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-s3-"))
    env["CKPT_CACHE"] = str(tmp / "cache")
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    url = f"s3://{BUCKET}/team"
    env["CKPT_WORKSPACE"] = url
    ws: Any = ckpt.Workspace.init(url)

    # list of 10,000
    fill(ws, "big", 10_000, objects=False)
    ckpt_cmd(env, "list", "big", "--json")  # bytecode written
    for kind in ("cold", "warm"):
        if kind == "cold":  # no local copy of the manifest: it is downloaded and parsed
            shutil.rmtree(tmp / "cache", ignore_errors=True)
        reqs, sent, received, seconds = measure(counter, env, "list", "big", "--json")
        info(
            f"list of 10,000 ({kind}): {reqs} requests, {sent} bytes sent, {received / 2**20:.2f} MiB received, "
            f"{seconds:.2f} s"
        )
        ratio(f"s3_list_10k_{kind}_requests", reqs, "<=6")
        ratio(f"s3_list_10k_{kind}_mib_received", received / 2**20, "-")
        ratio(f"s3_list_10k_{kind}_seconds", seconds, "-")

    # promote: bytes through the client do not grow with the checkpoint
    big = 64 << 20 if QUICK else 1 << 30
    per_byte = {}
    ws.create_task("promo")
    for size in (big // 16, big):
        number = put_big(ws, "promo", size)
        reqs, sent, received, seconds = measure(counter, env, "promote", "promo", str(number), "--title", f"m{size}")
        through = sent + received
        per_byte[size] = through / size
        info(f"promote of {size / 2**20:.0f} MiB: {reqs} requests, {through} bytes through the client, {seconds:.2f} s")
    label = "64mib" if QUICK else "1gib"
    ratio(f"s3_promote_{label}_client_bytes_per_checkpoint_byte", per_byte[big], "<=0.001")
    ratio(f"s3_promote_{label}_client_bytes", per_byte[big] * big, "-")
    # what more the big one cost, per extra checkpoint byte (titles and listings differ by a few hundred bytes)
    growth = (per_byte[big] * big - per_byte[big // 16] * (big // 16)) / (big - big // 16)
    ratio("s3_promote_client_bytes_growth_per_checkpoint_byte", growth, "<=0.0001")

    # trash-unused of 1,000
    fill(ws, "trashme", 1000, objects=True)
    ckpt.Workspace.open(url).promote("trashme", 500, title="keep")  # a fresh handle: fill wrote behind ws's back
    reqs, sent, received, seconds = measure(counter, env, "trash-unused", "trashme")
    moved = 1000 - 2  # the latest and the model's checkpoint stay
    info(
        f"trash-unused of {moved}: {reqs} requests ({counter.methods}), {sent / 2**10:.0f} KiB sent, "
        f"{received / 2**10:.0f} KiB received, {seconds:.2f} s"
    )
    ratio("s3_trash_1000_requests_beyond_one_copy_each", reqs - moved, "<=20")
    ratio("s3_trash_1000_kib_through_client", (sent + received) / 2**10, "-")
    ratio("s3_trash_1000_seconds", seconds, "-")

    # models rename of the big model: a server-side copy, as promote
    reqs, sent, received, seconds = measure(counter, env, "models", "rename", f"m{big}", "renamed")
    info(f"models rename of {big / 2**20:.0f} MiB: {reqs} requests, {sent + received} bytes through the client")
    ratio(f"s3_rename_{label}_client_bytes_per_checkpoint_byte", (sent + received) / big, "<=0.001")

    # du: one LIST of the whole prefix
    objects = len(ws.storage.list_prefix(""))
    reqs, sent, received, seconds = measure(counter, env, "du", "--json")
    info(f"du of {objects} objects: {reqs} requests, {received / 2**10:.0f} KiB received, {seconds:.2f} s")
    ratio("s3_du_requests", reqs, "-")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
