"""`ckpt export --as-model TITLE`: a checkpoint's weights exported to safetensors and kept as a model.

The model's weights are the exported `model.safetensors` (its own sha256 and size in `model.toml`), and
`model.toml` names the checkpoint it was exported from (`task`, `checkpoint`, and an `exported_from`
table with the checkpoint's sha256, its format, the state dict and the dtype). Like a promoted model, it
keeps its checkpoint from `trash-unused`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import hashing
from .errors import ConflictError
from .export import ExportResult, Progress, export
from .manifest import dumps
from .models import Model
from .names import case_twin, check_title
from .readcheck import check_readable
from .sources import open_contents
from .tensor_streams import Contents
from .timeutil import now_iso

if TYPE_CHECKING:
    from .workspace_base import Workspace

WEIGHTS = "model.safetensors"


def export_model(
    ws: Workspace,
    task_name: str,
    number: int,
    title: str,
    *,
    key: str | None = None,
    dtype: str | None = None,
    unsafe: bool = False,
    progress: Progress | None = None,
) -> tuple[Model, ExportResult, Contents]:
    """Export checkpoint `number` of `task_name` as model `title`, on a folder or bucket workspace.

    Raises as `ckpt.export.export` does, ConflictError when the title is taken, and CheckpointNotFound when
    the checkpoint goes to the trash while it is exported (then nothing is made).
    """
    check_title(title)
    twin = case_twin(title, ws.models.titles())
    if twin is not None or title in ws.models.titles():
        raise ConflictError(f"model '{twin or title}' already exists", hint="choose another title, or see: ckpt models")
    t = ws.task(task_name)
    cp = t.checkpoint(number)
    check_readable(ws, t.path_of(cp), sha256=cp.sha256, size=cp.size, task=t.name)
    contents = open_contents(t.local_path(cp), key)
    with ws.model_staging(title) as tmp:
        meta = {"ckpt_task": t.name, "ckpt_checkpoint": str(cp.number), "ckpt_sha256": cp.sha256}
        res = export(contents, tmp / WEIGHTS, dtype=dtype, unsafe=unsafe, metadata=meta, progress=progress)
        model = Model(
            title=title,
            task=t.name,
            checkpoint=cp.number,
            file=WEIGHTS,
            sha256=hashing.sha256_file(tmp / WEIGHTS),
            size=(tmp / WEIGHTS).stat().st_size,
            created=now_iso(),
            storage="copy",
            step=cp.step,
            epoch=cp.epoch,
            metrics=dict(cp.metrics),
            folder=ws.model_folder(title),
        )
        doc: dict[str, Any] = model.to_doc()
        doc["exported_from"] = {
            "sha256": cp.sha256,
            "format": contents.format,
            "key": contents.key,
            "dtype": dtype,
            "tensors": res.tensors,
        }
        # as promote: made whole or not at all, while the checkpoint is still in its task (a trash-unused
        # running now sees the model, or has already taken the checkpoint: then no model is made)
        ws.add_model(t.name, number, title, tmp, dumps(doc))
    return model, res, contents
