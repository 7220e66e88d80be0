"""The GenDD denoiser: a per-token MLP with adaLN conditioning (the GenDD paper's diffusion head).

Rows are laid out as (…, B, n, k): any leading replica/sample dims, B images, n token positions, k
channels. The conditioning vector of a row is y = time_emb(t) + cond_embed(z_b) + pos_embed(j); each
term is computed at the granularity at which it varies and combined by broadcasting:

- the condition embedding once per image, (B, W); the position embedding once per position, (n, W);
  their sum, the *context*, once per (image, position), (B, n, W);
- the timestep embedding once per distinct t-shape: per row in training, once per step in sampling
  (samplers pass t of shape (1, …, 1));
- the adaLN modulations of y therefore run per (image, position) while sampling, not per sample.

Condition dropout (CFG training) replaces the context of a dropped row by the null context
cond_embed(0) + pos_embed(j) = bias + pos_embed(j): the null condition is the zero vector, as in the
official GenDD code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gendd_framework.errors import ConfigError
from gendd_framework.registry import HEADS


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos(t·f_i), sin(t·f_i)], cos first, f_i = max_period^(−i/(dim/2)).

    The raw (integer) timestep index is used, no rescaling; returns shape t.shape + (dim,).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32).unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def full_precision(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)` in float32 with autocast off; a plain call outside autocast.

    Under bf16/fp16 autocast the head keeps its interface in float32: the token input projection (so
    the residual stream stays float32: each block adds its low-precision update to a float32 h) and
    the output projection. At small t the noise is a ~1% perturbation of x_t that bf16's 8-bit mantissa
    (0.4% steps) would mostly round away, and the predicted ε is what the sampler integrates. Both
    projections are ~1% of the head's multiply-adds; the blocks' matrix products stay low precision."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return fn(*tensors)
    with torch.autocast(device_type=device, enabled=False):
        return fn(*(t.float() for t in tensors))


class TimestepEmbedder(nn.Module):
    """Raw timestep index -> sinusoid(freq_dim) -> Linear -> SiLU -> Linear (width W)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNResBlock(nn.Module):
    """x + gate·MLP(LN(x)·(1+scale)+shift), (shift, scale, gate) = Linear(SiLU(y)); identity at init."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """LN (no affine) with adaLN shift/scale, then a linear map to the output channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(y).chunk(2, dim=-1)
        return full_precision(self.linear, self.norm(h) * (1 + scale) + shift)


HeadModelFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


@HEADS.register("mlp_adaln")
class MLPAdaLNHead(nn.Module):
    """Per-token MLP denoiser with adaLN blocks, conditioned on student feature + token position (GenDD).

    Args:
        token_dim: k, channels of one token (the tokenizer's token_dim).
        cond_dim: D_s, dimension of the condition z (the LayerNormed student feature).
        num_positions: n, number of token positions (the tokenizer's num_tokens).
        width: hidden width W (official 1024). depth: number of adaLN ResBlocks (official 3).
        learn_sigma: output 2k channels (ε and variance interpolation) instead of k.
        grad_checkpointing: recompute each block in backward to save activation memory.
        freq_dim: size of the sinusoidal timestep features (official 256).
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        num_positions: int = 1,
        width: int = 1024,
        depth: int = 3,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (
            ("token_dim", token_dim),
            ("cond_dim", cond_dim),
            ("num_positions", num_positions),
            ("width", width),
            ("freq_dim", freq_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"head mlp_adaln: {name} must be a positive integer, got {value!r}")
        if not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"head mlp_adaln: depth must be a non-negative integer, got {depth!r}")
        self.token_dim, self.cond_dim, self.num_positions = token_dim, cond_dim, num_positions
        self.width, self.learn_sigma, self.grad_checkpointing = width, bool(learn_sigma), grad_checkpointing
        self.out_channels = 2 * token_dim if learn_sigma else token_dim

        self.time_embed = TimestepEmbedder(width, freq_dim)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.pos_embed = nn.Embedding(num_positions, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = FinalLayer(width, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears with zero bias, N(0, 0.02) time MLP, zero adaLN and output: the head outputs 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [b.modulation[-1] for b in self.blocks] + [self.final.modulation[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # pos_embed keeps nn.Embedding's N(0, 1) init, as in the reference.

    # -- embeddings, each at its own granularity ------------------------------------------------
    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """cond_embed(z): (B, cond_dim) -> (B, W), once per image."""
        if cond.dim() != 2 or cond.shape[-1] != self.cond_dim:
            raise ConfigError(f"condition must have shape (B, {self.cond_dim}), got {tuple(cond.shape)}")
        return self.cond_embed(cond)

    def position_embedding(self) -> torch.Tensor:
        """pos_embed of every position: (n, W)."""
        return self.pos_embed.weight

    def embed_context(self, cond: torch.Tensor) -> torch.Tensor:
        """cond_embed(z) + pos_embed: (B, cond_dim) -> (B, n, W); cache it across sampling steps."""
        return self.embed_condition(cond)[:, None, :] + self.position_embedding()[None, :, :]

    def null_context(self) -> torch.Tensor:
        """Context of the null (zero-vector) condition: cond_embed(0) + pos_embed = bias + pos, (n, W)."""
        return self.cond_embed.bias[None, :] + self.position_embedding()

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        context: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (…, B, n, out_channels) from x_t (…, B, n, k) and original timesteps t.

        t broadcasts against x.shape[:-1] (full (…, B, n) in training, (1, …, 1) in sampling). Give
        either `cond` (B, cond_dim) or the cached `context = embed_context(cond)` (B, n, W).
        `drop` (bool, broadcastable to x.shape[:-1]) marks rows that see the null condition instead.
        """
        if (cond is None) == (context is None):
            raise ConfigError("MLPAdaLNHead.forward needs exactly one of cond= or context=")
        if context is None:
            context = self.embed_context(cond)
        self._check_rows(x, context)
        if drop is not None:
            context = torch.where(drop.to(torch.bool)[..., None], self.null_context(), context)
        return self.denoise(x, self.time_embed(t) + context)

    def denoise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trunk: tokens x (…, k) under conditioning y (broadcastable to (…, W)); broadcast output."""
        h = full_precision(self.input_proj, x)  # float32 residual stream under autocast (see above)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final(h, y)

    def make_model_fn(self, cond: torch.Tensor, *, drop: torch.Tensor | None = None) -> HeadModelFn:
        """A `model_fn(x, t, guided=False)` for the diffusion objective and samplers, with cached context.

        `embed_context(cond)` and the null context are computed once here and reused on every call (all
        sampling steps). `guided=True` returns (out_cond, out_uncond) for the same x from one batched
        pass over the [z ; null] contexts: the input projection and time embedding are shared.
        Call it under torch.no_grad() when sampling. `drop` applies to unguided calls (training).
        Under DistributedDataParallel train through the wrapper instead, so DDP sees a forward:
        `lambda x_t, t: ddp_head(x_t, t, z, drop=drop)` (same maths, context computed in forward).
        """
        context = self.embed_context(cond)
        both = torch.stack([context, self.null_context().expand_as(context)])  # (2, B, n, W): [z ; null]

        def model_fn(
            x: torch.Tensor, t: torch.Tensor, guided: bool = False
        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            if not guided:
                return self(x, t, context=context, drop=drop)
            self._check_rows(x, context)
            lead = (1,) * (x.dim() - 3)
            out = self.denoise(x, self.time_embed(t) + both.reshape(2, *lead, *context.shape))
            out = out.expand(2, *x.shape[:-1], out.shape[-1])
            return out[0], out[1]

        return model_fn

    def _check_rows(self, x: torch.Tensor, context: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[-1] != self.token_dim or x.shape[-2] != self.num_positions:
            raise ConfigError(
                f"head expects tokens shaped (..., B, n={self.num_positions}, k={self.token_dim}), "
                f"got {tuple(x.shape)}; check tokenizer token_dim/num_tokens against the head"
            )
        if context.shape[0] != x.shape[-3]:
            raise ConfigError(
                f"tokens are for {x.shape[-3]} images but the condition has {context.shape[0]} rows"
            )
