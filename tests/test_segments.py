"""A bucket task's records in immutable segment objects named by task.toml (ckpt.store_segments)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import store_doctor, store_segments, store_task
from ckpt.doctor import doctor
from ckpt.errors import ManifestError
from ckpt.manifest import Checkpoint, check_format, parse_task, parse_toml, task_bytes
from ckpt.storage.memory import MemoryStorage, keys, mounted
from ckpt.trash import KeepRules, restore, trash_unused


@pytest.fixture
def st(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryStorage]:
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store_task, "FOLD_EVERY", 4)  # a fold every 4 saves
    monkeypatch.setattr(store_segments, "TAIL_MAX", 2)  # more than 2 loose records make a segment
    with mounted(MemoryStorage(f"memory://seg-{tmp_path.name}")) as storage:
        yield storage


def root(st: MemoryStorage) -> bytes:
    return st.objects["tasks/unet/task.toml"][0]


def segments(st: MemoryStorage) -> dict[str, bytes]:
    return keys(st, "tasks/unet/segments/")


def saved(st: MemoryStorage, n: int) -> ckpt.Task:
    task = ckpt.Workspace.init(st.url).create_task("unet")
    for i in range(1, n + 1):
        task.save(f"w{i}".encode(), step=i, metrics={"val_iou": i / 100})
    return task


def numbers(st: MemoryStorage) -> list[int]:
    """What another process reads."""
    return [cp.number for cp in ckpt.Workspace.open(st.url).task("unet").checkpoints]


def test_folds_write_segments_and_the_root_stays_small(st: MemoryStorage) -> None:
    saved(st, 13)
    text = root(st)
    state = parse_task(text, Path("task.toml"), "unet")
    assert text.startswith(b"format = 4\n")
    assert len(state.header.segments) == 3 and not state.checkpoints  # folds at saves 5, 9 and 13
    assert {f"tasks/unet/segments/{e[3]}.toml.gz" for e in state.header.segments} == set(segments(st))
    assert [e[:3] for e in state.header.segments] == [(1, 5, 5), (6, 9, 4), (10, 13, 4)]
    first = segments(st)[f"tasks/unet/segments/{state.header.segments[0][3]}.toml.gz"]
    one = parse_toml(gzip.decompress(first), Path())
    assert [r["number"] for r in one["checkpoints"]] == [1, 2, 3, 4, 5] and one["task"] == "unet"
    assert numbers(st) == list(range(1, 14))
    # a ckpt that knows no segments refuses the root: rewriting it would drop every record in them
    with pytest.raises(ManifestError, match="format 4 is newer"):
        check_format(parse_toml(text, Path("task.toml")), Path("task.toml"), 3)


def test_a_band_of_segments_is_merged_into_one(
    st: MemoryStorage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(store_segments, "FAN", 3)
    monkeypatch.setattr(store_segments, "BAND_BASE", 4)  # bands: < 12 records, < 36, ...
    saved(st, 29)
    state = parse_task(root(st), Path("task.toml"), "unet")
    sizes = [e[2] for e in state.header.segments]
    assert sum(sizes) == 29 and len(sizes) < 7  # 7 folds, merged as they gather
    assert all(sum(1 for s in sizes if store_segments.band(s) == b) < 3 for b in range(3))
    assert len(segments(st)) == len(sizes)  # the merged ones were deleted
    assert numbers(st) == list(range(1, 30))
    # and so were their parsed copies in this machine's cache: one per segment the manifest names
    assert len(list((tmp_path / "cache" / "segments").iterdir())) == len(sizes)


def test_trash_and_restore_across_segments(st: MemoryStorage) -> None:
    saved(st, 13)
    before = set(segments(st))
    ws = ckpt.Workspace.open(st.url)
    res = trash_unused(ws, "unet", rules=KeepRules(keep_last=2))
    assert res.entry is not None and len(res.plan.checkpoints) == 11
    state = parse_task(root(st), Path("task.toml"), "unet")
    assert not state.header.segments and sorted(state.checkpoints) == [12, 13]  # 2 left: inline again
    assert not set(segments(st))  # the replaced ones deleted once the commit landed
    assert numbers(st) == [12, 13]
    restore(ckpt.Workspace.open(st.url), res.entry)
    assert numbers(st) == list(range(1, 14))
    state = parse_task(root(st), Path("task.toml"), "unet")
    assert [e[:3] for e in state.header.segments] == [(1, 13, 13)] and not state.header.retired
    assert not set(segments(st)) & before


def test_a_commit_keeps_the_segments_it_does_not_change(st: MemoryStorage) -> None:
    task = saved(st, 9)
    first = parse_task(root(st), Path("task.toml"), "unet").header.segments
    task.set_status("finished")  # folds nothing: the segments stay as they are, and so does the format
    state = parse_task(root(st), Path("task.toml"), "unet")
    assert state.header.segments == first and state.header.status == "finished"
    assert root(st).startswith(b"format = 4\n") and b"log = " not in root(st)


class Crash(BaseException):
    pass


def test_a_crash_between_segment_and_commit_leaves_an_unnamed_segment_doctor_deletes(
    st: MemoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved(st, 8)
    before, records = set(segments(st)), numbers(st)
    real = st.put

    def crashing(key: str, data: bytes, **kw: Any) -> str:
        if key.endswith("task.toml"):
            raise Crash  # killed after the new segment was written, before the commit
        return real(key, data, **kw)

    monkeypatch.setattr(st, "put", crashing)
    task = ckpt.Workspace.open(st.url).task("unet")
    with pytest.raises(Crash):
        task.save(b"w9", step=9)  # the 4th record in the log: this save folds
    monkeypatch.setattr(st, "put", real)
    stray = set(segments(st)) - before
    assert len(stray) == 1
    assert numbers(st) == records  # never read: the root does not name it (the w8 object is unrecorded)
    ws = ckpt.Workspace.open(st.url)
    assert not any("segment" in r.problem for r in doctor(ws))  # young: it may be a commit still running
    monkeypatch.setattr(store_doctor, "STALE_PENDING", -1.0)
    repairs = [r for r in doctor(ws) if "segment" in r.problem]
    assert [(r.path, r.action) for r in repairs] == [(stray.pop(), "deleted")]
    assert set(segments(st)) == before
    assert not [r for r in doctor(ws) if "segment" in r.problem]


def test_a_failed_commit_deletes_its_new_segment(st: MemoryStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    saved(st, 8)
    before = set(segments(st))
    real = st.put

    def failing(key: str, data: bytes, **kw: Any) -> str:
        if key.endswith("task.toml"):
            raise ConnectionError("injected")
        return real(key, data, **kw)

    monkeypatch.setattr(st, "put", failing)
    with pytest.raises(ConnectionError):
        ckpt.Workspace.open(st.url).task("unet").save(b"w9", step=9)
    assert set(segments(st)) == before


def test_replaced_segments_a_crash_left_are_deleted_by_the_next_commit(
    st: MemoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved(st, 9)
    old = set(segments(st))
    real = st.delete

    def crashing(keys: list[str]) -> None:
        if any("/segments/" in k for k in keys):
            raise Crash  # killed after the commit landed, before deleting the segments it replaced
        real(keys)

    monkeypatch.setattr(st, "delete", crashing)
    with pytest.raises(Crash):
        trash_unused(ckpt.Workspace.open(st.url), "unet", rules=KeepRules(keep_last=6))
    monkeypatch.setattr(st, "delete", real)
    header = parse_task(root(st), Path("task.toml"), "unet").header
    first = f"tasks/unet/segments/{header.retired[0]}.toml.gz"
    assert len(header.retired) == 1 and first in old  # checkpoints 1-5: 1-3 went, 6-9 stay as they are
    assert old <= set(segments(st))  # still there, named as replaced: never read
    assert numbers(st) == [4, 5, 6, 7, 8, 9]
    repairs = [r for r in doctor(ckpt.Workspace.open(st.url), dry_run=True) if "segment" in r.problem]
    assert [(r.path, r.action) for r in repairs] == [(first, "would delete it")]  # replaced: at once, though young
    ckpt.Workspace.open(st.url).task("unet").set_policy(None)  # any commit
    assert first not in segments(st) and old - {first} <= set(segments(st))
    assert not parse_task(root(st), Path("task.toml"), "unet").header.retired
    assert numbers(st) == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("damage", ["missing", "damaged", "another"])
def test_a_missing_or_damaged_segment_is_exit_6_naming_it(
    st: MemoryStorage, run: Any, damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved(st, 9)
    monkeypatch.setenv("CKPT_WORKSPACE", st.url)
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "another"))  # another machine: nothing cached
    key = sorted(segments(st))[0]
    if damage == "missing":
        del st.objects[key]
    elif damage == "damaged":
        st.put(key, st.objects[key][0][:-20])
    else:  # a valid segment, but not the one the root names
        other = sorted(segments(st))[1]
        st.put(key, st.objects[other][0])
    result = run("list", "unet")
    assert result.exit_code == 6
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_cached_segments_are_not_fetched_again(
    st: MemoryStorage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    writer = saved(st, 9)
    fetched: list[str] = []
    real = st.get

    def get(key: str) -> tuple[bytes, str]:
        fetched.append(key)
        return real(key)

    monkeypatch.setattr(st, "get", get)
    assert numbers(st) == list(range(1, 10))  # the writer's machine: it wrote them, and cached them
    assert not [k for k in fetched if "/segments/" in k]
    for i in range(10, 14):
        writer.save(f"w{i}".encode(), step=i)  # a fold at 13: one new segment
    assert numbers(st) == list(range(1, 14))
    assert not [k for k in fetched if "/segments/" in k]

    def another_machine() -> list[int]:
        with monkeypatch.context() as m:
            m.setenv("CKPT_CACHE", str(tmp_path / "another"))
            return [cp.number for cp in ckpt.Workspace.open(st.url).task("unet").checkpoints]

    assert another_machine() == list(range(1, 14))  # each segment read once
    assert len([k for k in fetched if "/segments/" in k]) == 3
    for i in range(14, 18):
        writer.save(f"w{i}".encode(), step=i)
    fetched.clear()
    assert another_machine() == list(range(1, 18))  # only the new segment is read
    newest = parse_task(root(st), Path("task.toml"), "unet").header.segments[-1][3]
    assert [k for k in fetched if "/segments/" in k] == [f"tasks/unet/segments/{newest}.toml.gz"]


def test_a_manifest_of_an_older_ckpt_opens_and_is_migrated_by_the_next_commit(st: MemoryStorage) -> None:
    ws = ckpt.Workspace.init(st.url)
    task = ws.create_task("unet")
    state = task.state()
    for n in range(1, 41):  # a task main wrote before segments: every record in task.toml, its log open
        st.put(f"tasks/unet/checkpoints/{n:06d}.pt", b"w%d" % n)
        state.checkpoints[n] = Checkpoint(n, f"checkpoints/{n:06d}.pt", 2, "0" * 64, "2026-12-01T00:00:00+00:00", n)
    state.header.log = True
    st.put("tasks/unet/task.toml", task_bytes(state))
    assert root(st).startswith(b"format = 2\n")
    assert numbers(st) == list(range(1, 41))
    task = ckpt.Workspace.open(st.url).task("unet")
    assert task.save(b"w41", step=41) == 41  # into the log: task.toml not rewritten yet
    assert root(st).startswith(b"format = 2\n")
    task.set_status("finished")  # its next commit moves the records into a segment
    state = parse_task(root(st), Path("task.toml"), "unet")
    assert root(st).startswith(b"format = 4\n") and not state.checkpoints
    assert [e[:3] for e in state.header.segments] == [(1, 41, 41)]
    assert numbers(st) == list(range(1, 42))


def test_segments_on_a_real_s3_api(s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """moto's server: segments created with If-None-Match, fetched concurrently, replaced and deleted."""
    monkeypatch.setattr(store_task, "FOLD_EVERY", 4)
    monkeypatch.setattr(store_segments, "TAIL_MAX", 2)
    task = ckpt.Workspace.init(s3_url).create_task("unet")
    for i in range(1, 14):
        task.save(f"w{i}".encode(), step=i)
    storage = ckpt.Workspace.open(s3_url).storage  # type: ignore[attr-defined]
    assert len(storage.list_prefix("tasks/unet/segments/")) == 3
    monkeypatch.setenv("CKPT_CACHE", str(tmp_path / "another"))  # another machine
    assert [cp.number for cp in ckpt.Workspace.open(s3_url).task("unet").checkpoints] == list(range(1, 14))
    res = trash_unused(ckpt.Workspace.open(s3_url), "unet", rules=KeepRules(keep_last=2))
    assert res.entry is not None and not storage.list_prefix("tasks/unet/segments/")
    restore(ckpt.Workspace.open(s3_url), res.entry)
    assert len(storage.list_prefix("tasks/unet/segments/")) == 1
    assert [cp.number for cp in ckpt.Workspace.open(s3_url).task("unet").checkpoints] == list(range(1, 14))
    assert doctor(ckpt.Workspace.open(s3_url)) == []


def _cps(numbers: range) -> dict[int, Checkpoint]:
    return {n: Checkpoint(n, f"checkpoints/{n:06d}.pt", 1, "0" * 64, "2026-12-01T00:00:00+00:00", n) for n in numbers}


def test_plan_keeps_what_it_does_not_change_and_merges_a_full_band(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _cps(range(1, 101))
    entries = [(1, 40, 40, "a" * 16), (41, 80, 40, "b" * 16)]
    members = {"a" * 16: list(range(1, 41)), "b" * 16: list(range(41, 81))}  # 81-100 inline
    same = store_segments.plan(entries, members, before, dict(before))
    assert same.segments[:2] == entries and same.new is not None and same.new[1] == list(range(81, 101))
    after = dict(before)
    del after[3]  # a trash took one record of the first segment
    after[50] = Checkpoint(50, "checkpoints/000050.pt", 2, "1" * 64, "2026-12-01T00:00:00+00:00", 50)  # changed
    both = store_segments.plan(entries, members, before, after)
    assert both.retired == ["a" * 16, "b" * 16] and both.tail == [] and len(both.segments) == 1
    assert both.new is not None and both.new[1] == sorted(after) and both.segments[0][:3] == (1, 100, 99)
    few = store_segments.plan(entries, members, before, {n: cp for n, cp in before.items() if n <= 40 or n > 95})
    assert few.segments == entries[:1] and few.tail == [96, 97, 98, 99, 100] and few.new is None
    monkeypatch.setattr(store_segments, "FAN", 3)
    merged = store_segments.plan(entries, members, before, dict(before))  # 2 kept + the new one: a full band
    assert merged.retired == ["a" * 16, "b" * 16] and [e[:3] for e in merged.segments] == [(1, 100, 100)]


def test_two_writers_folding_into_segments_lose_nothing_and_leave_no_stray(
    st: MemoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_segments, "FAN", 3)
    monkeypatch.setattr(store_segments, "BAND_BASE", 2)
    lost: list[str] = []  # the new segments of commits that lost a race (the other writer committed first)
    real = store_task.StoreTask._forget
    monkeypatch.setattr(store_task.StoreTask, "_forget", lambda self, key: (lost.append(key), real(self, key)))
    ckpt.Workspace.init(st.url).create_task("unet")
    a, b = (ckpt.Workspace.open(st.url).task("unet") for _ in range(2))
    saved = [(a if i % 3 else b).save(f"w{i}".encode(), step=i) for i in range(1, 41)]
    trashed = trash_unused(ckpt.Workspace.open(st.url), "unet", rules=KeepRules(keep_last=25))
    assert trashed.entry is not None
    saved += [(b if i % 2 else a).save(f"w{i}".encode(), step=i) for i in range(41, 61)]
    gone = {cp.number for cp in trashed.plan.checkpoints}
    assert len(set(saved)) == 60 and len(gone) == 15
    assert numbers(st) == sorted(set(saved) - gone)
    named = {e[3] for e in parse_task(root(st), Path("task.toml"), "unet").header.segments}
    assert {k.rsplit("/", 1)[1].removesuffix(".toml.gz") for k in segments(st)} == named  # none left over
    assert [k for k in lost if k is not None]  # the races did happen
