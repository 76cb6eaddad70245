"""Tiny real training runs for tests/test_real_runs.py, each run in its own process:

    python tests/real_runs.py lightning DIR    # Lightning fit, ModelCheckpoint(monitor="val_loss") + CSVLogger
    python tests/real_runs.py trainer DIR      # Hugging Face Trainer with metric_for_best_model

CPU only, a few steps, nothing downloaded. Each writes DIR/saved.json: what the library itself reported
at every save, the truth that the import is checked against.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def lightning(root: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

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
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("val_loss", loss)
            self.log("val_acc", 1.0 / (1.0 + loss))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    saved: list[dict[str, Any]] = []

    class Recorder(Callback):
        def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: Any) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            saved.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    by_loss = ModelCheckpoint(monitor="val_loss", save_top_k=-1)  # the default name: epoch=0-step=4.ckpt
    by_acc = ModelCheckpoint(
        monitor="val_acc", mode="max", dirpath=root / "best_acc", filename="{epoch}-{val_acc:.2f}", save_top_k=1
    )
    trainer = L.Trainer(
        max_epochs=3,
        default_root_dir=root,
        logger=CSVLogger(root),  # <root>/lightning_logs/version_0/metrics.csv
        callbacks=[by_loss, by_acc, Recorder()],
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), data, data)
    (root / "saved.json").write_text(json.dumps(saved))


def trainer(out: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

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
        # a metric whose name says nothing of its direction: only greater_is_better can tell
        return {"score": float(abs(pred.predictions[:, 1] - pred.predictions[:, 0]).mean())}

    args = TrainingArguments(
        output_dir=str(out),
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        max_steps=6,
        learning_rate=0.01,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        logging_steps=1,
        metric_for_best_model="score",  # logged as eval_score
        greater_is_better=False,
        load_best_model_at_end=True,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    run = Trainer(
        model=BertForSequenceClassification(config),
        args=args,
        train_dataset=Tokens(32, 1),
        eval_dataset=Tokens(16, 2),
        compute_metrics=score,
    )
    run.train()
    (out / "saved.json").write_text(json.dumps(run.state.log_history))


if __name__ == "__main__":
    os.environ["HF_HUB_OFFLINE"] = "1"
    kind, where = sys.argv[1], Path(sys.argv[2])
    {"lightning": lightning, "trainer": trainer}[kind](where)
