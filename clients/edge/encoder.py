"""The splittable audio encoder and the codec channel its activations cross.

``SplitEncoder`` is a small residual CNN on log-mel input ``[B, 1, n_mels, frames]``:

    stem   per-window standardisation, conv 5×5 stride 2 → GroupNorm → ReLU → max-pool 2
    blocks L residual BasicBlocks (two 3×3 convs with GroupNorm, identity or 1×1 shortcut),
           default channels 16,16,32,32,64,64 and strides 1,2,1,2,1,2 (L = 6)
    head   global average pool → linear to d → L2 normalisation (the embedding lies on S^{d−1})

GroupNorm rather than BatchNorm: it normalises each window on its own, so the
output of one window does not depend on the others in its tiny batch, and the
state dict holds parameters only (every tensor federates as an update).

**Split point k ∈ {0..L}.** ``device_forward(x, k)`` and ``server_forward(h, k)``
compose to ``forward`` for every k:

- k = 0 (server-centric): the device sends its log-mel frames; the server runs everything.
- 1 ≤ k < L: the device runs the stem and blocks 1..k and sends the feature map.
- k = L (edge-only): the device also runs the head and sends the d-dim embedding.

``CodecChannel`` carries a tensor across the split: each window's activation is
encoded by a codec from :mod:`qfl.compression` (one payload per window, as a
stream sends it), the bytes are counted from the payload, and the receiver gets
the decoded tensor. In backward, the gradient travels back down the same way
(its bytes counted as downlink) and reaches the device blocks as the decoded
gradient, a straight-through estimator for the codec's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qfl.compression import Codec, EncodeContext

DEFAULT_CHANNELS = (16, 16, 32, 32, 64, 64)
DEFAULT_STRIDES = (1, 2, 1, 2, 1, 2)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(4, channels), channels)


class BasicBlock(nn.Module):
    """y = ReLU(GN(conv(ReLU(GN(conv(x))))) + shortcut(x)); shortcut is 1×1 conv when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut: nn.Module = (
            nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class Stem(nn.Module):
    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c_out, 5, 2, 2, bias=False)
        self.norm = _norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True) + 1e-5
        return F.max_pool2d(F.relu(self.norm(self.conv((x - mean) / std))), 2)


class Head(nn.Module):
    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.mean(dim=(-2, -1))), dim=-1)


class SplitEncoder(nn.Module):
    """Stem, ``L = len(channels)`` residual blocks and an L2-normalised d-dim head; splittable after any block."""

    def __init__(
        self, channels: Sequence[int] = DEFAULT_CHANNELS, strides: Sequence[int] = DEFAULT_STRIDES,
        dim: int = 128, seed: int = 0,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or len(channels) < 1:
            raise ValueError("channels and strides need the same length >= 1")
        torch.manual_seed(seed)
        self.stem = Stem(channels[0])
        ins = [channels[0], *channels[:-1]]
        self.blocks = nn.ModuleList(BasicBlock(i, o, s) for i, o, s in zip(ins, channels, strides))
        self.head = Head(channels[-1], dim)
        self.dim = dim

    @property
    def depth(self) -> int:
        """L, the number of blocks; split points are 0..L."""
        return len(self.blocks)

    def _check(self, k: int) -> None:
        if not 0 <= k <= self.depth:
            raise ValueError(f"split point k must be in [0, {self.depth}], got {k}")

    def device_forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """What the device computes and sends at split ``k`` (log-mel, a feature map, or the embedding)."""
        self._check(k)
        if k == 0:
            return x
        h = self.stem(x)
        for block in self.blocks[:k]:
            h = block(h)
        return self.head(h) if k == self.depth else h

    def server_forward(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The rest of the encoder, from what arrives at split ``k``, to the embedding."""
        self._check(k)
        if k == self.depth:
            return h
        if k == 0:
            h = self.stem(h)
        for block in self.blocks[k:]:
            h = block(h)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server_forward(self.device_forward(x, 0), 0)

    def device_parameter_names(self, k: int) -> list[str]:
        """State-dict names of the tensors the device runs at split ``k``."""
        self._check(k)
        prefixes = ([] if k == 0 else ["stem."]) + [f"blocks.{i}." for i in range(k)] + (["head."] if k == self.depth else [])
        return [n for n in self.state_dict() if any(n.startswith(p) for p in prefixes)]

    def block_flops(self, input_shape: tuple[int, int]) -> list[float]:
        """Forward FLOPs (2 × multiply-adds of the convolutions and the linear layer) of
        [stem, block 1, ..., block L, head] for one window of ``input_shape`` = (n_mels, frames)."""
        flops: list[float] = []
        hooks = []

        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                flops[-1] += 2.0 * k * output.numel()
            elif isinstance(module, nn.Linear):
                flops[-1] += 2.0 * module.in_features * module.out_features

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(count))
        try:
            with torch.no_grad():
                h = torch.zeros(1, 1, *input_shape)
                for part in [self.stem, *self.blocks, self.head]:
                    flops.append(0.0)
                    h = part(h)
        finally:
            for hook in hooks:
                hook.remove()
        return flops


@dataclass
class Traffic:
    """Bytes that crossed the split: up (device → server) and down (gradients, server → device)."""

    up: int = 0
    down: int = 0
    windows: int = 0
    up_by_k: dict[int, int] = field(default_factory=dict)


def codec_roundtrip(codec: Codec, x: np.ndarray) -> tuple[np.ndarray, int]:
    """(decode(encode(x)), len(payload)) for one tensor; a fresh context, so no residual is carried."""
    payload = codec.encode(np.ascontiguousarray(x, dtype=np.float32), EncodeContext())
    return codec.decode(payload).reshape(x.shape), len(payload)


class _Channel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, codec: Codec, traffic: Traffic, k: int) -> torch.Tensor:
        ctx.codec, ctx.traffic = codec, traffic
        arrays = x.detach().cpu().numpy()
        out = np.empty_like(arrays)
        for i in range(len(arrays)):
            out[i], sent = codec_roundtrip(codec, arrays[i])
            traffic.up += sent
            traffic.up_by_k[k] = traffic.up_by_k.get(k, 0) + sent
        traffic.windows += len(arrays)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        arrays = grad.detach().cpu().numpy()
        out = np.empty_like(arrays)
        for i in range(len(arrays)):
            out[i], sent = codec_roundtrip(ctx.codec, arrays[i])
            ctx.traffic.down += sent
        return torch.from_numpy(out), None, None, None


class CodecChannel:
    """Sends each window's tensor through ``codec`` (bytes counted in ``traffic``); gradients come back the same way."""

    def __init__(self, codec: Codec, traffic: Traffic | None = None) -> None:
        self.codec = codec
        self.traffic = traffic if traffic is not None else Traffic()

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return _Channel.apply(x, self.codec, self.traffic, k)

    def payload_bytes(self, x: torch.Tensor) -> int:
        """Bytes one window's tensor ``x`` (no batch axis) takes through the codec, without sending it."""
        return codec_roundtrip(self.codec, x.detach().cpu().numpy())[1]
