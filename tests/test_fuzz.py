"""Fuzzing with hypothesis: mutated and random manifests (task, model, trash entry, workspace) through every
reading command, a mutated (and poisoned) task cache through reading commands and trash-unused, and random
bytes as checkpoint files through `show` and `verify`. Whatever is on disk,
a command exits with a documented code and one-line errors: never a traceback, never "internal error".

Each example runs one command, chosen by hypothesis, in process on a Click command built once (Typer's
CliRunner rebuilds every command per call, ~20 ms). FUZZ_EXAMPLES sets the examples per target (1,000).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ckpt
from ckpt import trash, trash_models
from ckpt.cli import app

from .conftest import make_task

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every CI run; set FUZZ_EXAMPLES higher to explore
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}
COUNTS: dict[str, int] = {}

_RUNNER = CliRunner()
_COMMAND = typer.main.get_command(app)  # built once: building it costs ~20 ms, and the fuzzer runs thousands


@dataclass
class _Result:
    exit_code: int
    output: str
    stdout: str
    stderr: str
    exception: BaseException | None


def invoke(args: list[str]) -> Any:
    """What CliRunner.invoke(app, args) gives, over the command built once."""
    exception: BaseException | None = None
    with _RUNNER.isolation() as streams:
        try:
            _COMMAND.main(args=args, prog_name="ckpt")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            exception = e if code else None
        except Exception as e:
            code, exception = 1, e
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        text = [stream.getvalue().decode("utf-8", "replace") for stream in streams]
    return _Result(code, text[2], text[0], text[1], exception)


def check(args: list[str], target: str) -> None:
    result = invoke(args)
    COUNTS[target] = COUNTS.get(target, 0) + 1
    detail = f"{args} -> {result.exit_code}\n{result.output}"
    assert result.exit_code in DOCUMENTED, detail
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), (detail, repr(result.exception))
    assert "internal error" not in result.stderr, detail
    assert "Traceback" not in result.output, detail
    if result.exit_code and not (args[0] == "verify" and "--json" in args):  # verify --json reports on stdout
        assert result.stderr.strip(), detail
    if result.exit_code == 0 and "--json" in args:
        json.loads(result.stdout)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template workspace: a task with metrics and an arch, a model, a checkpoint entry and a model entry."""
    root = tmp_path_factory.mktemp("fuzz") / "ws"
    ws = ckpt.Workspace.init(root)
    make_task(ws, "unet", n=4, size=64)
    ws.promote("unet", 2, title="m")
    ws.promote("unet", 3, title="gone")
    trash_models.trash_model(ws, "gone")
    trash.trash_unused(ws, "unet")
    return root


@pytest.fixture
def fresh(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "fz"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.setenv("CKPT_WORKSPACE", str(root))
    monkeypatch.setenv("CKPT_LOCK_TIMEOUT", "1")
    return root


def _drop_caches(root: Path) -> None:
    for p in (root / "tasks" / ".tasks.cache.json", root / "tasks" / "unet" / ".task.cache.json"):
        p.unlink(missing_ok=True)


# --- what goes into the files -------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["[bold]", "[/]", "..", "../../etc/passwd", "/abs", "a\0b", "\u202e", "x" * 300, "", "unet"]),
    st.datetimes(),
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_doc(draw: st.DrawFn, doc: dict[str, Any]) -> bytes:
    """The TOML of `doc` with 1-3 values replaced, removed or added at any depth."""
    doc = json.loads(json.dumps(doc, default=str))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            doc[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
            continue
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        elif action == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUES)
    try:
        return tomli_w.dumps(ckpt.manifest.drop_none(doc)).encode()
    except (TypeError, ValueError):
        return b"format = 1\n"


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with 1-3 byte edits: truncated, a slice cut out, bytes inserted, one byte changed."""
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["truncate", "cut", "insert", "flip"])):
            case "truncate":
                data = data[:i]
            case "cut":
                data = data[:i] + data[i + draw(st.integers(1, 40)) :]
            case "insert":
                data = data[:i] + draw(st.binary(min_size=1, max_size=20)) + data[i:]
            case _:
                data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


def contents(original: bytes) -> st.SearchStrategy[bytes]:
    import tomllib

    doc = tomllib.loads(original.decode())
    return st.one_of(
        mutated_doc(doc),
        mutated_bytes(original),
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
    )


# the reading commands that read each kind of file (a table or two: Rich renders what the file says)
READING = {
    "task manifest": [
        ["tasks", "--json"],
        ["tasks"],
        ["list", "unet", "--json"],
        ["list", "unet"],
        ["show", "unet", "4", "--json"],
        ["verify", "--json"],
        ["du", "--json"],
        ["doctor", "--dry-run", "--json"],
        ["trash-unused", "unet", "--dry-run", "--json"],
    ],
    "model manifest": [
        ["models", "--json"],
        ["models"],
        ["models", "show", "m"],
        ["list", "unet", "--json"],
        ["verify", "--models", "--json"],
        ["doctor", "--dry-run", "--json"],
        ["trash-unused", "unet", "--dry-run", "--json"],
    ],
    "trash entry": [
        ["trash", "list", "--json"],
        ["trash", "list"],
        ["du", "--json"],
        ["doctor", "--dry-run", "--json"],
        ["doctor", "--dry-run"],
    ],
    "workspace config": [
        ["tasks", "--json"],
        ["list", "unet", "--json"],
        ["models", "--json"],
        ["trash", "list", "--json"],
        ["du", "--json"],
        ["doctor", "--dry-run", "--json"],
    ],
}


def _fuzz_file(root: Path, rel: str, target: str) -> Callable[..., None]:
    path = root / rel
    original = path.read_bytes()
    commands = READING["trash entry" if "entry" in target else target]

    @FUZZ
    @given(data=contents(original), args=st.sampled_from(commands))
    def run(data: bytes, args: list[str]) -> None:
        path.write_bytes(data)
        _drop_caches(root)
        try:
            check(args, target)
        finally:
            path.write_bytes(original)

    return run


def _entry(root: Path, kind: str) -> str:
    for folder in sorted((root / "trash").iterdir()):
        if (folder / "entry.toml").is_file() and f'kind = "{kind}"' in (folder / "entry.toml").read_text():
            return f"trash/{folder.name}/entry.toml"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "target", ["task manifest", "model manifest", "checkpoints entry", "model entry", "workspace config"]
)
def test_fuzz_manifests_through_reading_commands(fresh: Path, target: str) -> None:
    rel = {
        "task manifest": "tasks/unet/task.toml",
        "model manifest": "models/m/model.toml",
        "checkpoints entry": _entry(fresh, "checkpoints") if target == "checkpoints entry" else "",
        "model entry": _entry(fresh, "model") if target == "model entry" else "",
        "workspace config": "ckpt.toml",
    }[target]
    _fuzz_file(fresh, rel, target)()
    assert COUNTS[target] >= EXAMPLES


# --- caches: other people's input as much as the manifests -------------------------------------------------


@st.composite
def mutated_json(draw: st.DrawFn, doc: dict[str, Any]) -> bytes:
    """The JSON of `doc` with 0-3 values replaced, removed or added at any depth (the key fields included)."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        elif action == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUES)
    return json.dumps(doc, default=str).encode()


CACHE_COMMANDS = [
    ["list", "unet", "--json"],
    ["show", "unet", "4", "--json"],
    ["tasks", "--json"],
    ["trash-unused", "unet", "--dry-run", "--json"],
    ["trash-unused", "unet", "--json"],
]


def _files(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (links not followed) by its bytes."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_fuzz_task_cache_through_commands(fresh: Path, tmp_path: Path) -> None:
    """A mutated `.task.cache.json` (a poisoned record file, a wrong type, a lying key): every command exits with a
    documented code, and a trash-unused that writes moves only the task's own checkpoint files into the trash,
    never a file outside the workspace (issue 15, point 4)."""
    unet = ckpt.Workspace.open(fresh).task("unet")
    for i in (5, 6):
        unet.save(os.urandom(64), step=i * 100, metrics={"val_iou": i / 10})  # 4 and 5 are unused: trash-unused moves
    canary = tmp_path / "outside" / "victim.bin"
    canary.parent.mkdir()
    canary.write_bytes(b"victim")
    assert invoke(["list", "unet", "--json"]).exit_code == 0  # writes the caches
    task = fresh / "tasks" / "unet"
    cache = task / ".task.cache.json"
    original = cache.read_bytes()
    doc = json.loads(original)
    poisoned = doc["checkpoints"]["number"].index(4)
    doc["checkpoints"]["file"][poisoned] = os.path.relpath(canary, task)  # a poisoned record among the mutations
    pristine = tmp_path / "pristine"
    shutil.copytree(fresh, pristine, symlinks=True)
    before = {k: v for k, v in _files(fresh).items() if k.startswith("tasks/unet/checkpoints/")}

    @FUZZ
    @given(
        data=st.one_of(mutated_json(doc), mutated_json(json.loads(original)), mutated_bytes(original)),
        args=st.sampled_from(CACHE_COMMANDS),
    )
    @example(data=json.dumps(doc).encode(), args=["trash-unused", "unet", "--json"])  # the poison alone
    def run(data: bytes, args: list[str]) -> None:
        cache.write_bytes(data)
        for p in (task / ".task.list.cache", fresh / "tasks" / ".tasks.cache.json"):
            p.unlink(missing_ok=True)
        try:
            check(args, "task cache")
            assert canary.read_bytes() == b"victim" and os.listdir(canary.parent) == ["victim.bin"]
            if "--dry-run" not in args and args[0] == "trash-unused":
                after = _files(fresh)
                for rel, data in before.items():  # each checkpoint file is in its task or in the trash, unchanged
                    moved = [k for k, v in after.items() if k.endswith(rel.removeprefix("tasks/unet/")) and v == data]
                    assert moved, rel
                shutil.rmtree(fresh)
                shutil.copytree(pristine, fresh, symlinks=True)
        finally:
            if cache.exists() or not cache.is_symlink():
                cache.write_bytes(original)

    run()
    assert COUNTS["task cache"] >= EXAMPLES


# --- checkpoint files ---------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _safetensors(header: Any) -> bytes:
    raw = json.dumps(header, default=str).encode()
    return struct.pack("<Q", len(raw)) + raw


# a pickle of {"w": tensor}, as torch writes it (protocol 2, persistent storage ids), without needing torch
_PICKLE = (
    b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03"
    b"ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07QK\x00K\x02K\x02\x86q\x08"
    b"K\x02K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs."
)

TENSOR_META = st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
    st.one_of(VALUES, st.lists(st.integers(-5, 2**40), max_size=4), st.sampled_from(["F32", "BF16", "I8", "?"])),
    max_size=4,
)
CHECKPOINT_BYTES = st.one_of(
    st.binary(max_size=300),
    mutated_bytes(_zip({"archive/data.pkl": _PICKLE, "archive/data/0": b"\0" * 16, "archive/version": b"3\n"})),
    st.builds(
        lambda pkl, comp: _zip({"archive/data.pkl": pkl}, comp),
        st.one_of(mutated_bytes(_PICKLE), st.binary(max_size=100)),
        st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
    ),
    st.builds(_safetensors, st.dictionaries(st.text(max_size=8), st.one_of(TENSOR_META, VALUES), max_size=4)),
    mutated_bytes(_safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}) + b"\0" * 16),
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=50)),
)


def test_fuzz_checkpoint_bytes_through_show_and_verify(fresh: Path) -> None:
    path = fresh / "tasks" / "unet" / "checkpoints" / "000004.pt"

    @FUZZ
    @given(
        data=CHECKPOINT_BYTES,
        args=st.sampled_from([["show", "unet", "4", "--json"], ["show", "unet", "4"], ["verify", "unet", "--json"]]),
    )
    def run(data: bytes, args: list[str]) -> None:
        path.unlink()
        path.write_bytes(data)
        check(args, "checkpoint bytes")

    run()
    assert COUNTS["checkpoint bytes"] >= EXAMPLES


# Pieces of pickle machine code, hostile ones among them: shared references (BINPUT/BINGET, DUP) that
# make [x, x] and (t, t) nests when repeated, hashing into dicts and sets, calls of stand-ins, builds.
_OPCODES = [
    b"]",
    b"}",
    b")",
    b"\x8f",
    b"(",
    b"e",
    b"a",
    b"u",
    b"s",
    b"t",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x90",
    b"\x91",
    b"l",
    b"d",
    b"2",
    b"0",
    b"1",
    b"q\x00",
    b"h\x00",
    b"q\x01",
    b"h\x01",
    b"\x94",
    b"N",
    b"K\x07",
    b"J\xff\xff\xff\x7f",
    b"\x8a\x09\x01\x00\x00\x00\x00\x00\x00\x00\x01",
    b"X\x01\x00\x00\x00k",
    b"ccollections\nOrderedDict\n",
    b"cbuiltins\nbytearray\n",
    b"cbuiltins\nset\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"cos\nsystem\n",
    b"R",
    b"b",
    b"\x81",
    b"Q",
    b"\x88",
]
# Stack-neutral pieces that grow a structure each time they repeat: memo 0 = [memo 0, memo 0] (2**n visits),
# memo 1 = (memo 1, memo 1) (2**n steps to hash), {memo 1: 1}, a tuple around the top, an empty dict kept.
_GROWERS = [b"](h\x00h\x00eq\x00", b"h\x01h\x01\x86q\x01", b"}h\x01K\x01s", b"\x85", b"}\x94", b"h\x00"]
_PIECE = st.one_of(
    st.tuples(st.lists(st.sampled_from(_OPCODES), min_size=1, max_size=6), st.integers(1, 80)),
    st.tuples(st.lists(st.sampled_from(_GROWERS), min_size=1, max_size=3), st.integers(1, 3000)),
)
PICKLE_CODE = st.lists(_PIECE, max_size=8).map(
    lambda parts: b"\x80\x02]q\x00)q\x01" + b"".join(b"".join(code) * times for code, times in parts) + b"."
)


def test_fuzz_pickle_code_through_show(fresh: Path) -> None:
    """Random pickle machine code (repeated pieces make deep, shared and colliding structures) in a torch
    zip: show reads it within its budget, or refuses it with exit 6; never a hang or a traceback."""
    path = fresh / "tasks" / "unet" / "checkpoints" / "000004.pt"

    @FUZZ
    @given(code=PICKLE_CODE)
    def run(code: bytes) -> None:
        path.unlink()
        path.write_bytes(_zip({"archive/data.pkl": code, "archive/version": b"3\n"}))
        check(["show", "unet", "4", "--json"], "pickle code")

    run()
    assert COUNTS["pickle code"] >= EXAMPLES


def _encrypted(archive: bytes) -> bytes:
    """`archive` with every member flagged as encrypted (bit 0 of the flags in each local and central header)."""
    out = bytearray(archive)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = out.find(sig)
        while i >= 0:
            out[i + at] |= 1
            i = out.find(sig, i + 4)
    return bytes(out)


def test_checkpoint_with_an_encrypted_member_is_corrupt_not_an_internal_error(fresh: Path) -> None:
    """Found by the fuzzer: zipfile raises RuntimeError ('password required') for an encrypted member."""
    path = fresh / "tasks" / "unet" / "checkpoints" / "000004.pt"
    path.unlink()
    path.write_bytes(_encrypted(_zip({"archive/data.pkl": _PICKLE, "archive/version": b"3\n"})))
    result = CliRunner().invoke(app, ["-w", str(fresh), "show", "unet", "4", "--json"])
    assert result.exit_code == 6, result.output
    assert result.stderr.startswith("error: ") and "corrupt" in result.stderr, result.stderr


def test_fuzz_figures() -> None:
    """Prints how many examples ran per target (docs/reliability.md quotes them); runs last in this file."""
    print("fuzz examples:", json.dumps(COUNTS, sort_keys=True))
    assert not COUNTS or all(n >= EXAMPLES for n in COUNTS.values())
