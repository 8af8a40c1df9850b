"""The frozen base (UNet, VAE, noise schedule; SDXL's CLIP-G for the pooled embedding) and the TSC that trains.

A base is a diffusers pipeline folder, a hub id, or an A1111-style single-file ``.safetensors`` checkpoint of SD 1.5
or SDXL. For single files the diffusers configs come from ``configs/`` in this package (or ``[model] base_config``),
so nothing is fetched from the hub for a local file. The TSC is ``ella_ext.connector.Connector``: the module the
extension runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..connector import Connector, ConnectorConfig
from ..errors import ELLAError
from .config import Config, ConfigError

log = logging.getLogger("ella")
CONFIGS = Path(__file__).resolve().parent / "configs"
# The paper's connector for each family (SD 1.5: the official file's shape; SDXL: 2048 wide, about 0.47 B).
FAMILY_DEFAULTS = {
    "sd15": {"width": 768, "layers": 6, "heads": 8, "latents": 64, "time_channels": 320},
    "sdxl": {"width": 2048, "layers": 6, "heads": 16, "latents": 64, "time_channels": 320},
}


class BaseModelError(ELLAError):
    """The base model cannot be loaded: the message names the file or folder and what to do."""


@dataclass
class Base:
    family: str
    unet: Any
    vae: Any
    scheduler: Any  # diffusers DDPMScheduler (the training noise schedule)
    prediction: str  # "epsilon" or "v_prediction"
    name: str
    clip_g: Any = None  # SDXL: CLIPTextModelWithProjection (pooled text embedding)
    clip_g_tokenizer: Any = None
    vae_name: str = "the base's VAE"

    @property
    def context_width(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_width(self) -> int | None:
        """SDXL: the width of the pooled text vector the UNet takes (1280 for SDXL); None for SD 1.5."""
        return unet_pooled_width(self.unet.config) if self.family == "sdxl" else None

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Pixel sides must be multiples of this (the VAE's factor times the UNet's downsampling)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.clip_g) if m is not None]

    def freeze(self) -> None:
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def to(self, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> Base:
        """Every frozen model on ``device`` in ``dtype``; the VAE in ``vae_dtype`` when given."""
        for module in self.modules():
            module.to(device=device, dtype=vae_dtype if module is self.vae and vae_dtype is not None else dtype)
        return self

    # -- encoding ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent mean (unscaled; deterministic, so cached and on-the-fly latents agree). Non-finite
        latents (a VAE that overflows in its dtype) stop the run: they would poison every step after."""
        vae = self.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        if not torch.isfinite(latents).all():
            raise BaseModelError(
                f"The VAE ({self.vae_name}, {str(vae.dtype).replace('torch.', '')}) turned an image into non-finite "
                "latents. SDXL's own VAE overflows in float16: set [model] vae_dtype = 'float32' (what 'auto' does "
                "for SDXL's VAE under fp16), or [model] vae to a VAE made for float16 (for SDXL: "
                "madebyollin/sdxl-vae-fp16-fix).")
        return latents

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / float(self.vae.config.scaling_factor) + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def pooled(self, texts: list[str]) -> torch.Tensor | None:
        """SDXL: CLIP-G's pooled (projected) embedding of each text, as the WebUI hands the UNet; None for SD 1.5."""
        if self.clip_g is None:
            return None
        tokens = self.clip_g_tokenizer(texts, padding="max_length", truncation=True,
                                       max_length=self.clip_g_tokenizer.model_max_length, return_tensors="pt")
        out = self.clip_g(tokens.input_ids.to(self.clip_g.device))
        return out.text_embeds.float()

    def added_conditions(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None, dtype) -> dict | None:
        if self.family != "sdxl":
            return None
        return {"text_embeds": pooled.to(self.unet.device, dtype), "time_ids": time_ids.to(self.unet.device, dtype)}


def unet_pooled_width(unet_config) -> int | None:
    """The pooled text vector's width in an SDXL UNet's added conditions: the added embedding's input less the six
    size / crop numbers' sinusoidal embeddings (SDXL: 2816 - 6 x 256 = 1280); None for a UNet without them."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda key: getattr(unet_config, key, None)
    if get("addition_embed_type") != "text_time":
        return None
    return int(get("projection_class_embeddings_input_dim")) - 6 * int(get("addition_time_embed_dim"))


def target_of(base: Base, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if base.prediction == "epsilon":
        return noise
    return base.scheduler.get_velocity(latents, noise, timesteps)


# -- loading ------------------------------------------------------------------------------------------------------


def _quiet_diffusers() -> None:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def is_single_file(base: str) -> bool:
    return Path(base).suffix == ".safetensors"


def refuse_pickle(path: str, key: str) -> None:
    """Only safetensors files are read: a pickled checkpoint can run code when it is loaded."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise BaseModelError(
            f"{key} = {path!r} is a pickled checkpoint ({Path(path).suffix}); only .safetensors single files are "
            "read, because loading a pickle can run any code it holds. Use the model's .safetensors release, or "
            "convert the file once with a tool you trust, then point the key at the .safetensors file.")


def _single_file_family(keys: set[str], path: str) -> str:
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise BaseModelError(f"{path} is not an A1111-style SD checkpoint (it has no model.diffusion_model.* "
                             "tensors). Give a full SD 1.5 or SDXL checkpoint, or a diffusers pipeline folder.")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.") for k in keys) and not any(
            k.startswith("conditioner.embedders.1.") for k in keys):
        raise BaseModelError(f"{path} looks like an SDXL refiner (one text encoder); train on an SDXL base model.")
    return "sd15"


def _load_single_file(path: str, config: Config, with_clip_g: bool) -> tuple[str, Any, Any, Any, Any, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise BaseModelError(f"[model] base = {path!r}: no such file.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as exc:  # safetensors raises its own types
        raise BaseModelError(f"{file} could not be read as safetensors ({exc}); it may be a partial download.") from exc
    family = _single_file_family(keys, path)
    wanted = config.model["family"]
    if wanted != "auto" and wanted != family:
        raise ConfigError(f"[model] family = {wanted!r} but {file.name} is an {family} checkpoint; set family = "
                          f"'auto' or {family!r}.")
    folder = _config_folder(config, family, path)
    try:
        part = _file_part(file, keys, "model.diffusion_model.")
        unet = UNet2DConditionModel.from_single_file(part, config=folder, subfolder="unet", local_files_only=True,
                                                     torch_dtype=_stored_dtype(part))
        part = _file_part(file, keys, "first_stage_model.")
        vae = AutoencoderKL.from_single_file(part, config=folder, subfolder="vae", local_files_only=True,
                                             torch_dtype=_stored_dtype(part))
        del part
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except Exception as exc:  # shape mismatches and missing keys surface as many types
        raise BaseModelError(f"{file.name} does not fit the {family} configs in {folder} ({exc}). If it is not a "
                             "standard SD 1.5 / SDXL checkpoint, set [model] base_config to a diffusers folder with "
                             "its unet/, vae/ and scheduler/ configs.") from exc
    clip_g = tokenizer = None
    if family == "sdxl" and with_clip_g:
        clip_g, tokenizer = _single_file_clip_g(_file_part(file, keys, "conditioner.embedders.1."), folder, file.name)
    if "v_pred" in keys and config.model["prediction"] == "auto":
        scheduler.register_to_config(prediction_type="v_prediction")
    return family, unet, vae, scheduler, clip_g, tokenizer


def _file_part(file: Path, keys: set[str], prefix: str) -> dict:
    """One model's tensors of a single file. The parts are read one at a time and each model is built in the
    file's own dtype (load_base converts it once, module by module): reading the whole file and letting diffusers
    build float32 copies beside it took the file's size plus every model in float32 at once (about 19 GiB for an fp16
    SDXL base on the CPU, where the float32 models alone take 12.5 GiB)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in sorted(keys) if key.startswith(prefix)}


def _stored_dtype(part: dict) -> torch.dtype | None:
    return next((tensor.dtype for tensor in part.values() if tensor.is_floating_point()), None)


def _single_file_clip_g(checkpoint: dict, folder: str, name: str):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    try:
        model = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, checkpoint,
                                                     subfolder="text_encoder_2", config=folder, local_files_only=True,
                                                     torch_dtype=_stored_dtype(checkpoint))
    except Exception as exc:
        raise BaseModelError(f"CLIP-G (the SDXL pooled text embedding) could not be read from {name} ({exc}).") \
            from exc
    return model, load_clip_tokenizer(folder)


def load_clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    for candidate in (Path(folder) / "tokenizer_2", CONFIGS / "sdxl" / "tokenizer_2"):
        if (candidate / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(str(candidate))
    raise BaseModelError(
        "SDXL single-file checkpoints need CLIP-G's tokenizer (vocab.json and merges.txt) for the pooled embedding. "
        f"Set [model] base_config to a diffusers SDXL folder that has tokenizer_2/ (with unet/, vae/ and scheduler/ "
        f"configs too), or copy a tokenizer_2 folder into {folder}.")


def _load_folder(base: str, config: Config, with_clip_g: bool) -> tuple[str, Any, Any, Any, Any, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"[model] base = {base!r} is not a diffusers pipeline (folder or hub id with unet/, "
                             f"vae/ and scheduler/) that could be loaded: {exc}") from exc
    family = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd15"
    wanted = config.model["family"]
    if wanted != "auto" and wanted != family:
        raise ConfigError(f"[model] family = {wanted!r} but {base} holds an {family} UNet; set family = 'auto' or "
                          f"{family!r}.")
    clip_g = tokenizer = None
    if family == "sdxl" and with_clip_g:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        try:
            clip_g = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"{base}: SDXL needs text_encoder_2/ and tokenizer_2/ (CLIP-G, for the pooled "
                                 f"text embedding): {exc}") from exc
    return family, unet, vae, scheduler, clip_g, tokenizer


def load_base(config: Config, device: torch.device, dtype: torch.dtype, clip_g: bool = True) -> Base:
    """The frozen base in ``dtype`` on ``device`` (eval mode, no gradients); SDXL's CLIP-G only with ``clip_g``."""
    _quiet_diffusers()
    base = config.resolve(config.model["base"])
    refuse_pickle(base, "[model] base")
    loader = _load_single_file if is_single_file(base) else _load_folder
    family, unet, vae, scheduler, clip_g, tokenizer = loader(base, config, clip_g)
    if unet.config.cross_attention_dim is None or isinstance(unet.config.cross_attention_dim, (list, tuple)):
        raise BaseModelError(f"{base}: the UNet has no single cross-attention width; ELLA conditions SD 1.5 / SDXL "
                             "UNets.")
    prediction = config.model["prediction"]
    if prediction == "auto":
        prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"The base's scheduler predicts {prediction!r}; set [model] prediction to 'epsilon' or "
                          "'v_prediction'.")
    name = short_name(base)
    vae_name = "the base's VAE"
    if config.model["vae"]:
        vae, vae_name = load_vae(config, family, base), short_name(config.resolve(config.model["vae"]))
    result = Base(family, unet, vae, scheduler, prediction, name, clip_g, tokenizer, vae_name)
    result.freeze()
    vae_dtype = vae_dtype_for(config, family, dtype)
    result.to(device, dtype, vae_dtype)
    log.info("ELLA train: base %s (%s, %s-prediction), context width %d; VAE: %s in %s", name, family, prediction,
             result.context_width, vae_name, str(vae_dtype).replace("torch.", ""))
    return result


def short_name(path_or_id: str) -> str:
    """How files and logs name a model: a local file or folder by its name (no server paths in shared files), a hub
    id as written."""
    return Path(path_or_id).name if Path(path_or_id).exists() else path_or_id


def vae_dtype_for(config: Config, family: str, dtype: torch.dtype) -> torch.dtype:
    """[model] vae_dtype; "auto" keeps SDXL's own VAE in float32 when the frozen models run in float16 (it overflows
    there, as diffusers' and kohya's SDXL trainers know: they keep it in fp32 / offer --no_half_vae), and otherwise
    follows the frozen models. A VAE given by [model] vae (e.g. an fp16-fixed one) follows the frozen models."""
    name = config.model["vae_dtype"]
    if name != "auto":
        return getattr(torch, name)
    if family == "sdxl" and dtype == torch.float16 and not config.model["vae"]:
        return torch.float32
    return dtype


def load_vae(config: Config, family: str, base: str):
    """[model] vae: a diffusers AutoencoderKL folder (or a pipeline folder with vae/), a hub id, or a single-file
    .safetensors VAE (A1111's layout; shaped by the base's VAE config)."""
    from diffusers import AutoencoderKL

    path = config.resolve(config.model["vae"])
    refuse_pickle(path, "[model] vae")
    try:
        if is_single_file(path):
            if not Path(path).is_file():
                raise BaseModelError(f"[model] vae = {path!r}: no such file.")
            folder = _config_folder(config, family, base)
            return AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", local_files_only=True)
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file() and (Path(path) / "vae").is_dir():
            return AutoencoderKL.from_pretrained(path, subfolder="vae")
        return AutoencoderKL.from_pretrained(path)
    except BaseModelError:
        raise
    except Exception as exc:  # diffusers and the hub raise many types
        raise BaseModelError(f"[model] vae = {path!r} could not be loaded as a VAE ({exc}). Give a diffusers VAE "
                             "folder (config.json and weights), a pipeline folder with vae/, a hub id, or a "
                             ".safetensors VAE file.") from exc


def _config_folder(config: Config, family: str, base: str) -> str:
    """The diffusers configs that shape single files: [model] base_config, a diffusers base folder, or the carried
    ones."""
    if config.model["base_config"]:
        return config.resolve(config.model["base_config"])
    if not is_single_file(base) and Path(base).is_dir():
        return base
    return str(CONFIGS / family)


# -- the connector ------------------------------------------------------------------------------------------------


def connector_config(config: Config, family: str, llm_width: int, context_width: int,
                     pooled_width: int | None = None) -> ConnectorConfig:
    """The TSC's shape: from ``init_from`` when given (the config's keys must agree), else the family's defaults
    overridden by the config; with [connector] pooled = "attention", an attention pool to ``pooled_width`` (the
    SDXL UNet's pooled vector width, ``Base.pooled_width``)."""
    from dataclasses import replace

    shape = _tsc_shape(config, family, llm_width, context_width)
    return replace(shape, pooled_width=_pool_width(config, family, shape, pooled_width))


def _pool_width(config: Config, family: str, shape: ConnectorConfig, pooled_width: int | None) -> int | None:
    """The pool's output width for [connector] pooled, checked against the base and init_from's file: a file with
    a pool trains on only with pooled = "attention" and the base's width; a file without one gets a new pool."""
    from .config import POOLED_SD15

    section = config.connector
    name = Path(section["init_from"]).name if section["init_from"] else None
    if section["pooled"] == "clip":
        if shape.pooled_width is not None:
            raise ConfigError(f"[connector] init_from {name} has an attention pool (its file says ella.pooled = "
                              "attention) but [connector] pooled is 'clip': set pooled = 'attention' to train it "
                              "on, or start from a connector without a pool.")
        return None
    if family != "sdxl":
        raise ConfigError(POOLED_SD15)
    if pooled_width is None:
        raise ConfigError("[connector] pooled = 'attention': this SDXL UNet's config gives no pooled vector width.")
    if shape.pooled_width is not None and shape.pooled_width != pooled_width:
        raise ConfigError(f"[connector] init_from {name} pools to {shape.pooled_width} wide vectors but this base's "
                          f"UNet takes {pooled_width}: it was made for another base. Start from a connector made "
                          "for this base, or remove init_from.")
    if name is not None and shape.pooled_width is None:
        log.info("ELLA train: init_from %s has no attention pool; a new one is trained with it", name)
    return pooled_width


def _tsc_shape(config: Config, family: str, llm_width: int, context_width: int) -> ConnectorConfig:
    from ..connector_file import read_config

    section = config.connector
    if section["init_from"]:
        path = config.resolve(section["init_from"])
        shape = read_config(path)
        name = Path(path).name
        given = {"width": shape.width, "layers": shape.layers, "heads": shape.heads, "latents": shape.num_latents,
                 "out_width": shape.out_width, "time_channels": shape.time_channels}
        set_keys = [key for key in given if section[key] is not None and section[key] != given[key]]
        if set_keys:
            listed = ", ".join(f"{key} = {section[key]} (the file: {given[key]})" for key in set_keys)
            raise ConfigError(f"[connector] {listed} disagree{'s' if len(set_keys) == 1 else ''} with init_from "
                              f"{name}, whose shape is fixed by its weights: remove the key"
                              f"{'s' if len(set_keys) > 1 else ''} from [connector].")
        if shape.out_width != context_width:
            raise ConfigError(f"[connector] init_from {name} gives {shape.out_width}-wide tokens but this base's UNet "
                              f"takes a {context_width}-wide context: it was made for another model family. Start "
                              "from a connector made for this base, or remove init_from to train a new one.")
        if shape.in_width != llm_width:
            raise ConfigError(f"[connector] init_from {name} reads {shape.in_width}-wide LLM features but "
                              f"[model] llm gives {llm_width}; use the LLM the connector was trained with.")
        return shape
    defaults = FAMILY_DEFAULTS[family]
    value = {k: section[k] if section[k] is not None else defaults[k] for k in defaults}
    width = value["width"]
    if width % value["heads"]:
        raise ConfigError(f"[connector] width = {width} cannot be split into heads = {value['heads']}; pick a "
                          "head count that divides the width.")
    out = section["out_width"] or context_width
    if out != context_width:
        raise ConfigError(f"[connector] out_width = {out} but the UNet's context is {context_width} wide; remove the "
                          "key (it defaults to the UNet's width).")
    return ConnectorConfig(time_channels=value["time_channels"], time_embed_dim=width, width=width,
                           layers=value["layers"], heads=value["heads"], num_latents=value["latents"],
                           input_dim=llm_width, output_dim=None if out == width else out)


def init_connector(shape: ConnectorConfig, seed: int) -> Connector:
    """A fresh TSC initialised as the reference does (AdaLN modulations zero, latents ~ N(0, 1/width), attention
    Xavier-uniform with zero biases, linears PyTorch's default), from ``seed`` on the CPU so every process and device
    starts from the same weights."""
    generator = torch.Generator().manual_seed(seed)
    model = Connector(shape)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("pool."):  # drawn after the TSC's: a pool leaves the TSC's start as it was
                continue
            if isinstance(module, torch.nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)  # PyTorch's default (kaiming_uniform with a = sqrt(5))
                module.weight.copy_(torch.empty_like(module.weight).uniform_(-bound, bound, generator=generator))
                module.bias.copy_(torch.empty_like(module.bias).uniform_(-bound, bound, generator=generator))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            del name
        for norm in model._modulation_layers()[1:]:  # every AdaLN: zero, so each block starts as a plain LayerNorm
            norm.weight.zero_()
            norm.bias.zero_()
        for block in model.connector.perceiver_blocks:
            w = block.attn.in_proj_weight
            bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
            w.copy_(torch.empty_like(w).uniform_(-bound, bound, generator=generator))
            block.attn.in_proj_bias.zero_()
            block.attn.out_proj.bias.zero_()
        latents = model.connector.latents
        latents.copy_(torch.randn(latents.shape, generator=generator) * shape.width ** -0.5)
        if model.has_pool:
            _init_pool(model.pool, generator)
    return model


def _init_pool(pool: torch.nn.Module, generator: torch.Generator) -> None:
    """The attention pool's start: linears PyTorch's default, the query ~ N(0, 1/width), and the output projection
    zero, so the pooled vector starts at 0 (what A1111 and Forge give SDXL for an empty negative prompt) and grows
    from what training teaches it."""
    for module in (pool.proj_in, pool.kv):
        bound = 1.0 / math.sqrt(module.in_features)
        module.weight.copy_(torch.empty_like(module.weight).uniform_(-bound, bound, generator=generator))
        module.bias.copy_(torch.empty_like(module.bias).uniform_(-bound, bound, generator=generator))
    pool.query.copy_(torch.randn(pool.query.shape, generator=generator) * pool.query.shape[0] ** -0.5)
    pool.norm.weight.fill_(1.0)
    pool.norm.bias.zero_()
    pool.proj_out.weight.zero_()
    pool.proj_out.bias.zero_()


def load_or_init_connector(config: Config, shape: ConnectorConfig) -> Connector:
    from ..connector_file import load_connector

    if config.connector["init_from"]:
        model = load_connector(config.resolve(config.connector["init_from"]), "cpu", torch.float32)
        if shape.pooled_width is not None and not model.has_pool:  # the file's TSC, a new pool beside it
            tsc, model = model, init_connector(shape, config.train["seed"])
            missing, unexpected = model.load_state_dict(tsc.state_dict(), strict=False)
            assert not unexpected and all(key.startswith("pool.") for key in missing), (missing, unexpected)
    else:
        model = init_connector(shape, config.train["seed"])
    model.requires_grad_(True)
    return model.train()
