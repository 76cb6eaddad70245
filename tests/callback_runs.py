"""Tiny real training runs with ckpt's callbacks, for tests/test_callbacks.py, each in its own process:

    python tests/callback_runs.py lightning WS     # a fit that crashes in epoch 2, then a restart that resumes
    python tests/callback_runs.py trainer WS OUT    # a Trainer run, checkpoints taken into the task

CPU only, a few steps, nothing downloaded. Each writes WS/../<kind>.json: what the library reported at each
save, the truth the tests check the workspace against.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def lightning(ws: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt.integrations.lightning import CkptCallback

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Crash(Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    seen: list[dict[str, Any]] = []

    class Recorder(Callback):
        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking:
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
                seen.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    policy = {"keep_last": 2, "keep_best": 1, "metric": "val_loss"}

    def fit(extra: list[Any], resume: str | None) -> CkptCallback:
        cb = CkptCallback(ws, task="tiny", monitor="val_loss", policy=policy)
        trainer = L.Trainer(
            max_epochs=4,
            callbacks=[Recorder(), cb, *extra],  # the recorder first: it sees the metrics the callback saves
            enable_checkpointing=False,
            logger=False,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(Tiny(), data, data, ckpt_path=resume)
        return cb

    try:
        fit([Crash()], None)
        raise AssertionError("the first fit should have crashed")
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    resume = CkptCallback.resume_path(ws, "tiny")
    assert resume is not None and resume.endswith(".ckpt")
    fit([], resume)
    # every 3 steps instead of at validation ends: 8 steps in 2 epochs save at steps 3 and 6, and 8 at the end
    steps = CkptCallback(ws, task="by-steps", every_n_steps=3)
    L.Trainer(
        max_epochs=2,
        callbacks=[steps],
        enable_checkpointing=False,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(Tiny(), data)
    Path(ws).with_name("lightning.json").write_text(json.dumps({"seen": seen, "resumed_from": resume}))


def trainer(ws: str, out: str) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ckpt.integrations.transformers import CkptCallback

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self, n: int, seed: int) -> None:
            self.x = torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(seed))
            self.y = (self.x[:, 0] > 15).long()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": self.x[i], "labels": self.y[i]}

    def score(pred: Any) -> dict[str, float]:
        return {"score": float(abs(pred.predictions[:, 1] - pred.predictions[:, 0]).mean())}

    def args(max_steps: int) -> Any:
        return TrainingArguments(
            output_dir=out,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            max_steps=max_steps,
            learning_rate=0.01,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            logging_steps=1,
            metric_for_best_model="score",  # logged as eval_score; its direction only greater_is_better tells
            greater_is_better=False,
            load_best_model_at_end=True,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )

    def run(max_steps: int, resume: str | None) -> Any:
        t = Trainer(
            model=BertForSequenceClassification(config),
            args=args(max_steps),
            train_dataset=Tokens(32, 1),
            eval_dataset=Tokens(16, 2),
            compute_metrics=score,
            callbacks=[CkptCallback(ws, task="bert", policy={"keep_last": 1, "keep_best": 1, "metric": "eval_score"})],
        )
        t.train(resume_from_checkpoint=resume)
        return t

    first = run(8, None)
    last = get_last_checkpoint(out)  # through the link the callback left: the task's latest
    Path(out).with_name("trainer.json").write_text(
        json.dumps({"log_history": first.state.log_history, "last": last, "best": first.state.best_model_checkpoint})
    )


if __name__ == "__main__":
    os.environ["HF_HUB_OFFLINE"] = "1"
    kind = sys.argv[1]
    if kind == "lightning":
        lightning(sys.argv[2])
    else:
        trainer(sys.argv[2], sys.argv[3])
