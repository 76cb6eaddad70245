from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ckpt
from ckpt.cli import app


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own workspace location and a short lock timeout; nothing leaks from the user."""
    monkeypatch.setenv("CKPT_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("CKPT_LOCK_TIMEOUT", "10")
    monkeypatch.delenv("CKPT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ws(tmp_path: Path) -> ckpt.Workspace:
    return ckpt.Workspace.init(tmp_path / "ws")


@pytest.fixture
def run() -> Callable[..., Any]:
    """Run a ckpt command through Typer's CliRunner; stdout and stderr kept apart."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Any:
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture
def run_json(run: Callable[..., Any]) -> Callable[..., Any]:
    def invoke(*args: str) -> Any:
        result = run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    return invoke


def make_task(
    ws: ckpt.Workspace, name: str = "unet", n: int = 5, metric: str = "val_iou", size: int = 1000
) -> ckpt.Task:
    """A task with `n` checkpoints of plain bytes; metric rises with the number (loss falls)."""
    task = ws.create_task(name, arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2})
    for i in range(1, n + 1):
        task.save(os.urandom(size), step=i * 100, epoch=i, metrics={metric: i / 10, "loss": 1 / i})
    return task


# --- object storage: a real S3 API (moto's server) on loopback --------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """moto's S3 server on 127.0.0.1 with a free port, for the whole session; skipped without the s3 extra."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with pytest.MonkeyPatch.context() as mp:
        _atomic_conditional_writes(mp)
        server.start()
        _, port = server.get_host_and_port()
        yield f"http://127.0.0.1:{port}"
        server.stop()


def _atomic_conditional_writes(mp: pytest.MonkeyPatch) -> None:
    """S3 decides a conditional write (If-Match, If-None-Match) atomically. moto's server checks the condition,
    then writes, in a thread per request, so two writes racing on one key could both pass the check (two
    processes then both claimed one checkpoint number, now and then): its writes go one at a time here."""
    import threading

    from moto.s3.responses import S3Response

    lock = threading.RLock()

    def serialised(real: Any) -> Any:
        def one_at_a_time(self: Any, *args: Any, **kw: Any) -> Any:
            with lock:
                return real(self, *args, **kw)

        return one_at_a_time

    # PUT (If-Match, If-None-Match), DELETE (If-Match), POST (a multipart upload completed with If-None-Match)
    for name in ("put_object", "delete_object", "_key_response_post"):
        mp.setattr(S3Response, name, serialised(getattr(S3Response, name)))


S3_BUCKET = "ckpt-tests"


@pytest.fixture
def s3_env(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment pointing botocore (and subprocesses) at the loopback server with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "cache"))
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    if not fs.exists(S3_BUCKET):
        fs.mkdir(S3_BUCKET)
    return s3_endpoint


@pytest.fixture
def s3_url(s3_env: str, tmp_path: Path) -> str:
    """A fresh workspace URL (its own prefix in the test bucket)."""
    return f"s3://{S3_BUCKET}/{tmp_path.name}"


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where a workspace goes, once per backend: a folder, or an s3:// URL on the loopback server.

    CKPT_WORKSPACE points at it, so commands run as they would for a user who set it.
    """
    if request.param == "local":
        location = str(tmp_path / "ws")
    else:
        location = request.getfixturevalue("s3_url")
    monkeypatch.setenv("CKPT_WORKSPACE", location)
    return location


@pytest.fixture
def any_ws(backend: str) -> ckpt.Workspace:
    """A new workspace on each backend."""
    return ckpt.Workspace.init(backend)


def put_bytes(ws: ckpt.Workspace, key: str, data: bytes) -> None:
    """Overwrite the file (object) `key`, relative to the workspace root, behind ckpt's back."""
    if ws.remote:
        ws.storage.put(key, data)  # type: ignore[attr-defined]
    else:
        (ws.root / key).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / key).write_bytes(data)


def remove_bytes(ws: ckpt.Workspace, key: str) -> None:
    """Delete the file (object) `key`, relative to the workspace root, behind ckpt's back."""
    if ws.remote:
        ws.storage.delete([key])  # type: ignore[attr-defined]
    else:
        (ws.root / key).unlink()
