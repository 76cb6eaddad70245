"""Write a small workspace through the library: a tiny classifier trained for 8 epochs, a checkpoint per epoch.

    python examples/quickstart.py runs        # then: ckpt -w runs list spirals

Everything is made in code (two interleaved spirals), so it needs no download and runs in seconds.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

import ckpt


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=generator) * 2 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (2 * math.pi)
    return x + 0.02 * torch.randn(x.shape, generator=generator), label


def mlp(hidden: int = 64) -> nn.Module:
    """The network: importable, so a manifest can name it as 'examples.quickstart:mlp'."""
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def train(workspace: str, task_name: str = "spirals", epochs: int = 8, seed: int = 0) -> ckpt.Task:
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    g = torch.Generator().manual_seed(seed)
    x, y = spirals(2048, g)
    vx, vy = spirals(512, g)
    ws = ckpt.Workspace.init(workspace)
    task = ws.create_task(task_name, arch="examples.quickstart:mlp", arch_kwargs={"hidden": 64})
    model = mlp(64)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = 0
    for epoch in range(1, epochs + 1):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            val_loss = nn.functional.cross_entropy(model(vx), vy).item()
            val_acc = (model(vx).argmax(1) == vy).float().mean().item()
        n = task.save(
            model.state_dict(),
            step=step,
            epoch=epoch,
            metrics={"train_loss": round(loss.item(), 4), "val_loss": round(val_loss, 4), "val_acc": round(val_acc, 4)},
        )
        print(f"epoch {epoch}: checkpoint {n}, val_acc {val_acc:.3f}", file=sys.stderr)
    model_made = task.finish()
    if model_made is not None:
        print(f"finished; latest checkpoint promoted as model '{model_made.title}'", file=sys.stderr)
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", default="runs")
    parser.add_argument("--task", default="spirals")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="another seed: another run to compare")
    args = parser.parse_args()
    train(args.workspace, args.task, args.epochs, args.seed)


if __name__ == "__main__":
    main()
