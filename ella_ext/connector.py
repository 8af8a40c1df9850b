"""The Timestep-Aware Semantic Connector (TSC) of ELLA.

A Perceiver resampler whose LayerNorms are modulated by the diffusion timestep: LLM features ``[B, S, D_in]``
and a timestep per row go in, ``[B, latents, D_out]`` context tokens for the UNet come out.

Parameter names follow the official ``ella-sd1.5-tsc-t5xl.safetensors`` so that file loads strictly
(``connector_file.py`` reads and writes the files). The configuration is read from the tensor shapes; only the head
count cannot be read from them: it defaults to 8 and can be given as an argument or in the file's safetensors
metadata under ``ella.heads`` (see README).

The arithmetic is the reference's, arranged for fewer, larger kernels per call:
- every adaptive-LayerNorm modulation of every block (and the latents' time shift) is computed once per call, up
  front, for one timestep or one per row;
- the text features are projected and normalised once per call (the reference normalises them again in every
  block: the result is the same because the text features are not updated between blocks);
- attention runs through ``scaled_dot_product_attention`` with an optional mask of the real text positions, so a
  batch of prompts of different lengths gives, row by row, what each prompt gives alone without padding.

Emphasis: optional ``weights [B, S]`` (one per text token, >= 0) multiply each text key's unnormalised attention
probability, in every block and head: a ``log w`` bias on its logits, folded with the mask into ONE additive bias
built once per call (a masked position is a weight of 0, ``-inf``). The latents' keys keep weight 1. All-ones weights
are the same as none: the same kernels, bit-identical output (the check runs where the weights are, so weights on
the CPU cost the accelerator nothing).

SDXL's pooled vector: a connector may carry an ``AttentionPool`` (``ConnectorConfig.pooled_width``; tensors under
``pool.``, metadata ``ella.pooled = attention``) that maps the same LLM features to the UNet's pooled text vector in
place of CLIP-G's. It reads the connector's input, not its output: the hosts compute SDXL's vector conditioning
once per text and generation, while the TSC's output changes with the timestep.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConnectorLoadError, InputError

DEFAULT_HEADS = 8
LAYERNORM_EPS = 1e-6
_BLOCK_KEY = re.compile(r"^connector\.perceiver_blocks\.(\d+)\.attn\.in_proj_weight$")


def own_precision(device: torch.device | str):
    """A context in which ELLA's models compute in the dtype they were loaded in, whatever the caller set up: a host
    may sample inside ``torch.autocast`` (A1111 with FP8 weights on a CPU samples under bfloat16 autocast, on CUDA
    under float16), which would otherwise run the connector and the LLM in that precision instead."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, enabled=False) if kind in ("cuda", "cpu") else contextlib.nullcontext()


@dataclass(frozen=True)
class ConnectorConfig:
    """Shape of a TSC. The defaults are the official SD 1.5 connector."""

    time_channels: int = 320
    time_embed_dim: int = 768
    width: int = 768
    layers: int = 6
    heads: int = DEFAULT_HEADS
    num_latents: int = 64
    input_dim: int | None = 2048
    output_dim: int | None = None
    pooled_width: int | None = None  # SDXL: the width of the attention pool's vector (None: no pool)

    @property
    def in_width(self) -> int:
        """Hidden size of the LLM features the connector reads."""
        return self.input_dim if self.input_dim is not None else self.width

    @property
    def out_width(self) -> int:
        """Width of the context tokens the connector returns (768 for SD 1.5)."""
        return self.output_dim if self.output_dim is not None else self.width

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a file in this configuration, by key."""
        w, te = self.width, self.time_embed_dim
        shapes: dict[str, tuple[int, ...]] = {
            "time_embedding.linear_1.weight": (te, self.time_channels),
            "time_embedding.linear_1.bias": (te,),
            "time_embedding.linear_2.weight": (te, te),
            "time_embedding.linear_2.bias": (te,),
            "connector.latents": (self.num_latents, w),
            "connector.time_aware_linear.weight": (w, te),
            "connector.time_aware_linear.bias": (w,),
        }
        if self.input_dim is not None:
            shapes["connector.proj_in.weight"] = (w, self.input_dim)
            shapes["connector.proj_in.bias"] = (w,)
        for i in range(self.layers):
            p = f"connector.perceiver_blocks.{i}."
            shapes[p + "attn.in_proj_weight"] = (3 * w, w)
            shapes[p + "attn.in_proj_bias"] = (3 * w,)
            shapes[p + "attn.out_proj.weight"] = (w, w)
            shapes[p + "attn.out_proj.bias"] = (w,)
            shapes[p + "mlp.c_fc.weight"] = (4 * w, w)
            shapes[p + "mlp.c_fc.bias"] = (4 * w,)
            shapes[p + "mlp.c_proj.weight"] = (w, 4 * w)
            shapes[p + "mlp.c_proj.bias"] = (w,)
            for norm in ("ln_1", "ln_2", "ln_ff"):
                shapes[p + norm + ".linear.weight"] = (2 * w, te)
                shapes[p + norm + ".linear.bias"] = (2 * w,)
        if self.output_dim is not None:
            shapes["connector.proj_out.0.weight"] = (self.output_dim, w)
            shapes["connector.proj_out.0.bias"] = (self.output_dim,)
            shapes["connector.proj_out.1.weight"] = (self.output_dim,)
            shapes["connector.proj_out.1.bias"] = (self.output_dim,)
        if self.pooled_width is not None:
            shapes.update({
                "pool.proj_in.weight": (w, self.in_width), "pool.proj_in.bias": (w,),
                "pool.query": (w,),
                "pool.kv.weight": (2 * w, w), "pool.kv.bias": (2 * w,),
                "pool.norm.weight": (w,), "pool.norm.bias": (w,),
                "pool.proj_out.weight": (self.pooled_width, w), "pool.proj_out.bias": (self.pooled_width,),
            })
        return shapes

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], heads: int | None = None,
                    pooled: bool = False) -> ConnectorConfig:
        """Read the configuration from a file's tensor shapes (key -> shape); ``pooled``: the file says it has an
        attention pool (its metadata ``ella.pooled``), whose width then comes from ``pool.proj_out.weight``."""
        required = ("time_embedding.linear_1.weight", "connector.latents")
        absent = [k for k in required if k not in shapes]
        if absent:
            raise ConnectorLoadError(
                f"This is not an ELLA connector: it lacks {', '.join(absent)}. Pick an ELLA TSC file such as "
                "ella-sd1.5-tsc-t5xl.safetensors."
            )
        flat = [k for k in (*required, "connector.proj_in.weight", "connector.proj_out.0.weight")
                if k in shapes and len(shapes[k]) != 2]
        if flat:
            raise ConnectorLoadError(
                f"This is not an ELLA connector: {', '.join(flat)} should be 2-D matrices. Pick an ELLA TSC file such "
                "as ella-sd1.5-tsc-t5xl.safetensors."
            )
        layers = sum(1 for k in shapes if _BLOCK_KEY.match(k))
        proj_in = shapes.get("connector.proj_in.weight")
        proj_out = shapes.get("connector.proj_out.0.weight")
        pool_out = shapes.get("pool.proj_out.weight") if pooled else None
        if pooled and (pool_out is None or len(pool_out) != 2):
            raise ConnectorLoadError(
                "The file's metadata says it has an attention pool (ella.pooled = attention) but it holds no 2-D "
                "pool.proj_out.weight: the file is incomplete. Save the connector again from its training run."
            )
        time_embed_dim, time_channels = shapes["time_embedding.linear_1.weight"]
        num_latents, width = shapes["connector.latents"]
        heads = DEFAULT_HEADS if heads is None else int(heads)
        if heads < 1 or width % heads:
            raise ConnectorLoadError(
                f"The connector's width {width} cannot be split into {heads} attention heads; give a head count "
                f"that divides {width} (the official connector uses {DEFAULT_HEADS})."
            )
        return cls(
            time_channels=time_channels,
            time_embed_dim=time_embed_dim,
            width=width,
            layers=layers,
            heads=heads,
            num_latents=num_latents,
            input_dim=proj_in[1] if proj_in is not None else None,
            output_dim=proj_out[0] if proj_out is not None else None,
            pooled_width=pool_out[0] if pool_out is not None else None,
        )


class _TimeEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)


class _AdaNorm(nn.Module):
    """Holds the modulation weights of one adaptive LayerNorm; the forward pass fuses them (see ``_Modulation``)."""

    def __init__(self, width: int, time_dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * width)


class _Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class _Attention(nn.Module):
    """Parameters in ``nn.MultiheadAttention``'s layout (``in_proj_weight`` = q, k, v stacked)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)


class _Block(nn.Module):
    def __init__(self, width: int, time_dim: int):
        super().__init__()
        self.attn = _Attention(width)
        self.mlp = _Mlp(width)
        self.ln_1 = _AdaNorm(width, time_dim)
        self.ln_2 = _AdaNorm(width, time_dim)
        self.ln_ff = _AdaNorm(width, time_dim)


class _Resampler(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        w = cfg.width
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, w))
        self.time_aware_linear = nn.Linear(cfg.time_embed_dim, w)
        if cfg.input_dim is not None:
            self.proj_in = nn.Linear(cfg.input_dim, w)
        self.perceiver_blocks = nn.ModuleList(_Block(w, cfg.time_embed_dim) for _ in range(cfg.layers))
        if cfg.output_dim is not None:
            self.proj_out = nn.Sequential(nn.Linear(w, cfg.output_dim), nn.LayerNorm(cfg.output_dim))


class AttentionPool(nn.Module):
    """SDXL's pooled text vector from the LLM features (the connector's input, not its timestep-dependent output:
    the hosts compute SDXL's vector conditioning once per text, not per step).

    The features are projected to the connector's width and normalised (as the TSC does with them), one learned
    query attends over them (multi-head; ``mask`` leaves out the padding), and the result is normalised and
    projected to ``pooled_width``: ``[B, S, in_width]`` -> ``[B, pooled_width]``."""

    def __init__(self, in_width: int, width: int, heads: int, pooled_width: int):
        super().__init__()
        self.heads = heads
        self.proj_in = nn.Linear(in_width, width)
        self.query = nn.Parameter(torch.empty(width))
        self.kv = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, pooled_width)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        text = F.layer_norm(self.proj_in(features), (self.query.shape[0],), eps=LAYERNORM_EPS)
        key, value = self.kv(text).chunk(2, dim=-1)
        query = self.query.to(key.dtype).expand(key.shape[0], 1, -1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            _split_heads(query, self.heads), _split_heads(key, self.heads), _split_heads(value, self.heads),
            attn_mask=attn_mask,
        )
        return self.proj_out(self.norm(out.transpose(1, 2).flatten(2)[:, 0]))


class Connector(nn.Module):
    """The TSC. ``forward(features, timesteps, mask=None, weights=None)`` -> ``[B, latents, out_width]``; with an
    attention pool (``config.pooled_width``, SDXL), ``pooled(features, mask)`` -> ``[B, pooled_width]``."""

    def __init__(self, config: ConnectorConfig | None = None):
        super().__init__()
        self.config = config or ConnectorConfig()
        cfg = self.config
        self.time_embedding = _TimeEmbedding(cfg.time_channels, cfg.time_embed_dim)
        self.connector = _Resampler(cfg)
        if cfg.pooled_width is not None:
            self.pool = AttentionPool(cfg.in_width, cfg.width, cfg.heads, cfg.pooled_width)
        self._frequencies: dict[torch.device, torch.Tensor] = {}  # fp32 always: not a buffer, so .half() skips it

    # -- parameters -------------------------------------------------------------------------------------------

    def _modulation_layers(self) -> list[nn.Linear]:
        """Every Linear of the time embedding: the latents' time shift, then each block's three AdaLN modulations."""
        layers = [self.connector.time_aware_linear]
        for block in self.connector.perceiver_blocks:
            layers += [block.ln_1.linear, block.ln_2.linear, block.ln_ff.linear]
        return layers

    @property
    def device(self) -> torch.device:
        return self.connector.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.connector.latents.dtype

    # -- forward ----------------------------------------------------------------------------------------------

    def time_features(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of fractional DDPM timesteps, cos first, computed in fp32 as the reference does."""
        frequencies = self._frequencies.get(timesteps.device)
        if frequencies is None:
            frequencies = _sinusoid_frequencies(self.config.time_channels).to(timesteps.device)
            self._frequencies[timesteps.device] = frequencies
        args = timesteps.to(torch.float32)[:, None] * frequencies[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.config.time_channels % 2:
            features = F.pad(features, (0, 1))
        return features

    @property
    def has_pool(self) -> bool:
        """Whether this connector makes SDXL's pooled vector (an attention pool) instead of CLIP-G."""
        return self.config.pooled_width is not None

    def pooled(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """SDXL's pooled text vector ``[B, pooled_width]`` from the LLM features ``[B, S, in_width]`` and their
        ``mask [B, S]`` (True: a real token; None: every position, as fixed length reads them), the same features
        and mask ``forward`` reads; no timestep. None when the connector has no pool (its users take CLIP-G's)."""
        if not self.has_pool:
            return None
        features, _, mask = self._check_inputs(features, 0, mask)
        return self.pool(features, mask)

    def forward(
        self,
        features: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        return_pooled: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``features [B, S, in_width]``; one timestep or one per row; ``mask [B, S]`` (True: a real token; None:
        every position is attended, as the reference's fixed length); ``weights [B, S]``: the attention weight of
        each text token (emphasis; None or all ones: none). ``return_pooled``: ``(context, pooled(features, mask))``
        in one call (training: a wrapper such as DDP sees the pool's use in its forward)."""
        if return_pooled:
            context = self(features, timesteps, mask, weights)
            return context, self.pooled(features, mask)
        features, timesteps, mask = self._check_inputs(features, timesteps, mask)
        weights = self._check_weights(weights, features)
        cfg, res = self.config, self.connector
        batch, width = features.shape[0], cfg.width

        # Once per distinct timestep: the time embedding, then every modulation of every block. (One product over a
        # concatenated copy of these weights would save 19 small kernels per pass, but costs a third of the
        # connector's memory again: bench/bench_modulation.py.)
        emb = self.time_embedding
        time_emb = F.silu(emb.linear_2(F.silu(emb.linear_1(self.time_features(timesteps).to(self.dtype)))))
        mods = torch.cat([layer(time_emb) for layer in self._modulation_layers()], dim=-1)[:, None, :]
        mods = mods.expand(batch, 1, -1) if mods.shape[0] != batch else mods
        start_shift, block_mods = mods[..., :width], mods[..., width:].chunk(3 * cfg.layers, dim=-1)

        text = res.proj_in(features) if cfg.input_dim is not None else features
        text = F.layer_norm(text, (width,), eps=LAYERNORM_EPS)
        attn_mask = self._attention_mask(mask, cfg.num_latents, weights, self.dtype)
        latents = res.latents[None] + start_shift

        for i, block in enumerate(res.perceiver_blocks):
            mod_1, mod_2, mod_ff = block_mods[3 * i : 3 * i + 3]
            latents = latents + self._attend(block, _modulate(latents, mod_1), _apply_mod(text, mod_2), attn_mask)
            latents = latents + block.mlp(_modulate(latents, mod_ff))

        if cfg.output_dim is not None:
            latents = res.proj_out(latents)
        return latents

    def _attend(
        self, block: _Block, latents: torch.Tensor, text: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        heads, width = self.config.heads, self.config.width
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        q, k_lat, v_lat = F.linear(latents, w, b).chunk(3, dim=-1)
        k_txt, v_txt = F.linear(text, w[width:], b[width:]).chunk(2, dim=-1)
        k = torch.cat([k_lat, k_txt], dim=1)
        v = torch.cat([v_lat, v_txt], dim=1)
        out = F.scaled_dot_product_attention(
            _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), attn_mask=attn_mask
        )
        return block.attn.out_proj(out.transpose(1, 2).flatten(2))

    @staticmethod
    def _attention_mask(
        mask: torch.Tensor | None, num_latents: int, weights: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor | None:
        """[B, 1, 1, latents + S]: without weights, boolean, True where a key may be attended (the latents always
        may); with weights, the additive bias ``log w`` (``-inf`` where the mask is False or w is 0; 0 on the
        latents) in the attention's dtype."""
        if weights is None:
            if mask is None:
                return None
            keep = torch.ones(mask.shape[0], num_latents, dtype=torch.bool, device=mask.device)
            return torch.cat([keep, mask], dim=1)[:, None, None, :]
        bias = weights.log()  # log 0 = -inf: the key is removed
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return F.pad(bias, (num_latents, 0)).to(dtype)[:, None, None, :]

    @staticmethod
    def _check_weights(weights: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor | None:
        """The weights as float32 on the features' device, or None when there are none or all are 1. The checks
        run on the weights' own device (on the CPU: no accelerator work; on an accelerator: one sync)."""
        if weights is None:
            return None
        shape = features.shape[:2]
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tuple(shape):
            got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise InputError(f"The weights must be [batch, tokens] = {list(shape)}; got {got}.")
        weights = weights.to(torch.float32)
        not_one, bad = torch.stack([(weights != 1).any(), ~((weights >= 0) & (weights < math.inf)).all()]).tolist()
        if bad:
            raise InputError("The attention weights must be finite and at least 0 (0 removes a token).")
        return weights.to(features.device) if not_one else None

    def _check_inputs(
        self, features: torch.Tensor, timesteps: torch.Tensor | float | int, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not isinstance(features, torch.Tensor) or features.ndim != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InputError(f"The connector takes LLM features of shape [batch, tokens, width]; it got {shape}.")
        batch, tokens, width = features.shape
        if width != self.config.in_width:
            raise InputError(
                f"The LLM features are {width} wide but this connector reads {self.config.in_width}-wide features: "
                "pick the text encoder the connector was trained with."
            )
        if batch == 0 or tokens == 0:
            raise InputError(
                f"The connector got no features to read {tuple(features.shape)}: every row needs at least one token "
                "(T5 always gives the EOS token, even for an empty prompt)."
            )
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=features.device).reshape(-1)
        if timesteps.shape[0] not in (1, batch):
            raise InputError(
                f"Give one timestep or one per row: got {timesteps.shape[0]} timesteps for {batch} rows."
            )
        if mask is not None:
            if mask.shape != (batch, tokens):
                raise InputError(f"The mask must be [batch, tokens] = {[batch, tokens]}; got {list(mask.shape)}.")
            mask = mask.to(device=features.device, dtype=torch.bool)
        return features.to(self.dtype), timesteps, mask


def _sinusoid_frequencies(channels: int) -> torch.Tensor:
    half = channels // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device="cpu") / half)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _apply_mod(normed: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    shift, scale = mod.chunk(2, dim=-1)
    return torch.addcmul(shift, normed, 1 + scale)


def _modulate(x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    return _apply_mod(F.layer_norm(x, (x.shape[-1],), eps=LAYERNORM_EPS), mod)
