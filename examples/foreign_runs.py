"""Write run folders shaped as PyTorch Lightning and the Hugging Face Trainer write them, to try `ckpt import`.

python -m examples.foreign_runs DEST  makes DEST/lightning_logs/version_0/checkpoints/*.ckpt (ModelCheckpoint
with filename "{epoch}-{step}-{val_loss:.3f}", save_top_k=3, save_last=True) and DEST/hf-out/checkpoint-N/
(model.safetensors, optimizer.pt, trainer_state.json, ...). Needs torch, not Lightning or transformers.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch


def lightning_run(dest: Path) -> Path:
    """A Lightning version folder with three top-k checkpoints and last.ckpt (a copy of the newest)."""
    cdir = dest / "lightning_logs" / "version_0" / "checkpoints"
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir.parent / "hparams.yaml").write_text("lr: 0.01\n")
    newest = None
    for epoch, step, val_loss in [(0, 50, 0.512), (1, 100, 0.301), (2, 150, 0.347)]:
        g = torch.Generator().manual_seed(epoch)
        newest = cdir / f"epoch={epoch}-step={step}-val_loss={val_loss:.3f}.ckpt"
        torch.save(
            {
                "epoch": epoch,
                "global_step": step,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.zeros(4)},
                "loops": {},
                "callbacks": {},
                "optimizer_states": [],
                "lr_schedulers": [],
            },
            newest,
        )
    assert newest is not None
    (cdir / "last.ckpt").write_bytes(newest.read_bytes())
    return cdir.parent


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def hf_run(dest: Path) -> Path:
    """A Trainer output_dir with checkpoint-4, -8 and -12 (eval every 4 steps; the best is step 8)."""
    out = dest / "hf-out"
    history: list[dict[str, Any]] = []
    for step, eval_loss in [(4, 0.9), (8, 0.4), (12, 0.6)]:
        history.append({"epoch": step / 8, "grad_norm": 1.1, "learning_rate": 5e-05, "loss": 1.0, "step": step})
        history.append(
            {
                "epoch": step / 8,
                "eval_loss": eval_loss,
                "eval_runtime": 0.12,
                "eval_samples_per_second": 810.0,
                "eval_steps_per_second": 101.0,
                "step": step,
            }
        )
        ck = out / f"checkpoint-{step}"
        ck.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(step)
        (ck / "model.safetensors").write_bytes(_safetensors({"w": torch.randn(8, 8, generator=g)}))
        (ck / "config.json").write_text(json.dumps({"model_type": "tiny"}))
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        state = {
            "best_metric": 0.4 if step >= 8 else 0.9,
            "best_model_checkpoint": str(out / f"checkpoint-{8 if step >= 8 else 4}"),
            "epoch": step / 8,
            "eval_steps": 4,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": list(history),
            "logging_steps": 4,
            "max_steps": 12,
            "num_train_epochs": 2,
            "save_steps": 4,
            "total_flos": 0.0,
            "train_batch_size": 8,
            "trial_name": None,
            "trial_params": None,
        }
        (ck / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "foreign-runs")
    print(lightning_run(target))
    print(hf_run(target))
