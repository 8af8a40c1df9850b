"""Judges: what answers DPG-Bench-style yes/no questions about a generated image.

``load_judge(spec)`` gives one of four kinds:

- ``function``: ``module:function``, a Python callable ``f(image, question) -> str`` importable from the current
  folder. Its answer counts as yes when, stripped and lower-cased, it is ``"yes"`` (DPG-Bench's scorer compares
  the mPLUG answer with ``'yes'``).
- ``vqa-classifier``: a ViLT-style answer classifier (``ViltForQuestionAnswering``, e.g.
  dandelin/vilt-b32-finetuned-vqa). The text is the top label; yes when the logit of the label "yes" is above the
  logit of "no".
- ``vqa-generator``: a BLIP-VQA-style answer generator (``BlipForQuestionAnswering``, e.g. Salesforce/blip-vqa-base).
  The text is the greedy answer; yes when the decoder's log-likelihood of the answer "yes" (then its end) given the
  image and question is above that of "no".
- ``vlm``: an image-text-to-text chat model (LLaVA, Qwen2-VL, PaliGemma, Idefics, ...) with a processor. It is asked
  ``"<question> Answer yes or no."`` through the processor's chat template when it has one; yes when the
  probability of the first answer token being a yes word (yes, Yes, YES, with or without a leading space) is above
  that of a no word. The text is a short greedy answer.

A model judge decides by scores, not by its text, so ``Answer.margin`` (yes score minus no score) says how sure it
was; the text is recorded as given. Model judges read .safetensors weights only, like the text encoders
(``ella_ext/llm_files.py``): a pickle (.bin) is never loaded.

Host-free: torch, transformers and PIL only; transformers is imported when a model judge loads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ELLAError

FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ACCEPTED = (
    "a visual-question-answering model (a BLIP-VQA answer generator such as Salesforce/blip-vqa-base, or a ViLT answer "
    "classifier such as dandelin/vilt-b32-finetuned-vqa), an image-text-to-text chat model with a processor (LLaVA, "
    "Qwen2-VL, PaliGemma, Idefics, ...), or module:function, a Python function f(image, question) -> str in a .py "
    "file in the current folder"
)
PROMPT_SUFFIX = " Answer yes or no."
YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")
MAX_ANSWER_TOKENS = 10  # BLIP's own VQA answers are at most 10 tokens; a chat model's "Yes, there is ..." is cut


class JudgeError(ELLAError):
    """A judge cannot be loaded or gave an answer that cannot be counted."""


@dataclass
class Answer:
    text: str  # the judge's answer as given (recorded in answers.jsonl)
    yes: bool  # whether it counts as yes
    margin: float | None = None  # score(yes) - score(no) where the judge decided by scores, else None


class Judge:
    """Answers yes/no questions about one image at a time. ``name`` is how reports name it (a hub id, a folder's
    name, or ``module:function``; never an absolute path); ``kind`` one of ``function``, ``vqa-classifier``,
    ``vqa-generator``, ``vlm``; ``rule`` says in words how yes is decided."""

    name: str = ""
    kind: str = ""
    rule: str = ""

    def describe(self) -> dict:
        """The facts a report needs to say which judge scored it and how (goes into eval.json)."""
        return {"name": self.name, "kind": self.kind, "rule": self.rule}

    def answer(self, image, questions: list[str]) -> list[Answer]:
        """One ``Answer`` per question about ``image`` (a PIL image), in the questions' order."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the judge holds (a model's memory); the judge answers no more after it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counts_as_yes(text: str) -> bool:
    """The text rule: DPG-Bench's scorer counts ``answer == 'yes'``; surrounding space and case are forgiven."""
    return text.strip().lower() == "yes"


def load_judge(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               batch_size: int = 16) -> Judge:
    """The judge ``spec`` names: ``module:function``, or a transformers model folder or hub id.

    ``dtype`` None is float16 on CUDA and float32 elsewhere; ``batch_size`` is how many questions about one image a
    model judge answers in one forward pass (lower it when memory runs out)."""
    if int(batch_size) < 1:
        raise JudgeError(f"The judge's batch size must be 1 or more, not {batch_size}.")
    from .judge_models import load_model_judge

    spec, path, is_function = _read_spec(spec)
    if is_function:
        return FunctionJudge(spec)
    return load_model_judge(spec if not path.exists() else str(path), path.exists(), torch.device(device), dtype,
                            int(batch_size))


def check_judge(spec: str) -> str:
    """What ``load_judge`` would load, checked without its weights (a module:function is imported, a model's config
    read and its kind picked), so a wrong judge is refused before hours of image making. Returns the kind."""
    from .judge_models import _display_name, _pick, _read_config

    spec, path, is_function = _read_spec(spec)
    if is_function:
        _import_function(spec)
        return FunctionJudge.kind
    name = _display_name(spec if not path.exists() else str(path), path.exists())
    config = _read_config(spec if not path.exists() else str(path), name, path.exists())
    return _pick(config, name)[0].kind


def identity(spec: str) -> str:
    """What answers are keyed by: a model folder's name and a fingerprint of its files (names, sizes, change times),
    a function judge's spec and a hash of its module's source, a hub id as written. A re-downloaded or edited judge
    gets new answers; the same judge's answers are reused."""
    spec, path, is_function = _read_spec(spec)
    if is_function:
        _working_folder_first()
        found = importlib.util.find_spec(spec.split(":")[0])
        origin = Path(found.origin) if found is not None and found.origin else None
        if origin is None or not origin.is_file():
            return spec
        return f"{spec}@{hashlib.sha256(origin.read_bytes()).hexdigest()[:12]}"
    if not path.exists():
        return spec
    from .run import fingerprint

    return fingerprint(str(path))


def _working_folder_first() -> str:
    """The judge's module sits in the folder eval runs from: that folder is searched first (not one an earlier
    judge was imported from)."""
    cwd = os.getcwd()
    if "" not in sys.path[:1]:
        while cwd in sys.path:
            sys.path.remove(cwd)
        sys.path.insert(0, cwd)
    return cwd


def _read_spec(spec: str) -> tuple[str, Path, bool]:
    """(spec, its path, whether it is module:function); a spec that can be neither is refused."""
    spec = str(spec).strip()
    if not spec:
        raise JudgeError(f"No judge was given: name a model folder or hub id, or module:function ({ACCEPTED}).")
    path = Path(spec).expanduser()
    if not path.exists() and not WINDOWS_DRIVE.match(spec) and FUNCTION_SPEC.match(spec):
        return spec, path, True
    if path.is_file():
        hint = (f"give a function in it as {path.stem}:function_name, run from its folder" if path.suffix == ".py"
                else "give the folder that holds the model (config.json, model.safetensors, processor files)")
        raise JudgeError(f"The judge {path.name!r} is a file, not a model folder: {hint}.")
    if not path.exists() and not HUB_ID.match(spec):
        raise JudgeError(
            f"The judge folder {spec!r} does not exist. Give a folder that holds a downloaded model (config.json, "
            f"model.safetensors, processor files), a Hugging Face hub id, or module:function.")
    return spec, path, False


# --------------------------------------------------------------------------------------------------------------------
# module:function


class FunctionJudge(Judge):
    kind = "function"
    rule = 'yes when the function\'s answer, stripped and lower-cased, is "yes" (DPG-Bench compares answer == "yes")'

    def __init__(self, spec: str):
        self.name = spec
        self.function = _import_function(spec)

    def answer(self, image, questions: list[str]) -> list[Answer]:
        if self.function is None:
            raise JudgeError(f"The judge {self.name} was closed; load it again to answer more questions.")
        answers = []
        for question in questions:
            try:
                text = self.function(image, question)
            except Exception as exc:
                raise JudgeError(f"The judge {self.name} raised {type(exc).__name__}: {exc} for the question "
                                 f"{question!r}.") from exc
            if not isinstance(text, str):
                raise JudgeError(
                    f"The judge {self.name} returned {_short_repr(text)} (a {type(text).__name__}) for the question "
                    f"{question!r}; a judge function must return its answer as a str, e.g. 'yes' or 'no'.")
            answers.append(Answer(text=text, yes=counts_as_yes(text)))
        return answers

    def describe(self) -> dict:
        return {**super().describe(), "function": self.name}

    def close(self) -> None:
        self.function = None


def _import_function(spec: str):
    module_name, function_name = spec.split(":")
    cwd = _working_folder_first()
    importlib.invalidate_caches()
    file_hint = module_name.replace(".", os.sep) + ".py"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise JudgeError(
                f"The judge {spec} names the Python module {module_name!r}, which is neither in the current folder "
                f"({cwd}) nor installed: put {file_hint} in {cwd} (or run eval from the folder that holds it), or "
                "give a model folder or hub id if that was meant.") from exc
        raise JudgeError(f"Importing the judge module {module_name!r} failed: it imports {exc.name!r}, which is not "
                         f"installed ({exc}). Install it in this Python environment.") from exc
    except Exception as exc:
        raise JudgeError(f"Importing the judge module {module_name!r} failed with {type(exc).__name__}: {exc}. "
                         "Fix the module so that it imports.") from exc
    where = getattr(module, "__file__", None) or module_name
    if not hasattr(module, function_name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise JudgeError(
            f"The judge module {module_name!r} ({where}) has no {function_name!r}: define "
            f"`def {function_name}(image, question) -> str` in it"
            + (f", or name one of its functions ({', '.join(found[:10])})." if found else "."))
    function = getattr(module, function_name)
    if not callable(function):
        raise JudgeError(
            f"{spec} is a {type(function).__name__} ({_short_repr(function)}), not a function: the judge must be "
            f"`def {function_name}(image, question) -> str` in {where}.")
    return function


def _short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
