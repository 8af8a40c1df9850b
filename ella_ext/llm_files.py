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
        import transformers

        raise TextEncoderError(
            f"{path_or_id!r} does not hold a model config.json that transformers {transformers.__version__} can read "
            f"({exc!r}); if its model type is newer than this transformers, update transformers."
        ) from exc


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
        raise TextEncoderError(
            f"The tokenizer of {path_or_id!r} could not be loaded ({exc}). The folder needs its tokenizer files "
            "(spiece.model for T5); sentencepiece must be installed."
        ) from exc
    _check_vocabulary(tokenizer, path_or_id)
    if tokenizer.pad_token is None:  # decoder-only LLMs often have none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


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
