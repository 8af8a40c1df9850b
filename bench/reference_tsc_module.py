"""The baseline for benchmarks: the TSC arranged as the reference arranges it (TencentQQGYLab/ELLA ``model.py``):
one ``nn.Linear`` per adaptive LayerNorm evaluated separately, ``nn.MultiheadAttention`` over the concatenated
latents and text, text normalised again in every block, the flexible mode run one prompt at a time.

Written here from the architecture (not copied); it loads the same state dict as ``ella_ext.connector`` and the
benchmark checks that both give the same numbers before timing them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdaNorm(nn.Module):
    def __init__(self, width, time_dim):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        shift, scale = self.linear(F.silu(emb)).view(len(x), 1, -1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, width, heads, time_dim):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("sq_relu", _SquaredReLU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_1, self.ln_2, self.ln_ff = (AdaNorm(width, time_dim) for _ in range(3))

    def forward(self, x, latents, emb):
        normed = self.ln_1(latents, emb)
        kv = torch.cat([normed, self.ln_2(x, emb)], dim=1)
        latents = latents + self.attn(normed, kv, kv, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, emb))


class _SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.square(torch.relu(x))


class Resampler(nn.Module):
    def __init__(self, width, layers, heads, num_latents, input_dim, time_dim, output_dim=None):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, width))
        self.time_aware_linear = nn.Linear(time_dim, width)
        self.proj_in = nn.Linear(input_dim, width)
        self.perceiver_blocks = nn.Sequential(*[Block(width, heads, time_dim) for _ in range(layers)])
        if output_dim is not None:  # the reference's optional output projection (a linear, then a LayerNorm)
            self.proj_out = nn.Sequential(nn.Linear(width, output_dim), nn.LayerNorm(output_dim))

    def forward(self, x, emb):
        latents = self.latents.unsqueeze(0).repeat(len(x), 1, 1) + self.time_aware_linear(F.silu(emb))
        x = self.proj_in(x)
        for block in self.perceiver_blocks:
            latents = block(x, latents, emb)
        if hasattr(self, "proj_out"):
            latents = self.proj_out(latents)
        return latents


class TimeEmbedding(nn.Module):
    def __init__(self, channels, dim):
        super().__init__()
        self.channels = channels
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timesteps, dtype):
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
        args = timesteps.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class ReferenceTSC(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.time_embedding = TimeEmbedding(config.time_channels, config.time_embed_dim)
        self.connector = Resampler(config.width, config.layers, config.heads, config.num_latents, config.input_dim,
                                   config.time_embed_dim, config.output_dim)

    def forward(self, features, timesteps):
        timesteps = torch.as_tensor(timesteps, device=features.device).reshape(-1)
        emb = self.time_embedding(timesteps, features.dtype)[:, None, :].expand(len(features), -1, -1)
        return self.connector(features, emb)

    def flexible(self, features, lengths, timesteps):
        """The reference's flexible mode: each prompt alone, cut to its own length."""
        return torch.cat([self(features[i : i + 1, :n], timesteps) for i, n in enumerate(lengths)])
