"""The trainer's one TOML config, validated: unknown keys and bad values are refused with a message that names the
key and what is allowed. ``--set section.key=value`` overrides are applied before validation.

Every key, its default and its meaning is listed in ``KEYS`` (the README's table is made from the same facts).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ELLAError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ELLAError):
    """The training config is wrong: the message names the key and what is allowed."""


_NO_DEFAULT = object()


@dataclass(frozen=True)
class Key:
    kind: type | tuple[type, ...]
    default: Any = _NO_DEFAULT
    help: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # strictly greater than
    item: type = str  # lists: the kind of each entry


# section -> key -> Key. ``None`` default = optional ("not set").
KEYS: dict[str, dict[str, Key]] = {
    "model": {
        "base": Key(str, help="diffusers pipeline folder, hub id, or A1111-style single-file .safetensors "
                              "(SD 1.5 or SDXL)"),
        "base_config": Key(str, "", help="single-file bases only: a diffusers-layout config folder instead of the "
                                          "configs the project carries (for a checkpoint of another shape)"),
        "family": Key(str, "auto", "base model family", choices=("auto", "sd15", "sdxl")),
        "prediction": Key(str, "auto", "the UNet's target; auto = the scheduler config (epsilon for single files)",
                          choices=("auto", "epsilon", "v_prediction")),
        "llm": Key(str, help="LLM folder or hub id (anything ella_ext.load_text_encoder takes)"),
        "llm_layer": Key(int, -1, "decoder-only LLMs: the hidden state used (-1 = last)"),
        "llm_dtype": Key(str, "auto", "the LLM's precision (auto: float16 on CUDA, float32 on CPU)",
                         choices=("auto", "float16", "bfloat16", "float32")),
        "token_length": Key(str, "fixed", "fixed pads to max_length like the reference; flexible masks padding",
                            choices=("fixed", "flexible")),
        "max_length": Key(int, 128, "tokens the LLM reads (fixed: padded to it; flexible: truncated at it)", minimum=1),
        "allow_other_llm": Key(bool, False, "resume or init_from a connector made with another LLM or LLM layer than "
                                            "[model] says (false: refused; true: a warning)"),
        "vae": Key(str, "", help="another VAE instead of the base's: a diffusers folder, hub id or single-file "
                                 ".safetensors (e.g. an fp16-fixed SDXL VAE)"),
        "vae_dtype": Key(str, "auto", "the VAE's precision; auto = float32 for SDXL's own VAE under fp16 (it "
                                      "overflows in fp16), else the frozen models' precision",
                         choices=("auto", "float32", "float16", "bfloat16")),
    },
    "connector": {
        "init_from": Key(str, "", help="an existing connector to fine-tune (its shape comes from the file)"),
        "width": Key(int, None, "resampler width (paper: 768 for sd15, 2048 for sdxl)", minimum=8),
        "layers": Key(int, None, "perceiver blocks (6)", minimum=1),
        "heads": Key(int, None, "attention heads (8 for sd15, 16 for sdxl)", minimum=1),
        "latents": Key(int, None, "output tokens (64)", minimum=1),
        "out_width": Key(int, None, "output width (default: the UNet's context width)", minimum=1),
        "time_channels": Key(int, None, "sinusoidal timestep channels (320)", minimum=2),
        "pooled": Key(str, "clip", "SDXL's pooled text vector: clip = CLIP-G's of the caption (as the WebUIs make "
                                   "it); attention = an attention pool over the LLM features, trained with the "
                                   "connector and saved in its file", choices=("clip", "attention")),
    },
    "data": {
        "resolution": Key(int, 512, "training resolution in pixels (bucket area = resolution^2)", minimum=8),
        "bucketing": Key(bool, True, "aspect-ratio buckets (false: centre square crops)"),
        "bucket_step": Key(int, 64, "bucket sides are multiples of this (pixels)", minimum=8),
        "bucket_max_ratio": Key(float, 2.0, "the most elongated bucket (long side / short side)", minimum=1.0),
        "caption_extension": Key(str, ".txt", "folders of images: the caption file's extension"),
        "empty_captions": Key(str, "skip", "an empty caption (file, metadata.jsonl text or shard txt): skip leaves "
                                           "the image out (named in skipped.txt), keep trains it on the empty text "
                                           "(as caption dropout), error refuses to start and names the files",
                              choices=("skip", "keep", "error")),
    },
    "data.sources": {
        "path": Key(str, help="a folder of images with .txt captions, a folder with metadata.jsonl, or .tar "
                              "webdataset shards (a .tar file, a folder of them, or a brace pattern)"),
        "repeats": Key(int, 1, "how many times each image appears per epoch", minimum=1),
        "caption_dropout": Key(float, 0.05, "probability of training on the empty text instead of the caption",
                               minimum=0.0, maximum=1.0),
    },
    "train": {
        "steps": Key(int, help="optimiser steps", minimum=1),
        "batch_size": Key(int, 1, "images per process per micro-batch", minimum=1),
        "grad_accum": Key(int, 1, "micro-batches per optimiser step", minimum=1),
        "lr": Key(float, None, "peak learning rate; unset = the paper's: 1e-4 for sd15, 1e-5 for sdxl", above=0.0),
        "lr_schedule": Key(str, "constant", "after the warm-up: constant, or a cosine / linear decay to 0 at [train] "
                                            "steps", choices=("constant", "cosine", "linear")),
        "weight_decay": Key(float, 0.01, "AdamW weight decay", minimum=0.0),
        "warmup_steps": Key(int, 0, "linear warm-up from 0 to lr over these steps, then lr_schedule", minimum=0),
        "max_grad_norm": Key(float, 1.0, "gradient clipping norm (0 = off)", minimum=0.0),
        "optimizer": Key(str, "adamw", "adamw8bit needs bitsandbytes", choices=("adamw", "adamw8bit")),
        "mixed_precision": Key(str, "no", "frozen models' precision and autocast; the TSC keeps fp32 weights",
                               choices=("no", "fp16", "bf16")),
        "gradient_checkpointing": Key(bool, False, "recompute the frozen UNet's activations in the backward"),
        "min_snr_gamma": Key(float, 0.0, "Min-SNR loss weighting, min(SNR, gamma) / SNR (Hang et al. 2023; 5 is "
                                         "their choice; 0 = off, the paper's plain MSE)", minimum=0.0),
        "noise_offset": Key(float, 0.0, "offset noise: a per-channel constant times this is added to the noise "
                                        "(Guttenberg 2023; e.g. 0.05; 0 = off)", minimum=0.0, maximum=1.0),
        "seed": Key(int, 0, "every random draw (init, data order, dropout, timesteps, noise) follows from it",
                    minimum=0),
        "ema": Key(float, 0.0, "EMA decay of the saved weights (0 = off, e.g. 0.999)", minimum=0.0, maximum=0.999999),
        "save_precision": Key(str, "fp16", "the connector files' precision (the official file is fp16; "
                                           "checkpoints keep fp32)", choices=("fp16", "bf16", "fp32")),
        "trackers": Key(list, ["tensorboard"], "where metrics and sample images go: tensorboard, wandb (needs "
                                               "pip install wandb); [] = metrics.jsonl only"),
        "save_every": Key(int, 0, "steps between connector-step{N} files and checkpoints (0 = only at the end)",
                          minimum=0),
        "sample_every": Key(int, 0, "steps between sample images (0 = never; also at the end when prompts are set)",
                            minimum=0),
        "log_every": Key(int, 1, "steps between metrics.jsonl lines (and the last step)", minimum=1),
        "keep_checkpoints": Key(int, 2, "resumable checkpoints kept (0 = all)", minimum=0),
        "check_sync_every": Key(int, 0, "steps between checks that every process holds the same weights (0 = off)",
                                minimum=0),
        "output": Key(str, help="output folder"),
        "cache": Key(str, "", help="a cache folder of latents and LLM features (made by `cache` if missing); "
                                   "empty = encode on the fly"),
        "workers": Key(int, 2, "data loader worker processes (0 = in the main process)", minimum=0),
    },
    "sample": {
        "prompts": Key(list, [], "prompts for sample images"),
        "steps": Key(int, 20, "sampling steps (DDIM)", minimum=1),
        "cfg": Key(float, 5.0, "classifier-free guidance scale (negative = the empty text)", minimum=0.0),
        "seed": Key(int, 0, "sampling seed", minimum=0),
        "resolution": Key(int, 0, "image side in pixels (0 = [data] resolution)", minimum=0),
    },
    "validation": {
        "path": Key(str, "", help="a folder (or shards) of held-out images, never trained on: any kind "
                                  "[[data.sources]] path takes; empty = none"),
        "split": Key(float, 0.0, "or this fraction of the training data held out, chosen by a hash of each file "
                                 "name (or shard sample key): the same files on every run; 0 = off", minimum=0.0,
                     maximum=0.5),
        "every": Key(int, 0, "steps between held-out losses (val_loss; 0 = only at the end when path or split is "
                             "set)", minimum=0),
        "timesteps": Key(list, [100, 300, 500, 700, 900], "the timesteps every held-out image is scored at",
                         item=int),
        "max_items": Key(int, 64, "held-out images scored (the first ones in file order)", minimum=1),
        "batch_size": Key(int, 0, "images per forward pass (0 = [train] batch_size)", minimum=0),
        "seed": Key(int, 0, "the held-out noise's seed (fixed per image and timestep)", minimum=0),
        "eval_every": Key(int, 0, "steps between judge scores (eval_score, as `eval` scores; 0 = off; also at the "
                                  "end when set)", minimum=0),
        "questions": Key(str, "", help="eval_every: a small question file (.jsonl or DPG-Bench .csv; a few dozen "
                                       "prompts: the main process makes and judges their images)"),
        "judge": Key(str, "", help="eval_every: the judge (a VQA model folder or hub id, or module:function)"),
        "eval_images": Key(int, 1, "eval_every: images per prompt", minimum=1),
    },
}
SECTIONS = ("model", "connector", "data", "train", "sample", "validation")
TRACKERS = ("tensorboard", "wandb")
# The paper's learning rates (ELLA, arXiv 2403.05135): SD 1.5 at 1e-4, SDXL at 1e-5.
FAMILY_LR = {"sd15": 1e-4, "sdxl": 1e-5}


@dataclass
class Source:
    path: str
    repeats: int = 1
    caption_dropout: float = 0.05


@dataclass
class Config:
    """The validated config: ``section[key]`` dicts with defaults filled in, and ``sources`` for [[data.sources]]."""

    model: dict[str, Any]
    connector: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    sample: dict[str, Any]
    validation: dict[str, Any]
    sources: list[Source] = field(default_factory=list)
    path: Path | None = None  # the TOML file (relative paths in it are relative to its folder)

    def resolve(self, value: str) -> str:
        """A path from the config: relative to the config file's folder when it exists there, else as written (a
        path relative to the working folder, or a hub id)."""
        if not value or self.path is None or Path(value).expanduser().is_absolute():
            return str(Path(value).expanduser()) if value else value
        candidate = self.path.parent / value
        return str(candidate) if candidate.exists() else value

    def resolve_new(self, value: str) -> Path:
        """A folder the trainer writes (output, cache): relative to the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.path is None else self.path.parent / p

    @property
    def output(self) -> Path:
        return self.resolve_new(self.train["output"])

    @property
    def cache_dir(self) -> Path | None:
        return self.resolve_new(self.train["cache"]) if self.train["cache"] else None


def _kind_name(kind) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list"}
    return names.get(kind, str(kind))


def _check_value(where: str, spec: Key, value: Any) -> Any:
    kind = spec.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where} must be {_kind_name(kind)}; got {value!r}.")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number; got {value!r}.")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where} = {value!r} is not allowed; use one of: {', '.join(map(repr, spec.choices))}.")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{where} = {value!r} is too small; it must be at least {spec.minimum}.")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{where} = {value!r} is too large; it must be at most {spec.maximum}.")
    if spec.above is not None and value <= spec.above:
        raise ConfigError(f"{where} = {value!r} must be greater than {spec.above}.")
    if kind is list and not all(isinstance(v, spec.item) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} must be a list of {'strings' if spec.item is str else 'whole numbers'}; got "
                          f"{value!r}.")
    return value


def _check_section(name: str, table: Any) -> dict[str, Any]:
    spec = KEYS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table of keys; got {table!r}.")
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ConfigError(
            f"Unknown key{'s' if len(unknown) > 1 else ''} in [{name}]: {', '.join(unknown)}. "
            f"Allowed: {', '.join(spec)}."
        )
    out = {}
    for key, key_spec in spec.items():
        where = f"[{name}] {key}"
        if key in table:
            out[key] = _check_value(where, key_spec, table[key])
        elif key_spec.default is _NO_DEFAULT:
            raise ConfigError(f"{where} is required ({key_spec.help}).")
        else:
            out[key] = list(key_spec.default) if isinstance(key_spec.default, list) else key_spec.default
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` (the value in TOML syntax; a bare word is taken as a string)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. --set train.steps=1000.")
    name, raw = text.split("=", 1)
    parts = name.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the name must be section.key, e.g. train.lr; got {name!r}.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"No config file at {path}. Write a TOML file (see the README's training section).")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
    for text in overrides:
        (section, key), value = parse_override(text)
        if section == "sources":
            raise ConfigError("--set cannot change [[data.sources]]; edit the config file.")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table.")
        raw[section][key] = value
    return validate(raw, path)


def validate(raw: dict[str, Any], path: Path | None = None) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown section{'s' if len(unknown) > 1 else ''}: {', '.join(f'[{u}]' for u in unknown)}. "
                          f"Allowed: {', '.join(f'[{s}]' for s in SECTIONS)}.")
    for required in ("model", "train"):
        if required not in raw:
            raise ConfigError(f"The config has no [{required}] section; it needs at least [model] base, [model] llm, "
                              "[train] steps and [train] output.")
    data_raw = dict(raw.get("data", {}))
    sources_raw = data_raw.pop("sources", [])
    sections = {name: _check_section(name, raw.get(name, {}) if name != "data" else data_raw) for name in SECTIONS}
    if not isinstance(sources_raw, list):
        raise ConfigError("[[data.sources]] must be an array of tables (write [[data.sources]] above each source).")
    sources = []
    for table in sources_raw:
        sources.append(Source(**_check_section("data.sources", table)))
    config = Config(**sections, sources=sources, path=path)
    _check_combinations(config)
    return config


def _check_combinations(config: Config) -> None:
    data = config.data
    if data["resolution"] % data["bucket_step"]:
        raise ConfigError(f"[data] resolution = {data['resolution']} must be a multiple of [data] bucket_step = "
                          f"{data['bucket_step']}.")
    if config.model["token_length"] == "fixed" and config.model["max_length"] > 4096:
        raise ConfigError("[model] max_length is above 4096: fixed length pads every caption to it; lower it.")
    if not data["caption_extension"].startswith("."):
        raise ConfigError(f"[data] caption_extension = {data['caption_extension']!r} must start with a dot, "
                          "e.g. '.txt'.")
    unknown = sorted(set(config.train["trackers"]) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"[train] trackers: {', '.join(map(repr, unknown))} unknown; use any of "
                          f"{', '.join(map(repr, TRACKERS))}, or [] for metrics.jsonl only.")
    if config.train["warmup_steps"] >= config.train["steps"] and config.train["lr_schedule"] != "constant":
        raise ConfigError(f"[train] warmup_steps = {config.train['warmup_steps']} leaves no step for the "
                          f"{config.train['lr_schedule']} decay of {config.train['steps']} steps; lower it.")
    if config.connector["pooled"] == "attention" and config.model["family"] == "sd15":
        raise ConfigError(POOLED_SD15)
    _check_validation(config.validation)


POOLED_SD15 = ("[connector] pooled = 'attention' is for SDXL, whose UNet takes a pooled text vector; SD 1.5 takes "
               "none. Remove the key (or set it to 'clip') for an SD 1.5 base.")


def _check_validation(validation: dict[str, Any]) -> None:
    if validation["path"] and validation["split"]:
        raise ConfigError("[validation] path and split are both set: give one, a folder of held-out images (path) "
                          "or a fraction of the training data to hold out (split).")
    if validation["every"] and not (validation["path"] or validation["split"]):
        raise ConfigError(f"[validation] every = {validation['every']} needs held-out images: set [validation] "
                          "path (a folder of them) or split (e.g. 0.01 of the training data).")
    if validation["eval_every"] and not (validation["questions"] and validation["judge"]):
        raise ConfigError(f"[validation] eval_every = {validation['eval_every']} needs [validation] questions (a "
                          "small .jsonl or .csv question file) and [validation] judge (a VQA model folder or hub id, "
                          "or module:function).")
    timesteps = validation["timesteps"]
    if not timesteps or min(timesteps) < 0 or len(set(timesteps)) != len(timesteps):
        raise ConfigError(f"[validation] timesteps = {timesteps!r} must be a non-empty list of different training "
                          "timesteps from 0 up, e.g. [100, 300, 500, 700, 900].")


# Keys that name files or folders: written absolute in the saved config, so it runs from anywhere.
PATH_KEYS = {("model", "base"), ("model", "base_config"), ("model", "llm"), ("model", "vae"),
             ("connector", "init_from"), ("data.sources", "path"), ("validation", "path"),
             ("validation", "questions"), ("validation", "judge")}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _saved_path(config: Config, value: str) -> str:
    resolved = config.resolve(value)
    return str(Path(resolved).resolve()) if resolved and Path(resolved).exists() else value


def run_config_text(config: Config) -> str:
    """The config as the run used it, as TOML: every key with its default filled in and --set applied, paths made
    absolute. ``load_config`` reads it back to the same values."""
    lines = ["# The config this run used: defaults filled in, --set overrides applied, paths made absolute.",
             "# Written by python -m ella_ext.train. To repeat the run: train --config this file, with another",
             "# [train] output (--set train.output=...)."]
    for name in SECTIONS:
        lines += ["", f"[{name}]"]
        for key, value in getattr(config, name).items():
            if value is None:
                lines.append(f"# {key}: unset ({KEYS[name][key].help})")
                continue
            if (name, key) in PATH_KEYS:
                value = _saved_path(config, value)
            if name == "train" and key in ("output", "cache") and value:
                value = str(config.resolve_new(value).resolve())
            lines.append(f"{key} = {_toml_value(value)}")
    for source in config.sources:
        lines += ["", "[[data.sources]]"]
        for key in KEYS["data.sources"]:
            value = getattr(source, key)
            lines.append(f"{key} = {_toml_value(_saved_path(config, value) if key == 'path' else value)}")
    return "\n".join(lines) + "\n"


def write_run_config(config: Config, path: Path) -> None:
    path.write_text(run_config_text(config), encoding="utf-8")
