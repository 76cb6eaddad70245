"""`ckpt list TASK` finds the task's models without reading every model.toml (ckpt.model_sources), on both
backends, and its answer is always that of reading them all: models made, removed, renamed, restored or
edited by ckpt, by hand, through another Workspace object or by another process are all seen."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import model_sources
from ckpt.models import Model
from tests.conftest import make_task, put_bytes, remove_bytes


@pytest.fixture(autouse=True)
def _keep_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries are kept at once (not only 2 s after a change), so that the tests exercise the kept entries."""
    monkeypatch.setattr(model_sources, "SETTLED_NS", -(10**12))


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The titles of the model.toml files parsed, in order."""
    seen: list[str] = []
    real = Model.from_doc.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Model], title: str, doc: dict[str, Any], folder: Path) -> Model:
        seen.append(title)
        return real(cls, title, doc, folder)  # type: ignore[no-any-return]

    monkeypatch.setattr(Model, "from_doc", classmethod(counted))
    return seen


def listed(run_json: Any, task: str = "unet") -> dict[int, list[str]]:
    return {r["number"]: r["models"] for r in run_json("list", task) if r["models"]}


def model_toml(task: str, number: int, sha: str = "0" * 64, extra: str = "") -> bytes:
    return (
        f'format = 1\ntask = "{task}"\ncheckpoint = {number}\nfile = "w.pt"\nsha256 = "{sha}"\nsize = 1\n'
        f'created = "2026-01-01T00:00:00Z"\nstorage = "copy"\n{extra}'
    ).encode()


def test_list_reads_only_models_changed_since_the_last_listing(
    run_json: Any, any_ws: ckpt.Workspace, parses: list[str]
) -> None:
    make_task(any_ws, "unet", n=3)
    for i in range(6):  # models of other tasks: never read again once known
        make_task(any_ws, f"other{i}", n=1)
        any_ws.promote(f"other{i}", 1, title=f"o{i}")
    any_ws.promote("unet", 2, title="u2")
    parses.clear()
    assert listed(run_json) == {2: ["u2"]}
    first = len(parses)
    assert first == 7  # the first listing reads every model once
    parses.clear()
    assert listed(run_json) == {2: ["u2"]}
    assert parses == []  # then none: the cache proves them unchanged
    any_ws.promote("unet", 3, title="u3")
    parses.clear()
    assert listed(run_json) == {2: ["u2"], 3: ["u3"]}
    assert parses == ["u3"]  # only the new one


def test_models_changed_by_hand_are_seen(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    make_task(any_ws, "other", n=2)
    any_ws.promote("unet", 2, title="u2")
    any_ws.promote("other", 1, title="o1")
    assert listed(run_json) == {2: ["u2"]}
    # a model written by hand (or by an older ckpt): its folder and model.toml
    put_bytes(any_ws, "models/hand/w.pt", b"x")
    put_bytes(any_ws, "models/hand/model.toml", model_toml("unet", 3))
    assert listed(run_json) == {2: ["u2"], 3: ["hand"]}
    # a model.toml edited in place: another checkpoint, then another task (the file changes size each time)
    put_bytes(any_ws, "models/hand/model.toml", model_toml("unet", 1, extra="step = 7\n"))
    assert listed(run_json) == {1: ["hand"], 2: ["u2"]}
    put_bytes(any_ws, "models/o1/model.toml", model_toml("unet", 3, extra="step = 12345\n"))
    assert listed(run_json) == {1: ["hand"], 2: ["u2"], 3: ["o1"]}
    assert listed(run_json, "other") == {}
    # damaged: skipped, as `ckpt models` skips it (with a warning there)
    put_bytes(any_ws, "models/hand/model.toml", b"format = 1\ntask = [")
    assert listed(run_json) == {2: ["u2"], 3: ["o1"]}
    put_bytes(any_ws, "models/hand/model.toml", model_toml("unet", 2))
    assert listed(run_json) == {2: ["hand", "u2"], 3: ["o1"]}
    # removed by hand
    for key in ("models/hand/model.toml", "models/hand/w.pt"):
        remove_bytes(any_ws, key)
    if not any_ws.remote:
        (any_ws.root / "models" / "hand").rmdir()
    assert listed(run_json) == {2: ["u2"], 3: ["o1"]}
    # the cache itself damaged: the answer is the same
    if any_ws.remote:
        caches = list((Path(os.environ["CKPT_CACHE"]) / "models").iterdir())
    else:
        caches = [any_ws.root / "tasks" / model_sources.MODELS_CACHE_FILE]
    assert caches and all(c.is_file() for c in caches)
    for c in caches:
        c.write_bytes(b"{not json")
    assert listed(run_json) == {2: ["u2"], 3: ["o1"]}


def test_models_changed_through_ckpt_are_seen(run: Any, run_json: Any, any_ws: ckpt.Workspace, backend: str) -> None:
    make_task(any_ws, "unet", n=3)
    any_ws.promote("unet", 1, title="a")
    assert listed(run_json) == {1: ["a"]}
    assert run_json("models", "rename", "a", "b")["title"] == "b"
    assert listed(run_json) == {1: ["b"]}
    removed = run_json("models", "remove", "b")
    assert listed(run_json) == {}
    run_json("trash", "restore", removed["entry"])
    assert listed(run_json) == {1: ["b"]}
    run_json("finish", "unet")
    assert listed(run_json) == {1: ["b"], 3: ["unet-3"]}
    # through another Workspace object: the first one's answers follow
    other = ckpt.Workspace.open(backend)
    other.promote("unet", 2, title="c")
    assert any_ws.models_of("unet") == {1: ["b"], 2: ["c"], 3: ["unet-3"]}
    # through another process
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "ckpt", "promote", "unet", "2", "--title", "d"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert any_ws.models_of("unet") == {1: ["b"], 2: ["c", "d"], 3: ["unet-3"]}
    assert listed(run_json) == {1: ["b"], 2: ["c", "d"], 3: ["unet-3"]}


# --- requests on a bucket ---------------------------------------------------------------------------------


@pytest.fixture
def requests(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every request the test's S3 client sends (method and key), counted as it is sent."""
    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    fs = ws.storage.fs  # type: ignore[attr-defined]
    ws.storage.head("ckpt.toml")  # type: ignore[attr-defined]  # the client exists once a request was made
    sent: list[str] = []

    def count(request: Any, **_: Any) -> None:
        sent.append(f"{request.method} {request.url.split('?')[0]}")

    fs.s3.meta.events.register("before-send.s3", count)
    yield sent
    fs.s3.meta.events.unregister("before-send.s3", count)


def test_s3_list_requests_do_not_grow_with_models(run_json: Any, s3_url: str, requests: list[str]) -> None:
    ws = ckpt.Workspace.open(s3_url)
    make_task(ws, "unet", n=3)
    ws.promote("unet", 2, title="u2")
    counts = []
    for n in (2, 12):
        for i in range(len(counts) * 2, n):
            make_task(ws, f"other{i}", n=1)
            ws.promote(f"other{i}", 1, title=f"o{i}")
        listed(run_json)  # this machine learns the new models
        requests.clear()
        assert listed(run_json) == {2: ["u2"]}
        counts.append(len(requests))
    assert counts[0] == counts[1] <= 4, requests  # GET ckpt.toml, GET task.toml (a 304), LIST models/


def test_s3_tasks_reads_manifests_at_once(run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    n = 6
    for i in range(n):
        ws.create_task(f"t{i}")
    fs = ws.storage.fs  # type: ignore[attr-defined]
    state = {"in_flight": 0, "most": 0}
    lock = threading.Lock()
    arrived = asyncio.Event()

    async def hold(request: Any, **_: Any) -> None:
        """Each manifest GET waits (up to 2 s) until all of them were sent: one after another, each waits in vain."""
        if request.method != "GET" or not request.url.split("?")[0].endswith("/task.toml"):
            return
        with lock:
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
            if state["in_flight"] == n:
                arrived.set()
        try:
            await asyncio.wait_for(arrived.wait(), 2)
        except TimeoutError:
            pass
        with lock:
            state["in_flight"] -= 1

    fs.s3.meta.events.register("before-send.s3", hold)
    try:
        monkeypatch.setenv("CKPT_CACHE", str(Path(os.environ["CKPT_CACHE"]) / "fresh"))  # nothing cached: GETs
        rows = run_json("tasks")
    finally:
        fs.s3.meta.events.unregister("before-send.s3", hold)
    assert sorted(r["name"] for r in rows) == [f"t{i}" for i in range(n)]
    assert state["most"] == n  # all in flight at once: one round trip deep


def test_cache_in_the_way_is_only_a_cost(run_json: Any, ws: ckpt.Workspace, parses: list[str]) -> None:
    """A folder (or a symlink to one) where the cache goes: listings are right, read every model, never fail."""
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="a")
    cache = ws.root / "tasks" / model_sources.MODELS_CACHE_FILE
    cache.mkdir()
    (cache / "x").write_text("kept")
    for _ in range(2):
        parses.clear()
        assert listed(run_json) == {1: ["a"]}
        assert parses == ["a"]
    assert (cache / "x").read_text() == "kept"


def test_cache_as_a_link_is_refused_and_as_a_fifo_dropped(run: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="a")
    cache = ws.root / "tasks" / model_sources.MODELS_CACHE_FILE
    precious = tmp_path / "precious"
    precious.write_bytes(b"outside")
    cache.symlink_to(precious)
    result = run("list", "unet")
    assert result.exit_code == 6 and "is a symlink" in result.stderr, result.output
    assert precious.read_bytes() == b"outside" and cache.is_symlink()
    cache.unlink()
    os.mkfifo(cache)
    result = run("list", "unet", "--json")  # a blocking open would hang here
    assert result.exit_code == 0, result.output
    assert cache.is_file()
