"""An independent, literal computation of ELLA's TSC, straight from the formulas of the paper and the reference
(TencentQQGYLab/ELLA ``model.py``), used only to check ``ella_ext.connector``.

It works from a plain state dict with torch's own ``nn.MultiheadAttention`` and per-block LayerNorms, one row at a
time if asked, exactly as the reference evaluates it: no fusion, no masks.

With ``weights`` (emphasis) or ``mask``, the attention is written out from the formula instead: per head,
``softmax(q k^T / sqrt(d) + log w)`` over the keys [latents | text], with w = 1 on the latents' keys, the given weight
on each text key, and w = 0 on a masked text key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoid(timesteps: torch.Tensor, channels: int) -> torch.Tensor:
    # diffusers' Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0): [cos | sin], fp32.
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(features, (0, 1)) if channels % 2 else features  # odd widths: a zero column last


def ada_norm(x, emb, weight, bias):
    mod = F.linear(F.silu(emb), weight, bias)  # [B, 1, 2W]
    shift, scale = mod.view(len(x), 1, -1).chunk(2, dim=-1)
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def weighted_attention(query_in, kv_in, sd, prefix, heads, log_w):
    """Multi-head attention, literally: ``log_w [B, keys]`` is added to every head's logits before the softmax."""
    width = query_in.shape[-1]
    w, b = sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"]
    q = F.linear(query_in, w[:width], b[:width])
    k = F.linear(kv_in, w[width : 2 * width], b[width : 2 * width])
    v = F.linear(kv_in, w[2 * width :], b[2 * width :])
    d = width // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d) + log_w[:, None, None, :]
    out = (torch.softmax(logits, dim=-1) @ split(v)).transpose(1, 2).reshape(q.shape)
    return F.linear(out, sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"])


def reference_tsc(state: dict, features: torch.Tensor, timesteps, heads: int, weights=None, mask=None) -> torch.Tensor:
    """features [B, S, D]; timesteps tensor [B] or [1] (as the reference takes them); optional per-token
    ``weights [B, S]`` and ``mask [B, S]`` (False: not attended)."""
    sd = {k: v.double() for k, v in state.items()}
    x = features.double()
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    channels = sd["time_embedding.linear_1.weight"].shape[1]
    t_feat = sinusoid(timesteps, channels).double()[:, None, :].expand(len(x), -1, -1)
    emb = F.linear(F.silu(F.linear(t_feat, sd["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.bias"])),
                   sd["time_embedding.linear_2.weight"], sd["time_embedding.linear_2.bias"])
    lat = sd["connector.latents"][None].repeat(len(x), 1, 1)
    lat = lat + F.linear(F.silu(emb), sd["connector.time_aware_linear.weight"], sd["connector.time_aware_linear.bias"])
    if "connector.proj_in.weight" in sd:
        x = F.linear(x, sd["connector.proj_in.weight"], sd["connector.proj_in.bias"])
    width = lat.shape[-1]
    log_w = None
    if weights is not None or mask is not None:
        text_w = torch.ones(x.shape[:2], dtype=torch.float64) if weights is None else weights.double().clone()
        if mask is not None:
            text_w[~mask.bool()] = 0.0
        log_w = torch.log(torch.cat([torch.ones(len(x), lat.shape[1], dtype=torch.float64), text_w], dim=1))
    i = 0
    while f"connector.perceiver_blocks.{i}.attn.in_proj_weight" in sd:
        p = f"connector.perceiver_blocks.{i}."
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True).double()
        mha.load_state_dict({
            "in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
            "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"],
        })
        normed = ada_norm(lat, emb, sd[p + "ln_1.linear.weight"], sd[p + "ln_1.linear.bias"])
        kv = torch.cat([normed, ada_norm(x, emb, sd[p + "ln_2.linear.weight"], sd[p + "ln_2.linear.bias"])], dim=1)
        if log_w is None:
            lat = lat + mha(normed, kv, kv, need_weights=False)[0]
        else:
            lat = lat + weighted_attention(normed, kv, sd, p, heads, log_w)
        h = ada_norm(lat, emb, sd[p + "ln_ff.linear.weight"], sd[p + "ln_ff.linear.bias"])
        h = torch.square(torch.relu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])))
        lat = lat + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    if "connector.proj_out.0.weight" in sd:
        lat = F.linear(lat, sd["connector.proj_out.0.weight"], sd["connector.proj_out.0.bias"])
        lat = F.layer_norm(lat, (lat.shape[-1],), sd["connector.proj_out.1.weight"], sd["connector.proj_out.1.bias"])
    return lat
