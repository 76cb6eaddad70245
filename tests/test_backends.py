"""The commands against both backends: a local folder and an s3:// workspace (moto's server on loopback).

One suite, parametrized by the `backend` fixture: every test here runs once per backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ckpt
import ckpt.trash_entry
from ckpt.trash import trash_unused
from tests.conftest import make_task, put_bytes, remove_bytes


def test_init_and_tasks(run: Any, run_json: Any, backend: str) -> None:
    result = run("init", backend, "--json")
    assert result.exit_code == 0, result.output
    ws = ckpt.Workspace.open(backend)
    assert json.loads(result.stdout) == {"workspace": ws.location}
    assert run("init", backend).exit_code == 0  # an existing workspace is left as it is
    make_task(ws, "unet", n=2)
    make_task(ws, "resnet", n=1)
    rows = run_json("tasks")
    assert [(r["name"], r["checkpoints"], r["size"], r["latest"]) for r in rows] == [
        ("resnet", 1, 1000, 1),
        ("unet", 2, 2000, 2),
    ]


def test_save_and_list(run_json: Any, any_ws: ckpt.Workspace) -> None:
    task = make_task(any_ws, "unet", n=3)
    assert task.save(b"more", step=400, metrics={"val_iou": 0.9}) == 4
    rows = run_json("list", "unet")
    assert [r["number"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["path"] == "tasks/unet/checkpoints/000001.pt"
    assert rows[3]["size"] == 4 and rows[3]["latest"] and rows[3]["metrics"] == {"val_iou": 0.9}
    import hashlib

    assert rows[3]["sha256"] == hashlib.sha256(b"more").hexdigest()
    assert [r["number"] for r in run_json("list", "unet", "--sort", "val_iou", "--desc")][:1] == [4]
    # a fresh handle reads what was committed
    assert [cp.number for cp in ckpt.Workspace.open(any_ws.location).task("unet").checkpoints] == [1, 2, 3, 4]


def test_show(run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "w.safetensors"
    save_file({"w": np.zeros((2, 3), dtype=np.float32)}, str(src))
    number = any_ws.create_task("unet").save_file(src, step=7)
    shown = run_json("show", "unet", str(number))
    assert shown["format"] == "safetensors" and shown["step"] == 7
    assert shown["tensors"] == [{"name": "w", "shape": [2, 3], "dtype": "float32"}]
    assert shown["path"] == f"tasks/unet/checkpoints/{number:06d}.safetensors"


def test_promote_and_models(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    model = run_json("promote", "unet", "2", "--title", "unet-best")
    assert (model["title"], model["checkpoint"], model["size"]) == ("unet-best", 2, 1000)
    taken = run("promote", "unet", "3", "--title", "unet-best")
    assert taken.exit_code == 4 and "already exists" in taken.stderr
    best = run_json("promote", "unet", "--best", "loss", "--min", "--title", "low-loss")
    assert best["checkpoint"] == 3
    assert [m["title"] for m in run_json("models")] == ["low-loss", "unet-best"]
    shown = run_json("models", "show", "unet-best")
    assert shown["sha256"] == any_ws.task("unet").checkpoint(2).sha256
    assert shown["path"] == f"models/unet-best/{Path(shown['path']).name}"
    assert [r["models"] for r in run_json("list", "unet")] == [[], ["unet-best"], ["low-loss"]]
    # the model's bytes are its own: they survive the checkpoint going to the trash and the trash emptied
    assert run("trash-unused", "unet").exit_code == 0
    assert run("trash", "empty", "--yes").exit_code == 0
    assert run_json("verify", "--models")["ok"]


def test_unreadable_model_is_a_warning(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=2)
    any_ws.promote("unet", 1, title="good")
    put_bytes(any_ws, "models/broken/model.toml", b"format = [")
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    assert [m["title"] for m in json.loads(result.stdout)] == ["good"]
    assert "skipped a model" in result.stderr and "broken" in result.stderr


def test_finish(run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    res = run_json("finish", "unet")
    assert res["status"] == "finished" and res["model"]["title"] == "unet-3"
    assert run_json("tasks")[0]["status"] == "finished"
    with pytest.raises(ckpt.CkptError, match="finished"):
        ckpt.Workspace.open(any_ws.location).task("unet").save(b"late")
    again = run_json("finish", "unet")
    assert again["model"]["title"] == "unet-3" and "already" in again["note"]


def test_trash_unused_restore_empty(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=6)
    any_ws.promote("unet", 2, title="keep-me")
    dry = run_json("trash-unused", "unet", "--keep-last", "2", "--dry-run")
    assert dry["trashed"] == [1, 3, 4] and dry["entry"] is None
    assert dry["bytes_freed_on_empty"] == 3000
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3, 4, 5, 6]
    res = run_json("trash-unused", "unet", "--keep-last", "2")
    assert res["trashed"] == [1, 3, 4]
    assert [r["number"] for r in run_json("list", "unet")] == [2, 5, 6]
    entries = run_json("trash", "list")
    assert [(e["id"], e["checkpoints"], e["state"]) for e in entries] == [(res["entry"], [1, 3, 4], "complete")]
    # numbers are never reused, even after a trash
    assert any_ws.task("unet").save(b"x") == 7
    assert run_json("trash", "restore", res["entry"])["checkpoints"] == [1, 3, 4]
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3, 4, 5, 6, 7]
    assert run_json("trash", "list") == []
    assert run_json("verify")["ok"]
    second = run_json("trash-unused", "unet")["entry"]
    missing = run("trash", "restore", "20200101-000000-000000")
    assert missing.exit_code == 3
    emptied = run_json("trash", "empty", "--yes")
    assert emptied["emptied"] == [second] and emptied["bytes_freed"] >= 5 * 1000
    assert run_json("trash", "list") == []
    assert [r["number"] for r in run_json("list", "unet")] == [2, 7]


def test_verify_finds_changed_and_missing(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    assert run_json("verify")["ok"]
    put_bytes(any_ws, "tasks/unet/checkpoints/000002.pt", b"x" * 1000)
    put_bytes(any_ws, "tasks/unet/checkpoints/000009.pt", b"stray")
    put_bytes(any_ws, "tasks/unet/notes.txt", b"hello")
    result = run("verify", "--json")
    assert result.exit_code == 6
    problems = {(p["kind"], p["path"]) for p in json.loads(result.stdout)["problems"]}
    assert ("changed", "tasks/unet/checkpoints/000002.pt") in problems
    assert ("unknown", "tasks/unet/checkpoints/000009.pt") in problems
    assert ("unknown", "tasks/unet/notes.txt") in problems


def test_import_from_local_folder(run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    src = tmp_path / "lightning"
    src.mkdir()
    for epoch in range(3):
        (src / f"epoch={epoch}-step={(epoch + 1) * 10}.ckpt").write_bytes(os.urandom(300))
    res = run_json("import", str(src), "--task", "lit")
    assert [r["action"] for r in res["checkpoints"]] == ["added"] * 3
    rows = run_json("list", "lit")
    assert [(r["number"], r["epoch"], r["step"]) for r in rows] == [(1, 0, 10), (2, 1, 20), (3, 2, 30)]
    again = run_json("import", str(src), "--task", "lit")
    assert [r["action"] for r in again["checkpoints"]] == ["already"] * 3
    assert run_json("verify")["ok"]


def test_library_open_and_errors(any_ws: ckpt.Workspace) -> None:
    with pytest.raises(ckpt.errors.TaskNotFound):
        any_ws.task("nope")
    any_ws.create_task("unet")
    with pytest.raises(ckpt.errors.ConflictError):
        any_ws.create_task("unet")
    assert any_ws.create_task("unet", exist_ok=True).name == "unet"
    with pytest.raises(ckpt.errors.CheckpointNotFound, match="it has none"):
        any_ws.task("unet").checkpoint(3)
    with pytest.raises(ckpt.errors.ConflictError, match="only in case"):
        any_ws.create_task("UNet")
    any_ws.task("unet").save(b"x")
    any_ws.promote("unet", 1, title="best")
    with pytest.raises(ckpt.errors.ConflictError, match="only in case"):
        any_ws.promote("unet", 1, title="Best")


def test_models_remove_and_restore(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    any_ws.promote("unet", 2, title="m")
    any_ws.promote("unet", 3, title="other")
    res = run_json("models", "remove", "m")
    assert (res["model"], res["task"], res["checkpoint"]) == ("m", "unet", 2)
    assert [m["title"] for m in run_json("models")] == ["other"]
    assert run("models", "remove", "m").exit_code == 3
    entries = run_json("trash", "list")
    assert [(e["id"], e["kind"], e["state"]) for e in entries] == [(res["entry"], "model", "complete")]
    # the title is free while the model is in the trash; taken again, restoring would overwrite: refused
    any_ws.promote("unet", 1, title="m")
    refused = run("trash", "restore", res["entry"])
    assert refused.exit_code == 4 and "exists again" in refused.stderr
    assert run_json("models", "remove", "m")["checkpoint"] == 1
    run_json("trash", "restore", res["entry"])
    shown = run_json("models", "show", "m")
    assert (shown["checkpoint"], shown["sha256"]) == (2, any_ws.task("unet").checkpoint(2).sha256)
    assert run_json("verify", "--models")["ok"]
    assert [e["kind"] for e in run_json("trash", "list")] == ["model"]
    emptied = run_json("trash", "empty", "--yes")
    assert len(emptied["emptied"]) == 1
    assert run_json("trash", "list") == []
    assert run_json("doctor")["repairs"] == []


def test_models_rename(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=2)
    any_ws.promote("unet", 1, title="a")
    any_ws.promote("unet", 2, title="b")
    renamed = run_json("models", "rename", "a", "c")
    assert (renamed["title"], renamed["checkpoint"]) == ("c", 1)
    assert renamed["path"] == f"models/c/{Path(renamed['path']).name}"
    assert [m["title"] for m in run_json("models")] == ["b", "c"]
    taken = run("models", "rename", "c", "b")
    assert taken.exit_code == 4 and "already exists" in taken.stderr
    assert run("models", "rename", "nope", "d").exit_code == 3
    twin = run("models", "rename", "c", "B")
    assert twin.exit_code == 4 and "only in case" in twin.stderr
    assert [r["models"] for r in run_json("list", "unet")] == [["c"], ["b"]]
    assert run_json("verify", "--models")["ok"]
    assert run_json("promote", "unet", "2", "--title", "a")["title"] == "a"  # the old title is free again


def test_du(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    make_task(any_ws, "resnet", n=1)
    before = run_json("du")
    assert set(before) == {"tasks", "by_task", "models", "trash", "other", "total"}
    assert sorted(before["by_task"]) == ["resnet", "unet"]
    assert before["by_task"]["unet"] >= 3000 and before["by_task"]["resnet"] >= 1000
    assert before["tasks"] == sum(before["by_task"].values())
    assert before["total"] == before["tasks"] + before["models"] + before["trash"] + before["other"]
    run_json("trash-unused", "unet")
    after = run_json("du")
    assert after["trash"] >= 2000 and after["by_task"]["unet"] <= before["by_task"]["unet"] - 2000
    assert run("du").exit_code == 0


def test_scan_and_add(run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=2)
    assert run_json("scan", "unet")["unknown"] == []
    put_bytes(any_ws, "tasks/unet/checkpoints/epoch=4-step=50-val_loss=0.5.ckpt", b"w" * 300)
    put_bytes(any_ws, "tasks/unet/notes.txt", b"hello")
    found = run_json("scan", "unet")
    assert [(u["path"], u["kind"], u["size"], u["addable"]) for u in found["unknown"]] == [
        ("tasks/unet/notes.txt", "file", 5, False),
        ("tasks/unet/checkpoints/epoch=4-step=50-val_loss=0.5.ckpt", "file", 300, True),
    ]
    assert found["unknown"][1]["modified"][:2] == "20" and found["added"] == []
    res = run_json("scan", "unet", "--add")
    assert [(a["number"], a["path"]) for a in res["added"]] == [(3, "tasks/unet/checkpoints/000003.ckpt")]
    assert [u["path"] for u in res["unknown"]] == ["tasks/unet/notes.txt"]
    row = run_json("list", "unet")[2]
    assert (row["epoch"], row["step"], row["metrics"]) == (4, 50, {"val_loss": 0.5})
    assert [u["path"] for u in run_json("scan", "unet")["unknown"]] == ["tasks/unet/notes.txt"]
    # a folder checkpoint (Hugging Face) is added whole
    put_bytes(any_ws, "tasks/unet/checkpoint-70/model.safetensors", b"m" * 100)
    put_bytes(any_ws, "tasks/unet/checkpoint-70/config.json", b"{}")
    folder = run_json("scan", "unet")["unknown"][0]
    assert (folder["path"], folder["kind"], folder["size"], folder["addable"]) == (
        "tasks/unet/checkpoint-70",
        "dir",
        102,
        True,
    )
    assert [(a["number"], a["path"]) for a in run_json("scan", "unet", "--add")["added"]] == [
        (4, "tasks/unet/checkpoints/000004")
    ]
    assert run_json("list", "unet")[3]["step"] == 70
    remove_bytes(any_ws, "tasks/unet/notes.txt")
    assert run_json("verify", "unet")["checked"] == 4


def test_doctor_reports_missing_and_unknown(run_json: Any, any_ws: ckpt.Workspace) -> None:
    make_task(any_ws, "unet", n=3)
    assert run_json("doctor") == {"dry_run": False, "repairs": []}
    remove_bytes(any_ws, "tasks/unet/checkpoints/000002.pt")
    put_bytes(any_ws, "tasks/unet/checkpoints/stray.pt", b"s")
    repairs = {r["path"]: r for r in run_json("doctor")["repairs"]}
    assert set(repairs) == {"tasks/unet/checkpoints/000002.pt", "tasks/unet/checkpoints/stray.pt"}
    assert "has no file" in repairs["tasks/unet/checkpoints/000002.pt"]["problem"]
    assert "ckpt scan unet --add" in repairs["tasks/unet/checkpoints/stray.pt"]["action"]
    dry = run_json("doctor", "--forget-missing", "--dry-run")
    assert (
        dry["dry_run"]
        and "would forget" in {r["path"]: r for r in dry["repairs"]}["tasks/unet/checkpoints/000002.pt"]["action"]
    )
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3]
    done = {r["path"]: r["action"] for r in run_json("doctor", "--forget-missing")["repairs"]}
    assert done["tasks/unet/checkpoints/000002.pt"].startswith("forgot the record")
    assert [r["number"] for r in run_json("list", "unet")] == [1, 3]
    assert any_ws.task("unet").save(b"next") == 4  # a forgotten number is never reused


def test_doctor_drops_records_a_manifest_must_not_hold(run: Any, run_json: Any, any_ws: ckpt.Workspace) -> None:
    """Two records of one file, and one naming checkpoints/ itself (issue 15): refused until doctor drops them."""
    make_task(any_ws, "unet", n=4)
    if any_ws.remote:
        any_ws.task("unet").update(lambda state: None)  # type: ignore[attr-defined]  # the log folded in
        text = any_ws.storage.get("tasks/unet/task.toml")[0]  # type: ignore[attr-defined]
    else:
        text = any_ws.task("unet").manifest.read_bytes()
    text = text.replace(b'file = "checkpoints/000001.pt"', b'file = "checkpoints/000003.pt"')
    text = text.replace(b'file = "checkpoints/000002.pt"', b'file = "./checkpoints"')
    put_bytes(any_ws, "tasks/unet/task.toml", text)
    result = run("list", "unet")
    assert result.exit_code == 6 and "ckpt doctor" in result.stderr, result.output
    dry = run_json("doctor", "--dry-run")["repairs"]
    assert len([r for r in dry if "drop-bad-records" in r["action"]]) == 2, dry
    done = run_json("doctor", "--drop-bad-records")["repairs"]
    assert len([r for r in done if r["action"].startswith("dropped the record")]) == 2, done
    unrecorded = sorted(r["path"] for r in done if "no record" in r["problem"])
    assert unrecorded == ["tasks/unet/checkpoints/000001.pt", "tasks/unet/checkpoints/000002.pt"], done
    assert [r["number"] for r in run_json("list", "unet")] == [3, 4]
    assert ckpt.Workspace.open(any_ws.location if any_ws.remote else any_ws.root).task("unet").save(b"n") == 5


def test_import_move(run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    src = tmp_path / "out"
    src.mkdir()
    for epoch in range(2):
        (src / f"epoch={epoch}-step={epoch + 1}.ckpt").write_bytes(os.urandom(200))
    res = run_json("import", str(src), "--task", "lit", "--move")
    assert res["mode"] == "move" and [r["action"] for r in res["checkpoints"]] == ["added"] * 2
    assert list(src.iterdir()) == []  # the sources go once their records are committed
    assert [(r["number"], r["step"]) for r in run_json("list", "lit")] == [(1, 1), (2, 2)]
    assert run_json("verify")["ok"]


def test_import_folder_checkpoints(run_json: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "hf"
    for step in (10, 20):
        folder = src / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": np.full((2, 2), step, dtype=np.float32)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
        state = {"epoch": step / 10, "log_history": [{"step": step, "eval_loss": 1 / step}]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    res = run_json("import", str(src), "--task", "hf")
    assert [r["action"] for r in res["checkpoints"]] == ["added"] * 2
    rows = run_json("list", "hf")
    assert [(r["number"], r["step"]) for r in rows] == [(1, 10), (2, 20)]
    assert rows[1]["metrics"]["eval_loss"] == pytest.approx(0.05)
    shown = run_json("show", "hf", "2")
    assert shown["tensors"] == [{"name": "w", "shape": [2, 2], "dtype": "float32"}]
    any_ws.promote("hf", 2, title="hf-best")
    assert run_json("verify", "--models")["ok"]
    run_json("trash-unused", "hf", "--keep-last", "0")
    entry = run_json("trash", "list")[0]
    assert entry["checkpoints"] == [1]
    run_json("trash", "restore", entry["id"])
    assert run_json("verify", "--models")["ok"]
    assert run_json("import", str(src), "--task", "hf")["checkpoints"][0]["action"] == "already"


# --- object storage only -------------------------------------------------------------------------------


def test_s3_missing_workspace_and_bucket(run: Any, s3_url: str) -> None:
    result = run("-w", s3_url + "-none", "tasks")
    assert result.exit_code == 3 and "not a ckpt workspace" in result.stderr
    with pytest.raises(ckpt.CkptError, match="bucket 'no-such-bucket-x' does not exist"):
        ckpt.Workspace.init("s3://no-such-bucket-x/ws")


def test_s3_conditional_writes(s3_url: str) -> None:
    from ckpt.storage import PreconditionFailed, open_storage

    st = open_storage(s3_url)
    etag = st.put("a", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        st.put("a", b"2", if_none_match=True)
    newer = st.put("a", b"3", if_match=etag)
    with pytest.raises(PreconditionFailed):
        st.put("a", b"4", if_match=etag)  # a stale ETag loses
    assert st.get("a") == (b"3", newer)


def test_s3_lost_manifest_race_is_retried(s3_url: str) -> None:
    """Two handles on one task: the second commit finds the manifest changed, re-reads it, and keeps both."""
    ws_a = ckpt.Workspace.init(s3_url)
    ws_a.create_task("unet")
    a = ws_a.task("unet")
    b = ckpt.Workspace.open(s3_url).task("unet")
    a.state()
    b.state()  # both read the same version
    assert a.save(b"from a") == 1
    assert b.save(b"from b") == 2  # b's first If-Match fails; it re-reads and commits on top
    assert [cp.number for cp in ckpt.Workspace.open(s3_url).task("unet").checkpoints] == [1, 2]


def test_s3_of_two_racing_conditional_writes_one_wins(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 decides a conditional write atomically. moto's server checks the condition, then writes, in a thread
    per request: two writes racing on one key could both pass the check (tests/conftest.py makes its writes
    atomic). Here the first check is held open until the second write reaches its own check, or 1 s passed."""
    import threading

    from moto.s3.models import S3Backend

    from ckpt.storage import PreconditionFailed, open_storage

    real = S3Backend.get_object
    checks: list[str] = []
    second = threading.Event()

    def check(self: Any, bucket: str, key: str, *args: Any, **kw: Any) -> Any:
        found = real(self, bucket, key, *args, **kw)
        if key.endswith("/raced") and sys._getframe(1).f_code.co_name == "put_object":  # the condition's check
            checks.append(key)
            if len(checks) == 1:
                second.wait(timeout=1.0)  # not a timing assumption: either outcome of the wait is a valid run
            else:
                second.set()
        return found

    monkeypatch.setattr(S3Backend, "get_object", check)
    st = open_storage(s3_url)
    results: list[str] = []

    def put(who: str) -> None:
        try:
            st.put("raced", who.encode(), if_none_match=True)
            results.append("won")
        except PreconditionFailed:
            results.append("lost")

    threads = [threading.Thread(target=put, args=(who,)) for who in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["lost", "won"]
    assert len(checks) == 2


_WORKER = r"""
import sys, ckpt
url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = ckpt.Workspace.open(url).task("shared")
mine = [t.save(f"{who}-{i}".encode(), step=i, metrics={"who": float(who)}) for i in range(n)]
won = []
for title in ("best", f"p-{who}", "contested"):
    try:
        ckpt.Workspace.open(url).promote("shared", mine[-1], title=title)
        won.append(title)
    except ckpt.errors.ConflictError:
        pass
print(" ".join(map(str, mine)), "|", " ".join(won))
"""


def test_s3_concurrent_processes_lose_nothing(s3_url: str) -> None:
    ws = ckpt.Workspace.init(s3_url)
    ws.create_task("shared")
    workers, per = 4, 5
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, s3_url, str(w), str(per)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(workers)
    ]
    done = [p.communicate(timeout=120) for p in procs]
    outs = [o for o, _ in done]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in done]
    numbers = [int(x) for o in outs for x in o.split("|")[0].split()]
    wins = [w for o in outs for w in o.split("|")[1].split()]
    assert len(set(numbers)) == len(numbers) == workers * per  # every save got its own number
    task = ckpt.Workspace.open(s3_url).task("shared")
    assert sorted(cp.number for cp in task.checkpoints) == sorted(numbers)
    assert wins.count("best") == 1 and wins.count("contested") == 1  # one winner per title
    assert sorted(ws.models.titles()) == sorted(["best", "contested", *(f"p-{w}" for w in range(workers))])
    for m in ws.models:
        cp = task.checkpoint(m.checkpoint)
        assert m.sha256 == cp.sha256  # each model is the checkpoint its record names
    from ckpt.verify import verify

    assert verify(ws, models=True).ok


def test_preview_checkpoint_and_model(run: Any, any_ws: ckpt.Workspace, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import numpy as np
    from PIL import Image

    from ckpt.zoo import UNet

    kwargs = {"in_channels": 3, "classes": 2, "width": 4, "depth": 2}
    task = any_ws.create_task("tiny", arch="ckpt.zoo:UNet", arch_kwargs=kwargs)
    torch.manual_seed(0)
    task.save(UNet(**kwargs).state_dict(), step=1)
    any_ws.promote("tiny", 1, title="tiny-1")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = tmp_path / "images" / "im.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 2).astype(np.uint8)).save(tmp_path / "masks" / "im.png")
    scores = []
    for what in (["tiny", "1"], ["--model", "tiny-1"]):
        out = tmp_path / f"{what[-1]}.png"
        args = ["--images", str(image), "--masks", str(tmp_path / "masks"), "--out", str(out), "--json"]
        result = run("preview", *what, *args)
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout)["checkpoints"][0]["miou"])
        assert out.is_file()
    assert scores[0] == scores[1]  # the model is the checkpoint's bytes
    if any_ws.remote:  # the weights were downloaded once into the local cache, by sha256
        assert len(list((Path(os.environ["CKPT_CACHE"]) / "objects").rglob("*.pt"))) == 1


def test_s3_init_refuses_a_service_without_conditional_writes(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt.storage.s3 import S3Storage

    real = S3Storage.put

    def ignoring(self: Any, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        return real(self, key, data)  # what a service that drops the headers does

    monkeypatch.setattr(S3Storage, "put", ignoring)
    with pytest.raises(ckpt.CkptError, match="ignores conditional writes"):
        ckpt.Workspace.init(s3_url)


class _Crash(Exception):
    pass


def test_s3_trash_interrupted_before_the_manifest_is_undone(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the entry and its copies, before the manifest commit: the checkpoints never moved."""
    from ckpt import store_task

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=4)

    class Killed(BaseException):  # a crash, not an error: no cleanup runs (an error known not to have
        pass  # committed drops the entry at once)

    def crash(self: Any, change: Any) -> Any:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(store_task.StoreTask, "update", crash)
        with pytest.raises(Killed):
            trash_unused(ckpt.Workspace.open(s3_url), "unet")
    assert [b.key.split("/")[1] for b in ws.storage.list_prefix("trash/")]  # the pending entry is there
    listed = run_json("trash", "list")  # young: it may be a trash still running elsewhere, so it is left alone
    assert [e["state"] for e in listed] == ["pending"]
    assert run_json("trash", "empty", "--yes")["emptied"] == []
    monkeypatch.setattr(ckpt.trash_entry, "STALE_PENDING", 0.0)
    assert run_json("trash", "list") == []  # once stale, settled: undone
    assert ws.storage.list_prefix("trash/") == []
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3, 4]
    assert run_json("verify")["ok"]


def test_s3_trash_interrupted_after_the_manifest_is_finished(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the manifest commit, before the originals are deleted: the trash is completed."""
    from ckpt.storage.s3 import S3Storage

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=4)
    real = S3Storage.delete

    def crash(self: Any, keys: list[str]) -> None:
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(S3Storage, "delete", crash)
        with pytest.raises(_Crash):
            trash_unused(ckpt.Workspace.open(s3_url), "unet")
    assert S3Storage.delete is real
    assert [r["number"] for r in run_json("list", "unet")] == [4]
    entries = run_json("trash", "list")  # settles the pending entry: the originals go, the entry completes
    assert [(e["checkpoints"], e["state"]) for e in entries] == [([1, 2, 3], "complete")]
    assert sorted(b.key for b in ws.storage.list_prefix("tasks/unet/checkpoints/")) == [
        "tasks/unet/checkpoints/000004.pt"
    ]
    assert run_json("trash", "restore", entries[0]["id"])["checkpoints"] == [1, 2, 3]
    assert [r["number"] for r in run_json("list", "unet")] == [1, 2, 3, 4]
    assert run_json("verify")["ok"]


def test_s3_two_trash_unused_at_once_make_one_entry(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt.storage.s3 import S3Storage

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=4)
    real = S3Storage.copy_many
    other: list[str | None] = []

    def racing(self: Any, pairs: list[tuple[str, str]]) -> None:
        if not other:  # the other machine's trash-unused runs to the end while this one copies
            other.append(None)
            other[0] = trash_unused(ckpt.Workspace.open(s3_url), "unet").entry
        real(self, pairs)

    monkeypatch.setattr(S3Storage, "copy_many", racing)
    with pytest.raises(ckpt.errors.ConflictError, match="by another command"):
        trash_unused(ckpt.Workspace.open(s3_url), "unet")
    monkeypatch.setattr(S3Storage, "copy_many", real)
    entries = run_json("trash", "list")
    assert [(e["id"], e["checkpoints"]) for e in entries] == [(other[0], [1, 2, 3])]
    assert run_json("trash", "restore", entries[0]["id"])["checkpoints"] == [1, 2, 3]
    assert run_json("verify")["ok"]


def test_s3_models_remove_interrupted_before_the_model_goes_is_undone(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the entry record, while copying: the model is whole; doctor undoes the entry once stale."""
    from ckpt.storage.s3 import S3Storage
    from ckpt.trash_models import trash_model

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="m")

    def crash(self: Any, pairs: list[tuple[str, str]]) -> None:
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(S3Storage, "copy_many", crash)
        with pytest.raises(_Crash):
            trash_model(ckpt.Workspace.open(s3_url), "m")
    assert [m["title"] for m in run_json("models")] == ["m"]
    assert [e["state"] for e in run_json("trash", "list")] == ["pending"]
    young = run_json("doctor")["repairs"]
    assert [r["action"][:10] for r in young] == ["left alone"]
    monkeypatch.setattr(ckpt.trash_entry, "STALE_PENDING", 0.0)
    undone = run_json("doctor")["repairs"]
    assert [(r["problem"], r["action"]) for r in undone] == [
        (f"trash entry '{young[0]['path'].split('/')[1]}' is pending", "undone: nothing had moved")
    ]
    assert run_json("trash", "list") == [] and ws.storage.list_prefix("trash/") == []
    assert run_json("verify", "--models")["ok"]


def test_s3_models_remove_interrupted_after_the_record_is_finished(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after model.toml was deleted, before the weights and the claim: the remove is finished."""
    from ckpt.trash_models import trash_model

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="m")

    def crash(ws_: Any, title: str, keys: list[str]) -> None:
        ws_.storage.delete([f"models/{title}/model.toml"])
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(ckpt.trash_models, "drop_model", crash)
        with pytest.raises(_Crash):
            trash_model(ckpt.Workspace.open(s3_url), "m")
    assert run_json("models") == []
    entries = run_json("trash", "list")  # settled: the weights and the claim go, the entry completes
    assert [(e["kind"], e["state"]) for e in entries] == [("model", "complete")]
    assert ws.storage.list_prefix("models/") == []
    run_json("trash", "restore", entries[0]["id"])
    assert [m["title"] for m in run_json("models")] == ["m"]
    assert run_json("verify", "--models")["ok"]


def test_s3_two_models_removes_at_once_make_one_entry(
    run: Any, run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt.storage.s3 import S3Storage
    from ckpt.trash_models import trash_model

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="m")
    real = S3Storage.copy_many
    other: list[str] = []

    def racing(self: Any, pairs: list[tuple[str, str]]) -> None:
        if not other:  # the other machine's remove runs to the end while this one copies
            other.append("")
            other[0] = trash_model(ckpt.Workspace.open(s3_url), "m").entry
        real(self, pairs)

    monkeypatch.setattr(S3Storage, "copy_many", racing)
    with pytest.raises(ckpt.errors.ModelNotFound, match="meanwhile"):
        trash_model(ckpt.Workspace.open(s3_url), "m")
    monkeypatch.setattr(S3Storage, "copy_many", real)
    assert [e["id"] for e in run_json("trash", "list")] == other
    run_json("trash", "restore", other[0])
    assert run_json("verify", "--models")["ok"]


def test_s3_doctor_cleans_what_interrupted_commands_left(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=1)
    put_bytes(ws, "models/old/.claim", b"2020-01-01T00:00:00.000000+00:00\n")  # a promote that crashed long ago
    put_bytes(ws, "models/old/000001.pt", b"x" * 1000)
    put_bytes(ws, "models/new/.claim", f"{ckpt.timeutil.now_iso()}\n".encode())  # a promote running now
    # files under a trash id without its record: no ckpt leaves that (a record is written first and deleted
    # last), so they may be the only copy of something: reported, never deleted
    put_bytes(ws, "trash/20200101-000000-abcdef/files/checkpoints/000001.pt", b"y")
    dry = {r["path"]: r["action"] for r in run_json("doctor", "--dry-run")["repairs"]}
    assert dry == {
        "models/old": "would delete it",
        "models/new": "left alone: it may be in use",
        "trash/20200101-000000-abcdef": "left alone",
    }
    done = {r["path"]: r["action"] for r in run_json("doctor")["repairs"]}
    assert done["models/old"] == "deleted" and done["trash/20200101-000000-abcdef"] == "left alone"
    assert sorted(b.key for b in ws.storage.list_prefix("models/")) == ["models/new/.claim"]
    assert [b.key for b in ws.storage.list_prefix("trash/")] == [
        "trash/20200101-000000-abcdef/files/checkpoints/000001.pt"
    ]


def test_s3_rename_racing_for_one_title(run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one rename copies under the new title, another machine's rename or promote to it loses."""
    from ckpt.models import rename
    from ckpt.storage.s3 import S3Storage

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=2)
    ws.promote("unet", 1, title="a")
    ws.promote("unet", 2, title="b")
    real = S3Storage.copy_many
    lost: list[str] = []

    def racing(self: Any, pairs: list[tuple[str, str]]) -> None:
        if not lost:
            lost.append("")
            other = ckpt.Workspace.open(s3_url)
            for attempt in (lambda: rename(other, "b", "x"), lambda: other.promote("unet", 2, title="x")):
                with pytest.raises(ckpt.errors.ConflictError, match="already exists"):
                    attempt()
        real(self, pairs)

    monkeypatch.setattr(S3Storage, "copy_many", racing)
    assert rename(ckpt.Workspace.open(s3_url), "a", "x").checkpoint == 1
    monkeypatch.setattr(S3Storage, "copy_many", real)
    assert [(m["title"], m["checkpoint"]) for m in run_json("models")] == [("b", 2), ("x", 1)]
    assert run_json("verify", "--models")["ok"]


def test_s3_import_move_keeps_the_source_until_its_record_is_committed(
    run_json: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt import store_task
    from ckpt.importer import import_path

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ckpt.Workspace.init(s3_url)
    src = tmp_path / "out"
    src.mkdir()
    for step in (1, 2):
        (src / f"step={step}.ckpt").write_bytes(os.urandom(100))
    real = store_task.StoreTask.update
    commits: list[int] = []

    def second_commit_fails(self: Any, change: Any) -> Any:
        commits.append(1)
        if len(commits) == 2:  # the second record's commit
            raise _Crash
        return real(self, change)

    monkeypatch.setattr(store_task.StoreTask, "update", second_commit_fails)
    with pytest.raises(_Crash):
        import_path(ckpt.Workspace.open(s3_url), src, task="lit", mode="move")
    monkeypatch.setattr(store_task.StoreTask, "update", real)
    assert sorted(p.name for p in src.iterdir()) == ["step=2.ckpt"]  # only the committed one went
    assert [r["step"] for r in run_json("list", "lit")] == [1]
    again = run_json("import", str(src), "--task", "lit", "--move")
    assert [r["action"] for r in again["checkpoints"]] == ["added"] and list(src.iterdir()) == []
    assert run_json("verify")["ok"]


def test_s3_doctor_aborts_multipart_uploads_a_crashed_save_left(
    run_json: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckpt.trash

    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    make_task(ws, "unet", n=1)
    storage: Any = ws.storage
    key = "tasks/unet/checkpoints/000002.pt"
    upload = storage._call("create_multipart_upload", Key=storage._key(key))["UploadId"]
    storage._call("upload_part", Key=storage._key(key), UploadId=upload, PartNumber=1, Body=b"z" * 1000)
    assert [(k, u) for k, u, _ in storage.incomplete_uploads("")] == [(key, upload)]
    what = "an unfinished multipart upload (a save that stopped)"
    # moto reports one fixed initiation date (in 2010) for every upload: the age limit is moved instead
    stale = ckpt.store_doctor.STALE_AFTER
    monkeypatch.setattr(ckpt.store_doctor, "STALE_AFTER", 1e12)
    young = [r for r in run_json("doctor")["repairs"] if r["path"] == key]
    assert [(r["problem"], r["action"]) for r in young] == [
        (what, "left alone: less than an hour old, it may still be running")
    ]
    monkeypatch.setattr(ckpt.store_doctor, "STALE_AFTER", stale)
    dry = [r for r in run_json("doctor", "--dry-run")["repairs"] if r["path"] == key]
    assert [r["action"] for r in dry] == ["would abort it"]
    assert len(storage.incomplete_uploads("")) == 1
    done = [r for r in run_json("doctor")["repairs"] if r["path"] == key]
    assert [r["action"] for r in done] == ["aborted"]
    assert storage.incomplete_uploads("") == []
    assert run_json("verify")["ok"]
