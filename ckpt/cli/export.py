"""The export command: a checkpoint's weights as safetensors (docs/formats-checkpoints.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from ._app import app
from ._common import JsonOpt, command, console, err, human_size, is_tty, open_workspace, out, plural, print_json
from ._complete import tasks as complete_tasks


@contextlib.contextmanager
def _writing_progress() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of bytes written on stderr, on a terminal only; yields the callback (or None)."""
    if not is_tty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("exporting"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        job = bar.add_task("exporting", total=None)
        yield lambda n, total: bar.update(job, advance=n, total=total)


@command(app, "export")
def export_(
    task: Annotated[
        str | None, typer.Argument(help="The task (or give --model).", autocompletion=complete_tasks)
    ] = None,
    number: Annotated[int | None, typer.Argument(help="The checkpoint number (default: the latest).")] = None,
    out_text: Annotated[
        str | None,
        typer.Option("--out", "-o", help="The .safetensors file to write (a folder with --max-shard-size)."),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Export this model instead.")] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option("--max-shard-size", help="Write Hugging Face shards of at most this size (5GB = 5×10⁹ bytes)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="The state dict inside the checkpoint (default: the weights).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Convert floating-point tensors: bf16, fp16, fp32.")
    ] = None,
    as_model: Annotated[
        str | None,
        typer.Option("--as-model", help="Keep the export as model TITLE (its model.toml names the checkpoint)."),
    ] = None,
    unsafe_load: Annotated[
        bool,
        typer.Option("--unsafe-load", help="Read a file whose pickle names classes outside torch's safe list."),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Write a checkpoint's model weights as safetensors, streamed one tensor at a time (no pickle, no torch).

    Reads torch files (.pt .pth .bin, a Lightning .ckpt's state_dict), safetensors (sharded too), DCP
    folders and DeepSpeed steps (ZeRO 0-2 model states; ZeRO-3 gathered from the ranks' fp32 groups).

    Example: ckpt export unet 7 --out unet.safetensors --dtype bf16
    """
    from ..errors import UsageError
    from ..export import export, parse_size
    from ..readcheck import check_out, check_readable
    from ..sources import open_contents

    if (model is None) == (task is None):
        raise UsageError(
            "give a TASK (and NUMBER) or --model TITLE", hint="e.g. ckpt export unet 7 --out unet.safetensors"
        )
    if out_text is not None and as_model is not None:
        raise UsageError("give --out PATH or --as-model TITLE, not both", hint="--as-model keeps the export as a model")
    if out_text is None and as_model is None:
        raise UsageError("give --out PATH or --as-model TITLE", hint="e.g. --out model.safetensors")
    if out_text is not None and not out_text.strip():
        raise UsageError("--out needs a path", hint="e.g. --out model.safetensors")
    out_path = Path(out_text) if out_text is not None else None
    if as_model is not None and max_shard_size is not None:
        raise UsageError("--as-model keeps one model.safetensors; drop --max-shard-size")
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    ws = open_workspace()
    if out_path is not None:
        check_out(ws, out_path)
    m = None
    if model is not None:
        if number is not None:
            raise UsageError("--model exports that model's weights; drop NUMBER")
        m = ws.models[model]
        task, number = m.task, m.checkpoint
    assert task is not None
    t = ws.task(task)
    t.settle()
    cp = t.checkpoint(number) if number is not None else t.latest()
    if cp is None:
        raise UsageError(f"task '{task}' has no checkpoints to export")
    own = m is not None and m.sha256 != cp.sha256  # an export kept as a model: its weights are its own file
    if own and as_model is not None:
        raise UsageError(
            f"model '{model}' is itself an export of {t.name} checkpoint {cp.number}",
            hint=f"make the new model from that checkpoint: ckpt export {t.name} {cp.number} --as-model {as_model}",
        )
    if as_model is not None:
        from ..exported import export_model

        with _writing_progress() as progress:
            _, res, contents = export_model(
                ws, t.name, cp.number, as_model, key=key, dtype=dtype, unsafe=unsafe_load, progress=progress
            )
    else:
        assert out_path is not None
        meta = {"ckpt_task": t.name, "ckpt_checkpoint": str(cp.number), "ckpt_sha256": cp.sha256}
        if own:
            assert m is not None
            check_readable(ws, m.path, sha256=m.sha256, size=m.size, task=t.name)
            contents = open_contents(ws.model_local_path(m), key)
            meta.update({"ckpt_model": m.title, "ckpt_sha256": m.sha256})
        else:
            check_readable(ws, t.path_of(cp), sha256=cp.sha256, size=cp.size, task=t.name)
            contents = open_contents(t.local_path(cp), key)
        with _writing_progress() as progress:
            res = export(
                contents,
                out_path,
                dtype=dtype,
                max_shard_size=limit,
                unsafe=unsafe_load,
                metadata=meta,
                progress=progress,
            )
    if json:
        print_json(
            {
                "task": t.name,
                "number": cp.number,
                "model": model,
                "out": str(res.out) if as_model is None else None,
                "as_model": as_model,
                "files": res.files,
                "format": res.format,
                "key": res.key,
                "tensors": res.tensors,
                "parameters": res.parameters,
                "bytes": res.bytes,
                "dtype": res.dtype,
                "converted": res.converted,
            }
        )
        return
    if contents.unsafe_globals:
        err(f"warning: read without running the pickle, which names {', '.join(contents.unsafe_globals)}")
    under = f" (from '{res.key}')" if res.key else ""
    conv = f", {res.converted} converted to {res.dtype}" if res.converted else ""
    where = f"model '{as_model}'" if as_model is not None else str(res.out)
    out(
        f"exported {t.name} checkpoint {cp.number}: {plural(res.tensors, 'tensor')}{under},"
        f" {res.parameters:,} parameters{conv} -> {where}"
        f" ({human_size(res.bytes)} in {plural(len(res.files), 'file')})"
    )
