"""EMT: Efficient Mixed Transformer for lightweight image super-resolution.

Re-implementation of Zheng et al., "Efficient Mixed Transformer for Single Image Super-Resolution"
(Fried-Rice-Lab/EMT), written from the paper's equations and the official checkpoint layout.
Parameter names and shapes follow the official ``EMT_LSR_x{2,3,4}.pth`` files, so they load with ``strict=True``.

Structure: mean shift -> 3x3 head -> ``n_blocks`` mixed transformer blocks (long skip) -> conv + pixel shuffle
-> mean shift. Each block has ``n_layers`` (token mixer, MLP) pairs with pre-residuals and no LayerNorm;
the first ``n_GTLs`` token mixers are striped-window self-attention (global token layers), the rest are
parameter-free pixel mixers followed by a BatchNorm (local token layers).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.archs.ops import MatMul
from condiquant.archs.registry import register_arch

# Per-channel RGB mean of DF2K (images 1-3450) on a 0..1 scale; the official LSR models were trained with it.
DF2K_RGB_MEAN: Tuple[float, float, float] = (0.4690, 0.4490, 0.4036)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding ``sign * img_range * mean`` per channel (pre/post-processing, not learned).

    A Conv2d subclass because the checkpoints store it as ``weight``/``bias``; its own type lets quantizers
    recognise and skip it.
    """

    def __init__(self, img_range: float, sign: int, rgb_mean: Sequence[float] = DF2K_RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * img_range * torch.tensor(rgb_mean))
        self.requires_grad_(False)


class ShiftConv1x1(nn.Conv2d):
    """1x1 conv preceded by a fixed spatial shift of five channel groups (right, left, down, up, none).

    The shift is a depthwise 3x3 conv with one-hot kernels stored in the ``mask`` buffer (zero padding, so
    pixels shifted in from outside the image are 0). It gives the MLP a small receptive field at no
    parameter cost. ``weight``/``bias`` are an ordinary 1x1 Conv2d, which is why this subclasses nn.Conv2d:
    weight quantizers find it by type. The shift is exposed as ``transform_input`` (it reads only the ``mask``
    buffer and ``in_channels``), the hook through which quantized replacements keep it.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)
        if in_channels % 5 != 0:
            raise ValueError(f"ShiftConv1x1 needs in_channels divisible by 5, got {in_channels}")
        group = in_channels // 5
        mask = torch.zeros(in_channels, 1, 3, 3)
        # Tap (row, col) of the 3x3 kernel a group reads from: out[y, x] = in[y + row - 1, x + col - 1].
        for g, (row, col) in enumerate(((1, 2), (1, 0), (2, 1), (0, 1))):
            mask[g * group:(g + 1) * group, 0, row, col] = 1.0
        mask[4 * group:, 0, 1, 1] = 1.0  # the remainder (last group) stays in place
        self.register_buffer("mask", mask)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.mask, padding=1, groups=self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.transform_input(x))


class PixelMixer(nn.Module):
    """Parameter-free token mixer: shift channel ``c`` by one pixel in direction ``c % 5`` (circularly).

    Unlike :class:`ShiftConv1x1` the groups are interleaved (every 5th channel) and the border wraps around.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 5 != 0:
            raise ValueError(f"PixelMixer needs dim divisible by 5, got {dim}")
        self.dim = dim
        mask = torch.zeros(dim, 1, 3, 3)
        for phase, (row, col) in enumerate(((1, 2), (1, 0), (2, 1), (0, 1), (1, 1))):
            mask[phase::5, 0, row, col] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="circular")
        return F.conv2d(x, self.mask, groups=self.dim)


class LocalTokenMixer(nn.Module):
    """Local token layer: ``BN(PixelMixer(x) - x)``, a difference of neighbouring pixels (an edge-like signal)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_mixer = PixelMixer(dim)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.token_mixer(x) - x)


class StripedWindowAttention(nn.Module):
    """Striped-window self-attention (SWSA) with a shared query/key projection.

    ``attn`` maps ``dim`` channels to ``2 * dim`` (conv 1x1 + BN). The result is split along channels into one
    slice per window shape in ``window_list``; inside a slice the first half is Q (also used as K) and the
    second half is V, each split into ``num_heads`` heads. Attention is ``softmax(Q Q^T) V`` with no
    ``1/sqrt(d)`` scale, as in the official model. Each branch pads its slice by reflection to a multiple of
    its window, optionally rolls it by ``shift`` (no attention mask is applied across the wrapped border),
    attends inside each window, undoes the roll and crops. Branch outputs (``dim / n_windows`` channels
    each) are concatenated and projected by ``proj`` (conv 1x1).

    Every branch owns its two :class:`MatMul` modules, because the branches see different channels and
    window shapes and so different activation statistics.
    """

    def __init__(self, dim: int, num_heads: int, window_list: Sequence[Sequence[int]],
                 shift_list: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        n_win = len(window_list)
        if dim % (n_win * num_heads) != 0:
            raise ValueError(f"dim={dim} cannot be split into {n_win} windows x {num_heads} heads")
        if shift_list is not None and len(shift_list) != n_win:
            raise ValueError("shift_list must have one entry per window")
        self.num_heads = num_heads
        self.head_dim = dim // (n_win * num_heads)
        self.window_list = [tuple(int(v) for v in w) for w in window_list]
        self.shift_list = ([tuple(int(v) for v in s) for s in shift_list] if shift_list is not None
                           else [(0, 0)] * n_win)
        self.attn = nn.Sequential(nn.Conv2d(dim, 2 * dim, kernel_size=1), nn.BatchNorm2d(2 * dim))
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1))
        self.qk_matmuls = nn.ModuleList(MatMul(gram=True) for _ in range(n_win))
        self.av_matmuls = nn.ModuleList(MatMul() for _ in range(n_win))

    @staticmethod
    def _pad_to_window(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
        """Reflect-pad bottom/right up to a multiple of ``window`` (reflection needs pad < side)."""
        h, w = x.shape[-2:]
        pad_h = -h % window[0]
        pad_w = -w % window[1]
        if pad_h >= h or pad_w >= w:
            raise ValueError(f"EMT: input {h}x{w} too small for window {window[0]}x{window[1]}: reflect padding "
                             f"by ({pad_h}, {pad_w}) must be smaller than the side (official model has the same limit)")
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

    def _window_attention(self, x: torch.Tensor, window: Tuple[int, int], idx: int) -> torch.Tensor:
        """Attention inside non-overlapping ``window`` tiles of ``x`` (B, 2*heads*head_dim, H, W), H/W multiples."""
        b, _, hp, wp = x.shape
        wh, ww = window
        nh, nw = hp // wh, wp // ww
        c = self.head_dim
        # channels are ordered (q/v, head, c); tokens inside a window row-major
        x = x.view(b, 2, self.num_heads, c, nh, wh, nw, ww)
        x = x.permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(2, b * self.num_heads * nh * nw, wh * ww, c)
        q, v = x[0], x[1]
        attn = self.qk_matmuls[idx](q, q.transpose(-2, -1)).softmax(dim=-1)
        out = self.av_matmuls[idx](attn, v)
        out = out.view(b, self.num_heads, nh, nw, wh, ww, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, self.num_heads * c, hp, wp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = self.attn(x)
        slices = torch.chunk(qkv, len(self.window_list), dim=1)
        outs = []
        for idx, (part, window, shift) in enumerate(zip(slices, self.window_list, self.shift_list)):
            part = self._pad_to_window(part, window)
            if shift != (0, 0):
                part = torch.roll(part, shifts=shift, dims=(2, 3))
            out = self._window_attention(part, window, idx)
            if shift != (0, 0):
                out = torch.roll(out, shifts=(-shift[0], -shift[1]), dims=(2, 3))
            outs.append(out[:, :, :h, :w])
        return self.proj(torch.cat(outs, dim=1))


class Swish(nn.SiLU):
    """SiLU written as ``x * sigmoid(x)``, the official formula.

    ``F.silu`` differs from it by an ulp, and EMT's unscaled attention amplifies such differences on
    out-of-distribution inputs (to hundreds of grey levels on white noise); this form is bit-exact with the
    authors' model. Subclassing nn.SiLU keeps it recognisable by type.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Mlp(nn.Module):
    """Channel MLP ``fc2(Swish(fc1(x)))`` built from shifted 1x1 convs."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = ShiftConv1x1(dim, hidden_dim)
        self.act = Swish()
        self.fc2 = ShiftConv1x1(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixedTransformerBlock(nn.Module):
    """``n_layers`` x (token mixer, MLP), each with a residual; no normalisation before the sublayers.

    Token mixers ``0 .. n_GTLs-1`` are SWSA (every odd one shifted), the rest are local pixel mixers.
    """

    def __init__(self, dim: int, n_layers: int, num_heads: int, n_GTLs: int, mlp_ratio: int,
                 window_list: Sequence[Sequence[int]], shift_list: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.sa_list = nn.ModuleList(
            StripedWindowAttention(dim, num_heads, window_list, shift_list if i % 2 == 1 else None)
            if i < n_GTLs else LocalTokenMixer(dim)
            for i in range(n_layers))
        self.mlp_list = nn.ModuleList(Mlp(dim, dim * mlp_ratio) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, mlp in zip(self.sa_list, self.mlp_list):
            x = x + mixer(x)
            x = x + mlp(x)
        return x


@register_arch
class EMT(nn.Module):
    """Efficient Mixed Transformer, lightweight SR variant (official LSR x2/x3/x4 configuration by default).

    Input: RGB tensor (B, 3, H, W) in **0..255** (``input_range``); output (B, 3, H*upscale, W*upscale), same range.
    Any H, W is accepted: the attention pads to its windows internally and crops back (``window_size = 1``),
    except that, as in the official code, reflection padding requires every side to be at least 17 pixels
    with the default 32-pixel stripes. Call ``.eval()`` before inference: the model contains BatchNorms.
    """

    input_range: float = 255.0  # test runner and calibration scale 0..1 images by this
    window_size: int = 1

    def __init__(self, upscale: int = 4, num_in_ch: int = 3, num_out_ch: int = 3, dim: int = 60,
                 n_blocks: int = 6, n_layers: int = 6, num_heads: int = 3, mlp_ratio: int = 2, n_GTLs: int = 2,
                 window_list: Sequence[Sequence[int]] = ((32, 8), (8, 32)),
                 shift_list: Sequence[Sequence[int]] = ((16, 4), (4, 16))) -> None:
        super().__init__()
        self.upscale = upscale
        self.sub_mean = MeanShift(self.input_range, sign=-1)
        self.add_mean = MeanShift(self.input_range, sign=1)
        self.head = nn.Conv2d(num_in_ch, dim, kernel_size=3, padding=1)
        self.body = nn.Sequential(*(
            MixedTransformerBlock(dim, n_layers, num_heads, n_GTLs, mlp_ratio, window_list, shift_list)
            for _ in range(n_blocks)))
        self.tail = nn.Sequential(nn.Conv2d(dim, num_out_ch * upscale ** 2, kernel_size=3, padding=1),
                                  nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(self.sub_mean(x))
        feat = feat + self.body(feat)
        return self.add_mean(self.tail(feat))
