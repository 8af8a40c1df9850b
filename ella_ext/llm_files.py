"""Reading an LLM folder (or hub id) safely: its config, its tokenizer and its weights, with the checks that keep a
wrong or half-loaded model from giving features silently (an empty vocabulary, a converted tokenizer with other ids,
weights that did not land). ``text_encoders.py`` builds the encoder on top of these."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch

from .errors import TextEncoderError

T5_FAMILY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
FALLBACK_LIMIT = 512  # T5's tokenizers declare 512; relative positions allow more but the models were not trained so


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def read_config(path_or_id: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path_or_id)
    except OSError as exc:
        raise TextEncoderError(
            f"No text encoder found at {path_or_id!r} ({exc}). Put the model folder (with config.json) in "
            "models/ELLA/text_encoders, or give a Hugging Face hub id; offline, the model must be in the hub cache."
        ) from exc
    except (ValueError, KeyError) as exc:
        model_type = _declared_model_type(path_or_id)
        if model_type:
            raise TextEncoderError(family_message(path_or_id, model_type, exc)) from exc
        raise TextEncoderError(
            f"{path_or_id!r} does not hold a model config.json that transformers {installed_versions()[0]} can read "
            f"({exc!r}); if its model type is newer than this transformers, update transformers."
        ) from exc


# The first transformers release that has each family (its models/<family>/ folder and its AutoConfig entry), read in
# the released wheels: 4.27.4 lacks llama, 4.28.0 has it; 4.33.3 / 4.34.0 mistral; 4.36.2 / 4.37.0 qwen2;
# 4.37.2 / 4.38.0 gemma; 4.40.2 / 4.41.0 phi3 (4.40 has no Phi-3); 4.41.2 / 4.42.0 gemma2.
FIRST_TRANSFORMERS = {"llama": "4.28.0", "mistral": "4.34.0", "qwen2": "4.37.0", "gemma": "4.38.0",
                      "phi3": "4.41.0", "gemma2": "4.42.0"}
FAMILY_NAMES = {"t5": "T5", "mt5": "mT5", "umt5": "UMT5", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                "gemma": "Gemma", "gemma2": "Gemma 2", "phi3": "Phi-3", "phi": "Phi"}
# The transformers of the WebUIs this extension runs in (requirements_versions.txt of each).
A1111_TRANSFORMERS = "4.30.2"  # AUTOMATIC1111 1.10, and Forge classic (ldm_patched)
FORGE_TRANSFORMERS = "4.46.1"  # Forge (its current backend/)
_PINS = (f"AUTOMATIC1111 1.10 (and Forge classic) pin transformers {A1111_TRANSFORMERS}, and a newer one may break the "
         "WebUI or other extensions")
SENTENCEPIECE_FAMILIES = {"llama", "mistral", "gemma", "gemma2", "phi3"}  # a slow tokenizer.model in their releases


def installed_versions() -> tuple[str, str]:
    """The installed transformers and tokenizers versions (tests replace this to play an older WebUI)."""
    import transformers

    try:
        import tokenizers

        tokenizers_version = tokenizers.__version__
    except ImportError:
        tokenizers_version = "none"
    return transformers.__version__, tokenizers_version


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def family_name(model_type: str) -> str:
    return FAMILY_NAMES.get(model_type, model_type)


def _local_file(path_or_id: str, name: str) -> Path | None:
    """A file of a model folder, or of a hub id's copy in the hub cache; None when there is none."""
    folder = Path(path_or_id).expanduser()
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    with contextlib.suppress(Exception):  # not a hub id, or no cache: nothing to read
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path_or_id, name)
        if isinstance(cached, str):
            return Path(cached)
    return None


def _declared_model_type(path_or_id: str) -> str:
    """config.json's model_type read as plain JSON (transformers may not know it), or "" when it cannot be read."""
    import json

    file = _local_file(path_or_id, "config.json")
    try:
        model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type") if file else None
    except (OSError, ValueError, AttributeError):
        return ""
    return model_type if isinstance(model_type, str) else ""


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _update_advice(needed: str, family: str) -> str:
    """What to do when this transformers is too old for ``family``: Forge where its transformers has it, or an update
    in this WebUI (with its risk), or another LLM."""
    in_forge = bool(needed) and _version(needed) <= _version(FORGE_TRANSFORMERS)
    forge = f"run it in the current Forge (its transformers {FORGE_TRANSFORMERS} has {family}), or " if in_forge else ""
    pin = f"transformers=={FORGE_TRANSFORMERS}" if in_forge else f'"transformers>={needed}"' if needed else (
        "-U transformers")
    known = ", ".join(name for model_type, name in FAMILY_NAMES.items() if model_type in _known_model_types())
    return (f"To use it, {forge}update transformers in this WebUI's own Python environment (pip install {pin}, which "
            f"brings a newer tokenizers too): {_PINS} (pip install transformers=={installed_versions()[0]} undoes it). "
            f"Or choose an LLM of a family this transformers has ({known}).")


def family_message(path_or_id: str, model_type: str, exc: BaseException) -> str:
    """Why transformers cannot read a config.json that names ``model_type``, and what to do."""
    installed = installed_versions()[0]
    family = family_name(model_type)
    needed = FIRST_TRANSFORMERS.get(model_type, "")
    if model_type not in _known_model_types():
        need = (f"{family} needs transformers {needed} or later" if needed
                else f"it needs a transformers newer than {installed}")
        return (f"{path_or_id!r} is a {family} model (config.json's model_type {model_type!r}), which this "
                f"transformers ({installed}) does not know: {need}. {_update_advice(needed, family)}")
    return (f"{path_or_id!r} is a {family} model (model_type {model_type!r}) whose config.json transformers "
            f"{installed} cannot read ({exc!r}): later releases of a family can need a newer transformers than the "
            f"family's first. {_update_advice('', family)}")


def read_tokenizer(path_or_id: str, model_type: str):
    import transformers

    try:
        if model_type in T5_FAMILY:  # the reference's tokenizer class; mT5 and UMT5 ship the same kind
            tokenizer = transformers.T5Tokenizer.from_pretrained(path_or_id)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_id, **_tokenizer_kwargs(path_or_id))
        if not callable(tokenizer):  # seen: transformers 4.46 returns False for an unreadable spiece.model
            raise ValueError(f"transformers returned {tokenizer!r} for it")
    except Exception as exc:  # transformers and sentencepiece raise many types here, varying by version
        raise TextEncoderError(tokenizer_message(path_or_id, model_type, exc)) from exc
    _check_vocabulary(tokenizer, path_or_id)
    if tokenizer.pad_token is None:  # decoder-only LLMs often have none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_message(path_or_id: str, model_type: str, exc: BaseException) -> str:
    """Why a tokenizer did not load, naming the files this family's tokenizer reads and what to do."""
    family = family_name(model_type)
    unreadable = _unreadable_tokenizer_json(_local_file(path_or_id, "tokenizer.json"))
    if unreadable:
        transformers_version, tokenizers_version = installed_versions()
        if _local_file(path_or_id, "tokenizer.model"):
            fix = ("A slow tokenizer file helps, and the folder has one (the sentencepiece tokenizer.model): move "
                   "tokenizer.json out of the folder and the slow tokenizer reads tokenizer.model instead. Or ")
        elif model_type in SENTENCEPIECE_FAMILIES:
            fix = (f"A slow tokenizer file helps: put the sentencepiece tokenizer.model of the {family} release this "
                   "folder comes from in it, and move tokenizer.json out. Or ")
        else:
            fix = "To use it, "
        return (f"The tokenizer.json of the {family} model {path_or_id!r} cannot be read by this tokenizers library "
                f"({tokenizers_version}, with transformers {transformers_version}): it was written by a newer "
                f"tokenizers ({unreadable}). {fix}run it in the current Forge (its transformers {FORGE_TRANSFORMERS} "
                "reads it), or update transformers in this WebUI's own Python environment, which brings a newer "
                f"tokenizers: {_PINS}.")
    if model_type in T5_FAMILY:
        files = "spiece.model, and sentencepiece must be installed"
    elif model_type in SENTENCEPIECE_FAMILIES:
        files = "tokenizer.json or the sentencepiece tokenizer.model, with tokenizer_config.json"
    else:
        files = "tokenizer.json, or the files its tokenizer class reads, with tokenizer_config.json"
    return (f"The tokenizer of the {family} model {path_or_id!r} could not be loaded ({exc}). The folder needs its "
            f"tokenizer files ({files}).")


def _unreadable_tokenizer_json(file: Path | None) -> str:
    """Why the installed tokenizers library cannot parse ``file``, a well-formed JSON file (its error), or "" when it
    can, or there is none, or it is no JSON at all (a damaged file is not a format question)."""
    import json

    if file is None:
        return ""
    try:
        json.loads(file.read_text(encoding="utf-8"))
        from tokenizers import Tokenizer
    except (OSError, ValueError, ImportError):
        return ""
    try:
        Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust parser raises plain Exception: "data did not match any variant of ..."
        return str(exc)
    return ""


def _tokenizer_kwargs(path_or_id: str) -> dict:
    """A folder with a sentencepiece ``tokenizer.model`` but no ``tokenizer.json`` is read by its slow tokenizer on
    transformers before 4.46: older ones build the fast tokenizer by converting the sentencepiece model, and for
    Llama-style models 4.30 (A1111 1.10's) gives other ids than sentencepiece itself ("a": [92, 95] instead of [3]),
    so the LLM would read other tokens than it was trained on. Later versions convert it faithfully."""
    import transformers

    folder = Path(path_or_id).expanduser()
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    sentencepiece_only = (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()
    if (major, minor) < (4, 46) and sentencepiece_only:
        return {"use_fast": False}
    return {}


def _check_vocabulary(tokenizer, path_or_id: str) -> None:
    """Some transformers versions build an empty tokenizer when the vocabulary file is missing: refuse it."""
    ids = tokenizer("a photo of a cat", add_special_tokens=False)["input_ids"]
    if "cat" not in tokenizer.decode(ids, skip_special_tokens=True):
        raise TextEncoderError(
            f"The tokenizer of {path_or_id!r} knows no words (it cannot spell 'a photo of a cat'): its vocabulary file "
            "(spiece.model or tokenizer.json) is missing or empty. Download the text encoder folder again."
        )


def read_model(path_or_id: str, config, dtype: torch.dtype):
    import transformers

    if config.model_type in T5_FAMILY:
        cls = getattr(transformers, T5_FAMILY[config.model_type], None)
        if cls is None:
            raise TextEncoderError(
                f"This transformers ({transformers.__version__}) has no {T5_FAMILY[config.model_type]}; "
                "update transformers to load this text encoder."
            )
    else:
        cls = transformers.AutoModel
    try:
        with _loading_classmethods_intact():
            model = cls.from_pretrained(path_or_id, config=config, use_safetensors=True, **_dtype_kwargs(dtype))
    except Exception as exc:  # transformers and safetensors raise many types here, varying by version
        raise TextEncoderError(
            f"The weights of {path_or_id!r} could not be loaded ({exc}). Text encoders load from .safetensors "
            "files only; if the folder has only pytorch_model.bin, convert it or download the safetensors release."
        ) from exc
    _check_weights_landed(model, path_or_id)
    return model


@contextlib.contextmanager
def _loading_classmethods_intact():
    """transformers' ``PreTrainedModel`` loading classmethods as transformers defines them, for one load.

    AUTOMATIC1111 1.10 swaps ``PreTrainedModel._load_pretrained_model`` while it loads a checkpoint
    (``modules/sd_disable_initialization.py``) and then sets back what ``getattr`` gave it: a method bound to
    ``PreTrainedModel`` instead of the classmethod. Every later ``from_pretrained`` then loads as ``PreTrainedModel``
    (no ``base_model_prefix``), so a ``*ForCausalLM`` folder's ``model.``-prefixed weights land nowhere and a Llama,
    Qwen or Phi keeps its random initialisation, silently (T5 folders need no prefix and load). A bound method found
    on the class is made a classmethod again for this load, and put back as found afterwards."""
    import inspect

    from transformers import PreTrainedModel

    broken = {name: value for name, value in vars(PreTrainedModel).items()
              if inspect.ismethod(value) and value.__self__ is PreTrainedModel}
    for name, value in broken.items():
        setattr(PreTrainedModel, name, classmethod(value.__func__))
    try:
        yield
    finally:
        for name, value in broken.items():
            setattr(PreTrainedModel, name, value)


def _check_weights_landed(model, path_or_id: str) -> None:
    """The smallest matrix of a local folder's weights file, compared with the loaded model's: a load that left the
    model at its random initialisation (a patched loader, a renamed checkpoint layout) fails here instead of giving
    wrong images without a word. (Matrices only: a norm's weights may equal their initial ones.)"""
    folder = Path(path_or_id).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return
    from safetensors import safe_open

    state = model.state_dict()
    with safe_open(str(files[0]), framework="pt") as f:
        candidates = []
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            shape = f.get_slice(key).get_shape()
            names = [name for name in state if key == name or key.endswith("." + name) or name.endswith("." + key)]
            if len(shape) == 2 and len(names) == 1 and state[names[0]].is_floating_point():
                candidates.append((shape[0] * shape[1], key, names[0]))
        if not candidates:
            return
        _, key, name = min(candidates)
        loaded, saved = state[name], f.get_tensor(key)
    if loaded.shape == saved.shape and torch.allclose(loaded.float(), saved.to(loaded.dtype).float(), rtol=1e-3,
                                                      atol=1e-3):
        return
    raise TextEncoderError(
        f"The weights of {folder.name} did not load: its {name} differs from {files[0].name}'s {key} (the model kept "
        "its random initialisation). Another extension or the WebUI may have patched transformers' loading; restart "
        "the WebUI, and report it with the list of your extensions.")


def token_limit(config, tokenizer) -> int:
    """The most tokens an encoder of this config takes with this tokenizer (flexible mode truncates there)."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [int(x) for x in limits if x is not None and 0 < x < 1_000_000]
    return min(limits) if limits else FALLBACK_LIMIT


def is_t5_family(model_type: str) -> bool:
    """Whether transformers' ``model_type`` is a T5-family encoder (it gives one output: no layer to choose)."""
    return model_type in T5_FAMILY


def read_encoder_config(path_or_id: str | Path) -> tuple[str, int]:
    """``(model_type, hidden size)`` of an encoder from its config.json alone (no weights, no tokenizer)."""
    config = read_config(str(path_or_id))
    return config.model_type, int(getattr(config, "d_model", None) or config.hidden_size)


def load_tokenizer(path_or_id: str | Path):
    """Only the tokenizer of an encoder (to count a prompt's tokens without loading the model)."""
    return load_tokenizer_and_limit(path_or_id)[0]


def load_tokenizer_and_limit(path_or_id: str | Path) -> tuple[Any, int]:
    """The tokenizer of an encoder and the encoder's ``token_limit``, without loading the model."""
    name = str(path_or_id)
    config = read_config(name)
    tokenizer = read_tokenizer(name, config.model_type)
    return tokenizer, token_limit(config, tokenizer)
