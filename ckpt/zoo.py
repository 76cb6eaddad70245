"""Networks that ship with ckpt. Importing this module imports torch; `import ckpt` never does.

`ckpt.zoo:UNet` is the architecture entry a task manifest names for the UNet below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small UNet for semantic segmentation that trains on a CPU.

    `in_channels` image channels in, `classes` logits out per pixel (N, classes, H, W). `width` is the
    channel count of the first level, doubled at each of the `depth` downsamplings. Inputs of any size
    work: they are padded to a multiple of `input_multiple` (2**depth) and the output is cropped back.
    """

    def __init__(self, in_channels: int = 3, classes: int = 2, width: int = 16, depth: int = 3):
        super().__init__()
        for name, value, least in (("in_channels", in_channels, 1), ("classes", classes, 1), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"UNet: {name} must be an integer >= {least}, got {value!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 6:
            raise ValueError(f"UNet: depth must be an integer from 0 to 6, got {depth!r}")
        self.in_channels, self.classes, self.width, self.depth = in_channels, classes, width, depth
        self.input_multiple = 2**depth
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, chans[0])])
        self.down.extend(_block(chans[i - 1], chans[i]) for i in range(1, depth + 1))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2) for i in range(depth, 0, -1)
        )
        self.up = nn.ModuleList(_block(2 * chans[i - 1], chans[i - 1]) for i in range(depth, 0, -1))
        self.head = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.input_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for upsample, block in zip(self.upsample, self.up, strict=True):
            x = block(torch.cat([upsample(x), skips.pop()], dim=1))
        x = self.head(x)
        return x[..., :h, :w] if ph or pw else x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, classes={self.classes}, width={self.width}, depth={self.depth}"
