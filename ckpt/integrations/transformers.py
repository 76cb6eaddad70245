"""A Hugging Face `TrainerCallback` that takes each `checkpoint-N/` the Trainer saves into a ckpt task.

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      callbacks=[CkptCallback("runs", task="bert", policy={"keep_last": 2, "keep_best": 1,
                                                                            "metric": "eval_loss"})])
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir))

After each save, the folder is moved into the task (a rename: no bytes copied, none left behind) with the
metrics of the log history at its step, the direction of `metric_for_best_model` recorded, and a symbolic link
left under its name in the output folder, so that the Trainer still finds it (`resume_from_checkpoint`,
`load_best_model_at_end`). The task's retention policy then runs in the background (ckpt.policy): a
checkpoint it trashes moves to ckpt's trash (restorable; emptying frees its bytes) and its link in the output
folder dangles, which the Trainer skips. The latest and the Trainer's best are never trashed by that run.
`save_total_limit` is not needed (rotation skips the links) and is not mapped to a policy: with it and no policy
(given, the task's or the workspace's), train start warns that ckpt keeps every checkpoint. At the end of
training the task is finished.

In a bucket workspace (`s3://`), each folder is uploaded and stays where it is, and the folders taken in
earlier are deleted, but for the latest and the Trainer's best (as `save_total_limit=1` would).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..importer import import_path
from ..task_base import Task
from ..workspace_base import Workspace
from .common import refuse_unless_running

_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")


class CkptCallback(TrainerCallback):  # type: ignore[misc]
    """Take each `checkpoint-N/` into ckpt task `task` (default: the output folder's name) of `workspace` (a
    folder or URL, made if missing, or a Workspace), apply `policy` (ckpt.policy; default: the task's own,
    else the workspace's), and finish the task at train end."""

    def __init__(self, workspace: str | os.PathLike[str] | Workspace, task: str | None = None, policy: Any = None):
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace.init(workspace)
        self.task_name = task
        self.policy = policy
        self.task: Task | None = None
        self.taken: dict[int, int] = {}  # step -> checkpoint number

    def _task(self, args: Any) -> Task:
        if self.task is None:
            name = self.task_name or Path(args.output_dir).resolve().name
            modes = {}
            metric = getattr(args, "metric_for_best_model", None)
            if metric:  # logged with the eval_ prefix; recorded before the policy, which may rank by it
                name_logged = metric if metric.startswith("eval_") else f"eval_{metric}"
                modes[name_logged] = "max" if getattr(args, "greater_is_better", None) else "min"
            task = self.ws.create_task(name, exist_ok=True, metric_modes=modes, policy=self.policy)
            refuse_unless_running(task)  # at train start: before an epoch is trained and a folder left behind
            self.task = task
            self.task_name = name
        return self.task

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            task = self._task(args)  # a policy that cannot be set fails here, before any training
            limit = getattr(args, "save_total_limit", None)
            if limit:
                from ..policy import effective

                if effective(self.ws, task.name).rules is None:
                    warnings.warn(
                        f"ckpt: save_total_limit={limit} does not apply to the checkpoints taken into task "
                        f"'{task.name}': ckpt keeps every one of them unless a retention policy is given "
                        f'(CkptCallback(..., policy={{"keep_last": {limit}}}) or: ckpt policy set {task.name} '
                        f"--keep-last {limit})",
                        UserWarning,
                        stacklevel=2,
                    )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        task = self._task(args)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_symlink() or not folder.is_dir():
            return
        remote = self.ws.remote
        res = import_path(self.ws, folder, task=task.name, fmt="huggingface", mode="copy" if remote else "move")
        numbers = [r.number for r in res.rows if r.number is not None and r.action in ("added", "already")]
        if not numbers:
            return
        number = numbers[-1]
        self.taken[state.global_step] = number
        if not remote:
            cp = task.checkpoint(number)
            # the Trainer finds it where it left it: a link to the task's folder, never a copy
            os.symlink(os.path.abspath(task.path_of(cp)), folder, target_is_directory=True)
        else:
            self._drop_local_copies(args, state)
        best = self._best_number(state)
        from ..policy import after_save

        after_save(task, number, keep=[best] if best is not None else [])

    def _best_number(self, state: Any) -> int | None:
        best = getattr(state, "best_model_checkpoint", None)
        m = _CHECKPOINT.search(os.path.basename(str(best))) if best else None
        return self.taken.get(int(m.group(1))) if m else None

    def _drop_local_copies(self, args: Any, state: Any) -> None:
        """In a bucket: delete the uploaded folders but for the latest and the best (the Trainer resumes from
        and loads those)."""
        best = getattr(state, "best_model_checkpoint", None)
        keep = {f"checkpoint-{state.global_step}", os.path.basename(str(best)) if best else ""}
        for step in self.taken:
            name = f"checkpoint-{step}"
            if name not in keep:
                with contextlib.suppress(OSError):
                    shutil.rmtree(Path(args.output_dir) / name)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.task is not None:
            self.task.finish()
