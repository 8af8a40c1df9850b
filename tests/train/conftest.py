"""Tiny bases (SD 1.5-like and SDXL-like diffusers folders), tiny data sets and config files for the trainer's tests.

The trainer's extras (diffusers, accelerate, tensorboard, webdataset) are installed in the newest test stack only;
elsewhere every test module here is skipped by ``needs_extras()`` (see tools/requirements-*.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def needs_extras() -> None:
    """Skip the calling test module where the training extras are not installed (the oldest and Forge stacks)."""
    for name in ("diffusers", "accelerate", "tensorboard", "webdataset"):
        pytest.importorskip(name, reason="the trainer's extras (pip install -e .[train]) are not installed here")


CAPTIONS = [
    "a red square on a white background",
    "a blue circle on a black background",
    "a green triangle in the top left corner",
    "a yellow stripe across the middle",
    "two red dots side by side",
    "a purple frame around a grey field",
    "an orange cross in the centre",
    "a cyan gradient from left to right",
]
SD15_CONTEXT = 768  # the tiny UNets keep the real context widths, so trained connectors fit the WebUI doubles
SDXL_CONTEXT = 2048
POOLED = 32


def tiny_vae(layout: str = "small"):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if layout == "sd":  # the real block structure (4 levels, 2 resnets) at small widths
        return AutoencoderKL(block_out_channels=[4, 4, 8, 8], in_channels=3, out_channels=3, layers_per_block=2,
                             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                             latent_channels=4, norm_num_groups=2, sample_size=64)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, sample_size=32)


def tiny_unet(family: str = "sd15", layout: str = "small"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    if layout == "sd":  # SD 1.5's block structure and key names at small widths
        return UNet2DConditionModel(
            block_out_channels=(8, 8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=SD15_CONTEXT,
            attention_head_dim=2, norm_num_groups=4)
    common = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  attention_head_dim=4, norm_num_groups=4)
    if family == "sdxl":
        return UNet2DConditionModel(
            **common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=SDXL_CONTEXT,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + POOLED, use_linear_projection=True)
    return UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=SD15_CONTEXT)


def scheduler(prediction: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         prediction_type=prediction, clip_sample=False)


def write_sd15_single_file(path: Path, extra: dict | None = None, half: bool = False):
    """A tiny SD 1.5 checkpoint in A1111's key layout at ``path`` (the UNet's and VAE's tensors, plus ``extra``; in
    float16 with ``half``) and the diffusers configs that shape it in ``path.parent / "configs"``; returns the configs
    folder and the UNet and VAE it was made from."""
    from safetensors.torch import save_file

    from .ldm_layout import unet_to_ldm, vae_to_ldm

    unet, vae = tiny_unet(layout="sd"), tiny_vae(layout="sd")
    state = {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict()), **(extra or {})}
    save_file({k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(path))
    configs = path.parent / "configs"
    unet.save_config(configs / "unet")
    vae.save_config(configs / "vae")
    scheduler().save_config(configs / "scheduler")
    return configs, unet, vae


def write_clip_tokenizer(folder: Path) -> None:
    """A tiny CLIP BPE tokenizer (unknown characters map to <unk>), enough for a pooled embedding."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [*letters, *(c + "</w>" for c in letters), "<unk>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "unk_token": "<unk>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


CONTEXT_GAIN = 8.0


def make_base(folder: Path, family: str = "sd15", prediction: str = "epsilon") -> Path:
    unet = tiny_unet(family)
    with torch.no_grad():  # a random UNet barely listens to its context; a trained one does: make this one listen
        for name, p in unet.named_parameters():
            if ".attn2.to_out.0." in name:
                p.mul_(CONTEXT_GAIN)
    unet.save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    scheduler(prediction).save_pretrained(folder / "scheduler")
    if family == "sdxl":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        write_clip_tokenizer(folder / "tokenizer_2")
        torch.manual_seed(2)
        config = CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_hidden_layers=2, projection_dim=POOLED, max_position_embeddings=16,
                                bos_token_id=53, eos_token_id=54, pad_token_id=54)
        CLIPTextModelWithProjection(config).save_pretrained(folder / "text_encoder_2")
    return folder


def add_text_encoders(folder: Path, family: str) -> Path:
    """The base's own CLIP-L (and tokenizer), for --baseline: as wide as the context (SDXL: beside the tiny CLIP-G)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    write_clip_tokenizer(folder / "tokenizer")
    width = 768 if family == "sd15" else 2048 - 16
    torch.manual_seed(3)
    config = CLIPTextConfig(vocab_size=60, hidden_size=width, intermediate_size=32, num_attention_heads=12 if
                            family == "sd15" else 8, num_hidden_layers=2, max_position_embeddings=16,
                            bos_token_id=53, eos_token_id=54, pad_token_id=54)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


def make_image(index: int, size: tuple[int, int] = (40, 40)):
    """A simple picture that differs per index (colour and a shape's place)."""
    from PIL import Image, ImageDraw

    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 20), (200, 20, 90), (130, 40, 160),
               (250, 140, 0), (0, 200, 200)]
    image = Image.new("RGB", size, (255, 255, 255) if index % 2 == 0 else (10, 10, 10))
    draw = ImageDraw.Draw(image)
    w, h = size
    x = (index * 7) % max(1, w // 2)
    draw.rectangle([x, h // 4, x + w // 2, h // 4 + h // 2], fill=colours[index % len(colours)])
    return image


def make_caption_folder(folder: Path, count: int = 8, sizes=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = sizes[i % len(sizes)] if sizes else (40, 40)
        make_image(i, size).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder


def write_config(path: Path, *, base: Path, llm: Path, images: list[Path] | Path, output: Path, **sections) -> Path:
    """A TOML config; ``sections`` are dicts per section merged over tiny-model defaults."""
    sources = sections.pop("sources", None) or [{"path": str(p), "caption_dropout": 0.0}
                                                for p in (images if isinstance(images, list) else [images])]
    defaults = {
        "model": {"base": str(base), "llm": str(llm), "max_length": 16},
        "connector": {"width": 32, "layers": 2, "heads": 4, "latents": 8, "time_channels": 16},
        "data": {"resolution": 32, "bucket_step": 8, "bucketing": False},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "output": str(output), "workers": 0, "seed": 7},
        "sample": {},
    }
    for name, values in sections.items():
        defaults.setdefault(name, {}).update(values)
    lines = []
    for name in defaults:  # the five above, then any other section given (e.g. validation)
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in defaults[name].items()]
    for source in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {_toml(v)}" for k, v in source.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@pytest.fixture(scope="session")
def sd15_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-sd15")


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def images8(tmp_path_factory):
    return make_caption_folder(tmp_path_factory.mktemp("data") / "eight")
