"""diffusers -> A1111 (LDM) key names for an SD 1.5-shaped UNet and VAE: the inverse of what diffusers'
``from_single_file`` converts, written from the key tables of SD 1.5 checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``). Used to build a tiny single-file checkpoint in A1111's layout."""

from __future__ import annotations

import torch

UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
          ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]


def _unet_prefixes() -> list[tuple[str, str]]:
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    prefixes = _unet_prefixes()
    for key, value in state.items():
        new = key
        for ldm, hf in UNET_TOP:
            if new.startswith(hf):
                new = ldm + new[len(hf):]
        for ldm, hf in prefixes:
            if new.startswith(hf):
                rest = new[len(hf):]
                if "resnets" in hf:
                    for ldm_r, hf_r in RESNET:
                        if rest.startswith(hf_r):
                            rest = ldm_r + rest[len(hf_r):]
                new = ldm + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{3 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs.append((f"{part}.norm_out.", f"{part}.conv_norm_out."))
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut.", "nin_shortcut.")
        for ldm, hf in pairs:
            if new.startswith(hf):
                rest = new[len(hf):]
                if "attentions" in hf:
                    for ldm_a, hf_a in attention:
                        if rest.startswith(hf_a):
                            rest = ldm_a + rest[len(hf_a):]
                            if ldm_a != "norm." and value.ndim == 2:
                                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
                new = ldm + rest
                break
        out["first_stage_model." + new] = value
    return out
