"""SwinIR (Liang et al., 2021, "SwinIR: Image Restoration Using Swin Transformer") for super-resolution.

The module tree reproduces the state-dict layout of the official checkpoints (``{'params': state_dict}``), e.g.::

    conv_first.{weight,bias}
    patch_embed.norm.{weight,bias}
    layers.<i>.residual_group.blocks.<j>.norm1 / norm2.{weight,bias}
    layers.<i>.residual_group.blocks.<j>.attn.relative_position_bias_table   ((2w-1)^2, heads)
    layers.<i>.residual_group.blocks.<j>.attn.relative_position_index        buffer (w^2, w^2), int64
    layers.<i>.residual_group.blocks.<j>.attn.qkv / proj.{weight,bias}
    layers.<i>.residual_group.blocks.<j>.mlp.fc1 / fc2.{weight,bias}
    layers.<i>.residual_group.blocks.<odd j>.attn_mask                       buffer (nW(img_size), w^2, w^2)
    layers.<i>.conv.*, norm.*, conv_after_body.*, then the upsampler (conv_before_upsample.0, upsample.<k>, conv_last)

Inside the transformer body features are kept channels-last, (B, H, W, C); the official code uses (B, H*W, C)
tokens, which is the same memory order.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.archs.edsr_arch import DIV2K_RGB_MEAN, pixel_shuffle_upsampler
from condiquant.archs.ops import MatMul
from condiquant.archs.registry import register_arch

# Additive mask value between tokens of different regions of a shifted window. The official models were trained
# with -100 (not -inf); exp(-100) is not exactly 0, so the value is kept for identical outputs.
_MASK_VALUE = -100.0

# Width of the features fed to the classical ('pixelshuffle') upsampler; fixed in the official architecture.
_UPSAMPLE_FEAT = 64

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "")


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window_size^2, C); windows in row-major order, tokens row-major inside each."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c).transpose(2, 3)
    return x.reshape(-1, window_size * window_size, c)


def window_merge(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window_size^2, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) int64 index into the bias table, N = window_size^2.

    Entry [i, j] encodes the offset of token i relative to token j, (dy, dx) in [-(w-1), w-1]^2, as
    (dy + w - 1) * (2w - 1) + (dx + w - 1).
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def shifted_window_mask(h: int, w: int, window_size: int, shift: int) -> torch.Tensor:
    """(nW, N, N) float32 additive mask for shifted-window attention on an h x w feature map.

    After the cyclic shift by -shift, windows on the bottom/right border hold pixels that were not neighbours in the
    image. Each axis splits into three bands (before the last window, the last window minus the wrapped strip, the
    wrapped strip); tokens may attend to each other only if they lie in the same band pair.
    """

    def bands(n: int) -> torch.Tensor:
        idx = torch.arange(n)
        return (idx >= n - window_size).long() + (idx >= n - shift).long()

    region = (bands(h)[:, None] * 3 + bands(w)[None, :]).to(torch.float32)
    region = window_partition(region[None, :, :, None], window_size).squeeze(-1)  # (nW, N)
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, dtype=torch.float32).masked_fill(different, _MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (B * nW, N, C) windows with a learned relative position bias.

    Both attention matrix products run through :class:`MatMul` modules so quantizers can see their inputs:
    ``qk_matmul(q * scale, k^T)`` and ``av_matmul(softmax(...), v)``.
    """

    def __init__(
        self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Official init; it only matters for models run without loaded weights, e.g. in tests.
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent: the official checkpoints carry this buffer, so strict loading needs it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qk_matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.av_matmul = MatMul()
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> torch.Tensor:
        """(num_heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * nW, N, C); mask: additive (nW, N, N) or None. Returns (B * nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x)
        # Channel layout of qkv is [q | k | v], each split into heads: (3, B*nW, heads, N, head_dim).
        q, k, v = qkv.reshape(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(bw // num_windows, num_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = self.softmax(attn)

        out = self.av_matmul(attn, v)  # (B*nW, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual, on (B, H, W, C) features.

    ``img_size`` is the training patch size: for shifted blocks the checkpoint stores the mask for it as the
    ``attn_mask`` buffer, which is used when the (padded) input has exactly that size; any other size gets its mask
    computed on the fly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        img_size: Tuple[int, int],
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.img_size = img_size

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Unshifted blocks have no mask and, like the checkpoints, no attn_mask entry.
        if shift_size > 0:
            self.register_buffer("attn_mask", shifted_window_mask(*img_size, window_size, shift_size))

    def _mask(self, h: int, w: int) -> Optional[torch.Tensor]:
        if self.shift_size == 0:
            return None
        if (h, w) == self.img_size:
            return self.attn_mask
        return shifted_window_mask(h, w, self.window_size, self.shift_size).to(self.attn_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); H and W must be multiples of the window size."""
        _, h, w, _ = x.shape
        s = self.shift_size
        y = self.norm1(x)
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, self.window_size), self._mask(h, w))
        y = window_merge(y, self.window_size, h, w)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    """A stack of Swin blocks alternating unshifted / half-window-shifted attention."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        img_size: Tuple[int, int],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                img_size,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> contiguous (B, C, H, W).

    Contiguous on purpose: a channels-last view makes PyTorch pick a different conv kernel, whose different
    summation order breaks bit-for-bit agreement with the official model at batch size 1 (the official view has
    a batch stride that makes PyTorch treat it as NCHW; for larger batches the two differ by rounding only).
    """
    return x.permute(0, 3, 1, 2).contiguous()


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """Conv closing a residual branch: one 3x3 conv ('1conv') or the bottlenecked 3x3-1x1-3x3 stack ('3conv')."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: ``x + conv(residual_group(x))`` on (B, H, W, C) features."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        img_size: Tuple[int, int],
        resi_connection: str,
    ) -> None:
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, num_heads, window_size, mlp_ratio, qkv_bias, qk_scale, img_size)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual_group(x)
        y = self.conv(to_nchw(y)).permute(0, 2, 3, 1)
        return x + y


class PatchEmbed(nn.Module):
    """LayerNorm applied to the shallow features when they enter the transformer (patch size 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


@register_arch
class SwinIR(nn.Module):
    """SwinIR super-resolution network; input and output images are in [0, 1].

    Inputs of any size are reflect-padded at the bottom/right to a multiple of ``window_size`` and the output is
    cropped back to ``(H * upscale, W * upscale)``.

    Args:
        img_size: training patch size (int or (H, W)); only determines the stored ``attn_mask`` buffers.
        in_chans: image channels (input and output).
        embed_dim: transformer width (60 for SwinIR-S, 180 for SwinIR-M).
        depths: number of Swin blocks in each RSTB.
        num_heads: attention heads in each RSTB.
        window_size: attention window side.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: whether the qkv projection has a bias.
        qk_scale: attention scale; ``None`` means head_dim ** -0.5.
        upscale: scale factor; must be 1 for ``upsampler=''``.
        img_range: the network works on ``(x - mean) * img_range``; 1.0 for the official SR weights.
        upsampler: 'pixelshuffle' (classical SR), 'pixelshuffledirect' (lightweight SR) or '' (no upsampling,
            image-residual output as used for denoising). The official 'nearest+conv' is not supported.
        resi_connection: '1conv' or '3conv', the conv closing each residual branch.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 64,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        # The official code silently shrinks the window when img_size <= window_size, which changes parameter shapes;
        # no released checkpoint does this, so it is rejected instead of reproduced.
        if min(size) <= window_size or size[0] % window_size or size[1] % window_size:
            raise ValueError(f"img_size {size} must be a multiple of, and larger than, window_size {window_size}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler == "" and upscale != 1:
            raise ValueError(f"upsampler '' does not upsample, so upscale must be 1, got {upscale}")

        self.img_size = size
        self.window_size = window_size
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        mean = torch.tensor(DIV2K_RGB_MEAN) if in_chans == 3 else torch.zeros(1)
        # Not persistent: the checkpoints do not store the mean, so it must stay out of the state dict.
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, depth, heads, window_size, mlp_ratio, qkv_bias, qk_scale, size, resi_connection)
            for depth, heads in zip(depths, num_heads)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, _UPSAMPLE_FEAT, 3, 1, 1), nn.LeakyReLU()  # default slope 0.01, as trained
            )
            self.upsample = pixel_shuffle_upsampler(upscale, _UPSAMPLE_FEAT)
            self.conv_last = nn.Conv2d(_UPSAMPLE_FEAT, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            # One conv straight to the output pixels, then a single PixelShuffle: the lightweight variant.
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, upscale * upscale * in_chans, 3, 1, 1), nn.PixelShuffle(upscale)
            )
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)

    def pad_to_window(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad bottom/right so H and W are multiples of the window size."""
        h, w = x.shape[-2:]
        pad_h = -h % self.window_size
        pad_w = -w % self.window_size
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep feature extraction: (B, C, H, W) -> (B, C, H, W)."""
        x = self.patch_embed(x.permute(0, 2, 3, 1))
        for layer in self.layers:
            x = layer(x)
        return to_nchw(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, H * upscale, W * upscale)."""
        h, w = x.shape[-2:]
        x = (self.pad_to_window(x) - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + self.mean
        return out[:, :, : h * self.upscale, : w * self.upscale]
