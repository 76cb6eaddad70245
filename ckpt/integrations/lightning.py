"""A Lightning callback that saves into a ckpt task: `CkptCallback(workspace, task, monitor=..., policy=...)`.

    trainer = L.Trainer(callbacks=[CkptCallback("runs", task="unet", monitor="val_loss")],
                        enable_checkpointing=False)
    trainer.fit(model, ckpt_path=CkptCallback.resume_path("runs", "unet"))

At each validation end (or every `every_n_steps` training steps) it writes a full Lightning checkpoint
(`trainer.save_checkpoint`: weights, optimizers, loops; what `ckpt_path=` resumes from) into the task with the
logged metrics, the step and the epoch; the task's retention policy then runs in the background (ckpt.policy).
At the end of `fit` it finishes the task (the latest checkpoint becomes a model). On an exception the task
stays running, so that a restart with the same task name saves on into it.

It replaces Lightning's ModelCheckpoint (pass `enable_checkpointing=False`); beside one it works too, but
each checkpoint is then written twice.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover (the older package name)
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]

from ..metrics import MODES, mode_from_name
from ..task_base import Task
from ..workspace_base import Workspace
from .common import refuse_unless_running


def _open(workspace: str | os.PathLike[str] | Workspace) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace.init(workspace)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The logged values that are one number each, as floats (tensors with one element included)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            if hasattr(v, "numel") and v.numel() != 1:
                continue
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isinf(f):
            out[str(k)] = f
    return out


class CkptCallback(Callback):  # type: ignore[misc]
    """Save each validation end (or every `every_n_steps` steps) into ckpt task `task`.

    `workspace`: a folder or URL (made if missing) or a Workspace. `task`: the task's name (default: the
    LightningModule's class name); keep it stable so that a restart saves on into the same task.
    `monitor`/`mode`: the metric a policy's keep-best ranks by, and its direction (recorded in the task;
    `mode` defaults to what the metric's name says, else "min" as ModelCheckpoint's). `policy`: the task's
    retention policy (ckpt.policy; default: the one it has, else the workspace's).
    """

    def __init__(
        self,
        workspace: str | os.PathLike[str] | Workspace,
        task: str | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        policy: Any = None,
        every_n_steps: int | None = None,
    ):
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ValueError(f'mode must be "min" or "max", not {mode!r}')
        self.ws = _open(workspace)
        self.task_name = task
        self.monitor = monitor
        self.mode = mode
        self.policy = policy
        self.every_n_steps = every_n_steps
        self.task: Task | None = None
        self.saved: list[int] = []  # the numbers this callback saved, in order

    @staticmethod
    def resume_path(workspace: str | os.PathLike[str] | Workspace, task: str) -> str | None:
        """The latest checkpoint of `task` to pass as `ckpt_path=` (None when there is none: start afresh).

        Raises IntegrityError when its file is missing or its size is not the one recorded (ckpt.resume)."""
        from ..errors import TaskNotFound
        from ..resume import resume_path

        ws = _open(workspace)
        try:
            t = ws.task(task)
        except TaskNotFound:
            return None
        cp = t.latest()
        return str(resume_path(t, cp)) if cp is not None else None

    def _task(self, pl_module: Any) -> Task:
        if self.task is None:
            name = self.task_name or type(pl_module).__name__
            modes = {}
            if self.monitor:
                modes[self.monitor] = self.mode or mode_from_name(self.monitor) or "min"
            task = self.ws.create_task(name, exist_ok=True, metric_modes=modes, policy=self.policy)
            refuse_unless_running(task)
            self.task = task
            self.task_name = name
            missing = {k: v for k, v in modes.items() if k not in self.task.header.metric_modes}
            if missing:  # an existing task learns the monitor's direction
                self.task.note_import(missing, None)
        return self.task

    def _save(self, trainer: Any, pl_module: Any, epoch: int | None = None) -> None:
        self._last_step = int(trainer.global_step)
        epoch = int(trainer.current_epoch) if epoch is None else epoch
        task = self._task(pl_module)
        folder = Path(tempfile.mkdtemp(prefix="ckpt-lightning-"))
        try:
            path = folder / f"epoch={epoch}-step={trainer.global_step}.ckpt"
            trainer.save_checkpoint(str(path))  # every rank calls it; rank 0 writes
            if trainer.is_global_zero:
                number = task.save_file(
                    path,
                    step=int(trainer.global_step),
                    epoch=epoch,
                    metrics=_scalars(dict(trainer.callback_metrics)),
                )
                self.saved.append(number)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._task(pl_module)  # a policy that cannot be set fails here, before any training

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.every_n_steps:
            return
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_epoch = int(trainer.current_epoch)  # at fit end the counter has moved past the last epoch
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_steps and getattr(self, "_last_step", -1) != int(trainer.global_step):
            # the final weights: the model `finish` makes is the fit's last state
            self._save(trainer, pl_module, getattr(self, "_batch_epoch", None))
        if trainer.is_global_zero and self.task is not None:
            self.task.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.task is not None:
            self.task.wait()  # the task stays running: a restart saves on into it
