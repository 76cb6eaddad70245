"""Tables that fit the terminal (issue 19): rendered by the real `ckpt` in a pseudo-terminal of 60, 80, 120 and
200 columns, and read back: no line wider than the terminal, every number shown whole and equal to its
formatted value, text cut only with `…`, the priority columns there. Also --limit, --top, --columns, --wide."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import trash, trash_models
from ckpt.cli._common import fmt_metric, human_size
from ckpt.cli._table import NUM, TEXT, Column, cut, cut_items, left_out_line, render, short_times
from ckpt.models import promote

from .conftest import make_task

WIDTHS = (60, 80, 120, 200)
LONG = {n: f"{label}-" + "x" * (99 - len(label)) for n, label in ((0, "none"), (3, "three"), (12, "twelve"))}
VALUES = (1 / 7, 1.2345e-7, 12345.678, -2.5, 0.0, 3e-5, 2.0, 0.99999, 1e20, math.nan, 7.25, 1 / 3)


def _metrics(n: int, i: int) -> dict[str, float]:
    return {f"m{k}_{'loss' if k % 2 else 'acc'}": VALUES[(k + i) % len(VALUES)] * (i + 1) for k in range(n)}


@pytest.fixture(scope="module")
def tables_ws(tmp_path_factory: pytest.TempPathFactory) -> ckpt.Workspace:
    """Tasks of 0, 3 and 12 metrics with 100-character names, and models with 100-character titles."""
    ws = ckpt.Workspace.init(tmp_path_factory.mktemp("tables") / "ws")
    for n, name in LONG.items():
        t = ws.create_task(name)
        for i in range(4):
            t.save(os.urandom(10 + 400 * i), step=i * 1000 + 7, epoch=i, metrics=_metrics(n, i))
        promote(ws, name, 2, title=f"model-{n}-" + "t" * (92 - len(str(n))))
    promote(ws, LONG[3], 3, title="short")
    return ws


def _in_terminal(ws: ckpt.Workspace, columns: int, *args: str) -> tuple[list[str], str]:
    """stdout lines and stderr of the real `ckpt` whose stdout is a pseudo-terminal `columns` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["CKPT_WORKSPACE"] = str(ws.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return text.splitlines(), stderr.decode()


def _span(header: str, name: str) -> tuple[int, int] | None:
    """Where the column header `name` is in the header line, or None if the column is left out."""
    m = re.search(rf"(?<!\S){re.escape(name)}(?!\S)", header)
    return (m.start(), m.end()) if m else None


def _number_at(row: str, end: int, expected: str) -> None:
    """The right-aligned cell that ends at `end` is `expected`, whole: blanks on both sides."""
    if not expected:
        assert row[max(end - 1, 0) : end].strip() == "", row
        return
    assert row[end - len(expected) : end] == expected, (row, end, expected)
    start = end - len(expected)
    assert row[end : end + 1] in ("", " ") and (start == 0 or row[start - 1] == " "), (row, expected)


def _text_at(row: str, start: int, expected: str) -> None:
    """The left-aligned cell from `start` is `expected`, or its start and `…`."""
    cell = row[start:].split("  ")[0]
    assert cell == expected or (cell.endswith("…") and expected.startswith(cell[:-1])), (cell, expected)


def _items_at(row: str, start: int, expected: dict[str, float]) -> None:
    """The cell from `start` shows the first of `expected` (`k=v`) whole, and ` …` if it leaves any out."""
    want = [f"{k}={fmt_metric(v)}" for k, v in expected.items()]
    got = [x for x in row[start:].split("  ") if x]
    shown = 0
    while shown < min(len(want), len(got)) and got[shown].removesuffix(" …") == want[shown]:
        shown += 1
        if got[shown - 1].endswith(" …"):
            break
    if shown < len(want):
        assert shown > 0 and got[shown - 1].endswith(" …"), (row, want)


def _fits(lines: list[str], columns: int) -> None:
    assert lines and all(len(line) <= columns for line in lines), [x for x in lines if len(x) > columns]


def _left_out(stderr: str, complete: bool) -> None:
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert last.endswith("; --columns or --wide") == (not complete), stderr


@pytest.mark.parametrize("columns", WIDTHS)
def test_list_fits_a_terminal(tables_ws: ckpt.Workspace, columns: int) -> None:
    for n, name in LONG.items():
        cps = {cp.number: cp for cp in tables_ws.task(name).checkpoints}
        metric = next(iter(_metrics(n, 0)), None)
        lines, stderr = _in_terminal(tables_ws, columns, "list", name)
        _fits(lines, columns)
        header, rows, sparks = lines[1], lines[2:6], lines[6:]
        assert len(rows) == 4
        # then, at a terminal, a sparkline per metric (at most 8, then a line saying how many more)
        assert len(sparks) == min(n, 8) + (n > 8), sparks
        assert all(set(x) & set("▁▂▃▄▅▆▇█") or x.startswith("+") for x in sparks), sparks
        spans = {c: _span(header, c) for c in ["#", "step", "size", "models", *_metrics(n, 0)]}
        assert all(spans[c] for c in ("#", "step", "size")) and (metric is None or spans[metric]), header
        for row in rows:
            number = int(row[: spans["#"][1]])  # type: ignore[index]
            cp = cps[number]
            for name_, span in spans.items():
                if span is None or name_ == "models":
                    continue
                value = {"#": str(number), "step": str(cp.step), "size": human_size(cp.size)}.get(name_)
                _number_at(row, span[1], value if value is not None else fmt_metric(cp.metrics.get(name_)))
            if spans["models"] is not None and number == 2:
                _text_at(row, spans["models"][0], f"model-{n}-" + "t" * (92 - len(str(n))))
        _left_out(stderr, complete=all(spans.values()) and "created" in header and "epoch" in header)


@pytest.mark.parametrize("columns", WIDTHS)
def test_tasks_and_models_fit_a_terminal(tables_ws: ckpt.Workspace, columns: int) -> None:
    lines, stderr = _in_terminal(tables_ws, columns, "tasks")
    _fits(lines, columns)
    header, rows = lines[0], lines[1:]
    spans = {c: _span(header, c) for c in ("task", "status", "checkpoints", "size", "latest metrics")}
    assert all(spans[c] for c in ("task", "status", "checkpoints", "size")), header
    summaries = {r.name: r for r in tables_ws.tasks()[0]}
    seen = set()
    for row in rows:
        name = next(n for n in summaries if n.startswith(row.split("  ")[0].removesuffix("…")))
        seen.add(name)
        r = summaries[name]
        _text_at(row, 0, name)
        _number_at(row, spans["checkpoints"][1], str(r.checkpoints))  # type: ignore[index]
        _number_at(row, spans["size"][1], human_size(r.size))  # type: ignore[index]
        if spans["latest metrics"] is not None:
            _items_at(row, spans["latest metrics"][0], r.latest_metrics)
    assert seen == set(LONG.values())
    _left_out(stderr, complete=spans["latest metrics"] is not None)

    lines, stderr = _in_terminal(tables_ws, columns, "models")
    _fits(lines, columns)
    header, rows = lines[0], lines[1:]
    spans = {c: _span(header, c) for c in ("title", "task", "checkpoint", "size", "metrics", "created", "storage")}
    assert all(spans[c] for c in ("title", "checkpoint", "size")), header
    models = {m.title: m for m in tables_ws.models.read_all()[0]}
    assert len(rows) == len(models) == 4
    for row in rows:
        title = next(t for t in models if t.startswith(row.split("  ")[0].removesuffix("…")))
        m = models[title]
        _text_at(row, 0, title)
        _number_at(row, spans["checkpoint"][1], str(m.checkpoint))  # type: ignore[index]
        _number_at(row, spans["size"][1], human_size(m.size))  # type: ignore[index]
        if spans["task"] is not None:
            _text_at(row, spans["task"][0], m.task)
        if spans["metrics"] is not None:
            _items_at(row, spans["metrics"][0], m.metrics)
    _left_out(stderr, complete=all(spans.values()))


def test_piped_a_table_has_every_column_uncut_unless_columns_is_set(
    run: Any, tables_ws: ckpt.Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPT_WORKSPACE", str(tables_ws.root))
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run("list", LONG[12])
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout and all(m in r.stdout for m in _metrics(12, 0)) and "created" in r.stdout
    assert LONG[12] in r.stdout and "model-12-" + "t" * 90 in r.stdout and r.stderr == ""
    monkeypatch.setenv("COLUMNS", "70")
    r = run("list", LONG[12])
    assert r.exit_code == 0 and max(map(len, r.stdout.splitlines())) <= 70
    assert r.stderr.splitlines()[-1] == "+epoch, 10 metrics, created; --columns or --wide"
    r = run("list", LONG[12], "--wide")
    assert r.exit_code == 0 and "…" not in r.stdout and "m11_loss" in r.stdout and r.stderr == ""
    r = run("list", LONG[12], "--columns", "m11_loss,number,MODELS")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["m11_loss", "#", "models"] and r.stderr == ""
    assert max(map(len, lines)) <= 70 and lines[3].endswith("…")


def test_columns_and_wide_are_usage_errors_where_they_mean_nothing(run: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=2)
    r = run("list", "unet", "--columns", "number,nope")
    assert r.exit_code == 2 and "no column 'nope'" in r.stderr and "val_iou" in r.stderr
    for args in (["list", "unet"], ["tasks"], ["models"], ["trash", "list"]):
        r = run(*args, "--json", "--wide")
        assert r.exit_code == 2 and "--wide" in r.stderr, (args, r.output)
        r = run(*args, "--json", "--columns", "size")
        assert r.exit_code == 2 and "--columns" in r.stderr, (args, r.output)


def test_limit_on_every_listing_json_and_table(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=5)
    make_task(ws, name="other", n=1)
    for n in (2, 3, 4):
        promote(ws, "unet", n)
    trash_models.trash_model(ws, "unet-4", reason="test")
    trash.trash_unused(ws, "unet", trash.KeepRules(), reason="test")
    assert [r["number"] for r in run_json("list", "unet", "--limit", "2")] == [2, 3]
    assert [r["number"] for r in run_json("list", "unet", "--desc", "--sort", "number", "--limit", "1")] == [5]
    assert len(run_json("tasks", "--limit", "1")) == 1 and len(run_json("tasks")) == 2
    assert len(run_json("models", "--limit", "1")) == 1 and len(run_json("models", "list")) == 2
    assert len(run_json("trash", "list", "--limit", "1")) == 1 and len(run_json("trash", "list")) == 2
    r = run("tasks", "--limit", "1")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    r = run("list", "unet", "--limit", "1")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3
    r = run("trash", "list", "--limit", "1")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    assert run("list", "unet", "--limit", "0").exit_code == 2


def test_top_is_the_best_n_by_the_sorted_metric(run: Any, run_json: Any, ws: ckpt.Workspace) -> None:
    make_task(ws, n=5)  # val_iou rises with the number, loss falls
    assert [r["number"] for r in run_json("list", "unet", "--sort", "val_iou", "--top", "2")] == [5, 4]
    assert [r["number"] for r in run_json("list", "unet", "--sort", "loss", "--top", "3")] == [5, 4, 3]
    r = run("list", "unet", "--sort", "loss", "--top", "1")
    assert r.exit_code == 0 and r.stdout.splitlines()[2].split()[0] == "5" and len(r.stdout.splitlines()) == 3
    for args, says in (
        ([], "--top N needs --sort METRIC"),
        (["--sort", "step"], "--top N needs --sort METRIC"),
        (["--sort", "loss", "--limit", "2"], "give one of them"),
    ):
        r = run("list", "unet", *args, "--top", "2")
        assert r.exit_code == 2 and says in r.stderr and r.stderr.count("\n") == 1, (args, r.output)
    # --asc / --desc with --top say which end is best (for a metric whose direction ckpt cannot tell)
    assert [r["number"] for r in run_json("list", "unet", "--sort", "loss", "--desc", "--top", "2")] == [1, 2]


# --- the formatter itself ---------------------------------------------------------------------------


def test_numbers_have_four_significant_digits_and_never_show_zero_for_a_value() -> None:
    assert [fmt_metric(v) for v in (1 / 7, 0.00001234, 123456.7, 2.0, 0.0, 1e-30)] == [
        "0.1429",
        "1.234e-05",
        "1.235e+05",
        "2",
        "0",
        "1e-30",
    ]


def test_text_is_cut_with_an_ellipsis_and_items_only_between_items() -> None:
    assert cut("abcdefgh", 8) == "abcdefgh" and cut("abcdefgh", 5) == "abcd…" and cut("漢字漢字", 5) == "漢字…"
    assert cut_items("a=0.1429  b=2  c=3", 12) == "a=0.1429 …" and cut_items("a=0.1429  b=2", 20) == "a=0.1429  b=2"
    assert cut_items("a_long_name=0.1429  b=2", 8) == "a_long_…"


def test_times_show_what_differs() -> None:
    same_year = ["2026-12-04T20:16:49.1+00:00", "2026-11-04T20:17:02.1+00:00", None]
    assert short_times(same_year) == ["12-04 20:16", "11-04 20:17", ""]
    assert short_times(["2025-12-04T20:16:49+00:00", "2026-12-04T20:16:50+00:00"]) == [
        "2025-12-04 20:16",
        "2026-12-04 20:16",
    ]
    same_minute = ["2026-12-04T20:16:49+00:00", "2026-12-04T20:16:50+00:00"]
    assert short_times(same_minute) == ["12-04 20:16:49", "12-04 20:16:50"]


def test_the_left_out_line_names_what_a_narrow_terminal_left_out() -> None:
    cols = [Column("epoch", []), *(Column(f"m{i}", [], NUM, group="metrics") for i in range(9)), Column("a", [])]
    assert left_out_line(cols) == "+epoch, 9 metrics, a; --columns or --wide"
    assert left_out_line([Column("m0", [], group="metrics")]) == "+m0; --columns or --wide"


def test_a_reader_that_goes_away_stops_the_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ckpt list | head -1`: the first write that meets the closed pipe ends the table; nothing more is written."""

    class Closed(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            self.writes += 1
            if self.writes > 1:
                raise BrokenPipeError
            return super().write(s)

    monkeypatch.delenv("COLUMNS", raising=False)
    stream = Closed()
    notes: list[str] = []
    cols = [Column("#", [str(i) for i in range(5000)], NUM), Column("name", ["x" * 30] * 5000, TEXT)]
    with pytest.raises(BrokenPipeError):
        render(cols, stream=stream, note=notes.append)
    assert stream.writes == 2 and stream.getvalue() == "   #  name\n" and notes == []


def test_a_table_piped_to_a_closed_reader_exits_1_quietly(ws: ckpt.Workspace) -> None:
    make_task(ws, n=3)
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt", "list", "unet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1 and "Traceback" not in stderr and "Exception ignored" not in stderr


def test_control_characters_stay_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    stream = io.StringIO()
    render([Column("path", ["a\nb", "tab\there"])], stream=stream)
    assert stream.getvalue().splitlines() == ["path", "a\\nb", "tab\\there"]


def test_json_is_unchanged_by_the_table_options(run_json: Any, ws: ckpt.Workspace, tmp_path: Path) -> None:
    make_task(ws, n=3)
    whole = run_json("list", "unet")
    assert run_json("list", "unet", "--limit", "3") == whole
    assert json.dumps(run_json("list", "unet", "--limit", "2")) == json.dumps(whole[:2])


def test_every_other_table_fits_too(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`_common.table` (import, scan, verify, du, doctor, trash-unused --dry-run, show): numbers whole and
    right-aligned, `k=v` items cut between items, text cut with `…`, leftmost columns kept first."""
    from ckpt.cli._common import table

    monkeypatch.setenv("COLUMNS", "36")
    rows = [[7, "epoch=3-step=" + "9" * 40 + ".ckpt", "a=0.1429  b=2.5e-07", 1234567], [12, "b", "", None]]
    table(["#", "original name", "metrics", "count"], rows, items=["metrics"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert max(map(len, lines)) <= 36 and lines[0].startswith(" #") and lines[2].startswith("12")
    assert lines[1].startswith(" 7  epoch=3-step=99") and "… " in lines[1] and "a=0.1429 …" in lines[1]
    assert err == "+count; a wider terminal shows them (e.g. COLUMNS=200)\n"  # these commands have no --wide
