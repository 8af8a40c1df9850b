"""The base model's own text conditioning, for ``eval --baseline``: SD 1.5's CLIP-L (its last hidden state); SDXL's
CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280 = 2048 wide) and CLIP-G's pooled embedding.

As diffusers' pipelines (with which DPG-Bench's published baselines were made) do, a prompt is cut at CLIP's 77
tokens; the WebUI's 75-token chunks are not reproduced. The negative is the empty text, as for the connectors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import ELLAError

log = logging.getLogger("ella")
SINGLE_FILE_CLIP_L = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}


class BaselineError(ELLAError):
    """The base's own text encoders cannot be loaded for --baseline."""


class BaseText:
    def __init__(self, base, clip_l, tokenizer):
        self.base, self.clip_l, self.tokenizer = base, clip_l, tokenizer
        self.length = int(clip_l.config.max_position_embeddings)  # 77 for SD's CLIPs

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([1, 77, W] rows, [1, 1280] pooled or None)`` for one text."""
        tokens = self.tokenizer([text], padding="max_length", truncation=True, max_length=self.length,
                                return_tensors="pt")
        out = self.clip_l(tokens.input_ids.to(self.clip_l.device), output_hidden_states=True)
        if self.base.family == "sd15":
            return out.last_hidden_state.float(), None
        g = self.base.clip_g
        g_tokens = self.base.clip_g_tokenizer([text], padding="max_length", truncation=True,
                                              max_length=self.base.clip_g_tokenizer.model_max_length,
                                              return_tensors="pt")
        g_out = g(g_tokens.input_ids.to(g.device), output_hidden_states=True)
        rows = torch.cat([out.hidden_states[-2].float(), g_out.hidden_states[-2].float()], dim=-1)
        return rows, g_out.text_embeds.float()

    def close(self) -> None:
        self.clip_l = None


def load_base_text(config, base, device: torch.device, dtype: torch.dtype) -> BaseText:
    """CLIP-L (and its tokenizer) of [model] base; SDXL's CLIP-G is the base's own already."""
    from ..train.model import _config_folder, is_single_file

    path = config.resolve(config.model["base"])
    if is_single_file(path):
        clip_l = _single_file_clip_l(path, base.family)
        tokenizer = _tokenizer(_config_folder(config, base.family, path), path, single_file=True)
    else:
        from transformers import CLIPTextModel

        try:
            clip_l = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        except (OSError, ValueError) as exc:
            raise BaselineError(f"--baseline: {path} has no text_encoder/ that could be loaded ({exc}). The baseline "
                                "uses the base's own CLIP text encoder: give a full pipeline folder.") from exc
        tokenizer = _tokenizer(path, path, single_file=False)
    clip_l.requires_grad_(False).eval().to(device=device, dtype=dtype)
    width = clip_l.config.hidden_size + (base.clip_g.config.hidden_size if base.family == "sdxl" else 0)
    if width != base.context_width:
        raise BaselineError(f"--baseline: the text encoders of {base.name} give {width}-wide rows but its UNet takes "
                            f"{base.context_width}; the base's files do not belong together.")
    return BaseText(base, clip_l, tokenizer)


def _tokenizer(folder: str, path: str, single_file: bool):
    """CLIP's tokenizer from ``folder/tokenizer``. Its files are checked first: newer transformers make an empty
    tokenizer from a folder without them instead of failing."""
    from transformers import CLIPTokenizer

    local = Path(folder).is_dir()
    files = Path(folder) / "tokenizer"
    has_files = (files / "vocab.json").is_file() and (files / "merges.txt").is_file() or (
        files / "tokenizer.json").is_file()
    tokenizer, problem = None, "no vocab.json and merges.txt"
    if has_files or not local:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        except (OSError, ValueError) as exc:
            problem = str(exc)
    if tokenizer is not None and len(tokenizer) < 3:
        tokenizer, problem = None, f"its vocabulary has {len(tokenizer)} tokens"
    if tokenizer is not None:
        return tokenizer
    if single_file:
        raise BaselineError(
            f"--baseline with the single file {Path(path).name} needs CLIP's tokenizer (vocab.json and merges.txt), "
            "which a single file does not hold: set [model] base_config to a diffusers folder of the same family "
            "that has tokenizer/ (with unet/, vae/ and scheduler/ configs), e.g. a download of the base's diffusers "
            f"release. ({folder}/tokenizer: {problem})")
    raise BaselineError(f"--baseline: {path} has no usable tokenizer/ ({problem}).")


def _single_file_clip_l(path: str, family: str):
    """CLIP-L from an A1111-style single file: the tensors under its text encoder's prefix are transformers' own
    ``text_model.*`` names; the shape comes from the tensors (CLIP-L's activation, quick GELU)."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = SINGLE_FILE_CLIP_L[family]
    with safe_open(path, "pt") as handle:
        names = [key for key in handle.keys() if key.startswith(prefix)]  # noqa: SIM118 (safe_open is no dict)
        state = {key[len(prefix):]: handle.get_tensor(key) for key in names}
    state.pop("text_model.embeddings.position_ids", None)
    embedding = state.get("text_model.embeddings.token_embedding.weight")
    if embedding is None:
        raise BaselineError(f"--baseline: {Path(path).name} holds no CLIP-L text encoder under {prefix}*.")
    layers = {int(m.group(1)) for key in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", key))}
    hidden = embedding.shape[1]
    clip_config = CLIPTextConfig(
        vocab_size=embedding.shape[0], hidden_size=hidden, num_hidden_layers=len(layers),
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=embedding.shape[0] - 2,
        eos_token_id=embedding.shape[0] - 1, pad_token_id=embedding.shape[0] - 1)
    model = CLIPTextModel(clip_config)
    if not hasattr(model, "text_model"):  # newer transformers name CLIPTextModel's tensors without text_model.
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise BaselineError(f"--baseline: the CLIP-L tensors of {Path(path).name} do not fit a CLIP text model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return model
