"""Model judges: transformers visual-question-answering models (ViLT, BLIP-VQA) and image-text-to-text chat models,
loaded from a folder or hub id (safetensors only) and deciding yes or no by their scores. See ``judges`` for the
kinds and the rules."""

from __future__ import annotations

import gc
import inspect
import math
from pathlib import Path

import torch

from ..llm_files import _dtype_kwargs
from ..model_files import is_offline
from .judges import (
    ACCEPTED,
    MAX_ANSWER_TOKENS,
    NO_WORDS,
    PROMPT_SUFFIX,
    YES_WORDS,
    Answer,
    Judge,
    JudgeError,
)

# --------------------------------------------------------------------------------------------------------------------
# transformers models


def load_model_judge(spec: str, is_folder: bool, device: torch.device, dtype: torch.dtype | None,
                     batch_size: int) -> Judge:
    """``dtype`` None: float32 on a CPU; on a GPU bfloat16 for a model released in bfloat16 (where the GPU has it:
    such models can overflow in float16), else float16."""
    name = _display_name(spec, is_folder)
    config = _read_config(spec, name, is_folder)
    judge_class, model_class = _pick(config, name)
    if dtype is None:
        dtype = default_dtype(config, device)
    processor = _read_processor(spec, name)
    model = _read_model(model_class, spec, name, config, dtype, is_folder)
    model.to(device).eval()
    return judge_class(name, model, processor, device, dtype, batch_size)


def _display_name(spec: str, is_folder: bool) -> str:
    """The hub id, or the folder's name (a hub cache snapshot folder reads as its repository's id)."""
    if not is_folder:
        return spec
    parts = Path(spec).resolve().parts
    for part in reversed(parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return parts[-1] if parts else spec


def _read_config(spec: str, name: str, is_folder: bool):
    import transformers
    from transformers import AutoConfig

    if is_folder and not (Path(spec) / "config.json").is_file():
        raise JudgeError(f"The judge folder {name!r} holds no model config.json. A judge folder is a downloaded "
                         "transformers model: config.json, model.safetensors and its processor files.")
    try:
        return AutoConfig.from_pretrained(spec)
    except OSError as exc:
        if is_folder:
            raise JudgeError(f"The config.json of the judge folder {name!r} could not be read ({exc}); download the "
                             "model folder again.") from exc
        raise JudgeError(f"The judge {spec!r} is not a folder here and could not be read from the Hugging Face hub "
                         f"({exc}). {_download_hint(spec)}") from exc
    except Exception as exc:  # an unknown model type, custom code, a broken config.json
        remote = "trust_remote_code" in str(exc)
        raise JudgeError(
            f"The judge {name!r} has a config.json that transformers {transformers.__version__} cannot read ({exc}). "
            + ("Models that need their own code (trust_remote_code) are not run as judges; wrap one in a "
               "module:function judge instead." if remote else
               "If its model type is newer than this transformers, update transformers.")) from exc


def _download_hint(spec: str) -> str:
    fetch = f"`huggingface-cli download {spec}` (or `hf download {spec}`)"
    if is_offline():
        return (f"HF_HUB_OFFLINE is set, so nothing is downloaded and only models already in the hub cache load: "
                f"download it first with {fetch} where there is a network, or unset HF_HUB_OFFLINE.")
    return (f"Check the id and the network, or download it first with {fetch} and run with HF_HUB_OFFLINE=1; "
            "a folder must exist.")


def _pick(config, name: str):
    """(judge class, model class) for a model's config: by its architectures, then by its model type."""
    import transformers

    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if "ViltForQuestionAnswering" in architectures:
        return ViltJudge, transformers.ViltForQuestionAnswering
    if "BlipForQuestionAnswering" in architectures:
        return BlipVqaJudge, transformers.BlipForQuestionAnswering
    what = f"{model_type} model ({', '.join(architectures) or 'no architectures in its config.json'})"
    if model_type in ("vilt", "blip"):
        raise JudgeError(
            f"The judge {name!r} is a {what}, not its question-answering model (ViltForQuestionAnswering or "
            f"BlipForQuestionAnswering): a captioning or retrieval model does not answer questions. Accepted: "
            f"{ACCEPTED}.")
    auto_class, model_types = _image_text_to_text()
    if auto_class is not None and model_type in model_types and model_type != "vision-encoder-decoder":
        return VlmJudge, auto_class
    raise JudgeError(f"The judge {name!r} is a {what}, which does not answer questions about images. Accepted: "
                     f"{ACCEPTED}.")


def _image_text_to_text():
    """The auto class that loads image-text-to-text models, and the model types it knows: AutoModelForImageTextToText
    where this transformers has it (4.45 and later), else AutoModelForVision2Seq (removed in 5)."""
    import transformers
    from transformers.models.auto import modeling_auto

    for class_name, names in (("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
                              ("AutoModelForVision2Seq", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES")):
        if hasattr(transformers, class_name) and hasattr(modeling_auto, names):
            return getattr(transformers, class_name), set(getattr(modeling_auto, names))
    return None, set()


def _read_processor(spec: str, name: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(spec)
    except Exception as exc:  # transformers and tokenizers raise many types here, varying by version
        raise JudgeError(f"The processor of the judge {name!r} could not be loaded ({exc}). The folder needs its "
                         "processor files (preprocessor_config.json or processor_config.json, and the tokenizer's "
                         "files); download the whole model folder.") from exc
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise JudgeError(
            f"The judge {name!r} has no image processor and tokenizer together (AutoProcessor gave "
            f"{type(processor).__name__}); the folder needs its preprocessor_config.json and tokenizer files.")
    return processor


def _read_model(model_class, spec: str, name: str, config, dtype: torch.dtype, is_folder: bool):
    try:
        model, info = model_class.from_pretrained(spec, config=config, use_safetensors=True, output_loading_info=True,
                                                  **_dtype_kwargs(dtype))
    except Exception as exc:  # transformers and safetensors raise many types here, varying by version
        raise JudgeError(f"The weights of the judge {name!r} could not be loaded ({exc}). "
                         + _weights_hint(spec, is_folder, model_class.__name__)) from exc
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise JudgeError(
            f"The judge {name!r} loaded without {len(missing)} of its weights ({', '.join(sorted(missing)[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): they would be random and its answers meaningless. Its weights "
            f"do not fit {model_class.__name__}; use the model's own release.")
    return model


def _weights_hint(spec: str, is_folder: bool, class_name: str) -> str:
    rule = "Judges load from .safetensors files only (a .bin file is a pickle, which can run code when read)."
    convert = (f"python -c \"import transformers as t; t.{class_name}.from_pretrained(r'{{folder}}', "
               f"use_safetensors=False).save_pretrained(r'{{folder}}')\"")
    if is_folder:
        if list(Path(spec).glob("*.safetensors")):
            return "Its .safetensors file may be corrupt or partial: download the model again."
        if list(Path(spec).glob("*.bin")):
            return (f"{rule} The folder has only .bin weights: if you trust them, convert them once in place with "
                    f"{convert.format(folder=spec)}, or download the model's safetensors release.")
        return f"{rule} The folder has no weights file: download the whole model folder."
    return (f"{rule} If the model has only .bin weights on its main branch, its safetensors often wait in a pull "
            f"request by SFconvertbot (the model page's Community tab): `huggingface-cli download {spec} --revision "
            "refs/pr/N --local-dir FOLDER` and give FOLDER; or download the model and convert the folder once with "
            f"{convert.format(folder='FOLDER')}. A partial download: download it again.")


def default_dtype(config, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    released = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if str(released).replace("torch.", "") == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def check_finite(answers: list[Answer], judge: Judge) -> list[Answer]:
    """A judge whose scores overflowed would answer "no" to everything without a word: it stops instead."""
    bad = [a for a in answers if a.margin is not None and not math.isfinite(a.margin)]
    if bad:
        raise JudgeError(f"The judge {judge.name} gave non-finite scores in {str(judge.dtype).replace('torch.', '')} "
                         "(it overflowed): run eval with --judge-dtype float32 (or bfloat16 on a GPU that has it).")
    return answers


class ModelJudge(Judge):
    """A transformers judge: the model, its processor, and answering in chunks of ``batch_size`` questions."""

    def __init__(self, name: str, model, processor, device: torch.device, dtype: torch.dtype, batch_size: int):
        self.name, self.model, self.processor = name, model, processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.tokenizer = processor.tokenizer
        self.model_class = type(model).__name__

    def describe(self) -> dict:
        import transformers

        return {**super().describe(), "transformers": transformers.__version__,
                "model_class": self.model_class,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "batch_size": self.batch_size}

    def answer(self, image, questions: list[str]) -> list[Answer]:
        if self.model is None:
            raise JudgeError(f"The judge {self.name!r} was closed; load it again to answer more questions.")
        if not questions:
            return []
        image = image.convert("RGB") if image.mode != "RGB" else image
        answers = []
        with torch.no_grad():
            seen = self._read_image(image)
            for start in range(0, len(questions), self.batch_size):
                answers += self._answer_batch(seen, [str(q) for q in questions[start:start + self.batch_size]])
        return check_finite(answers, self)

    def _read_image(self, image):
        """What every batch of questions about ``image`` shares (its pixels, or its features)."""
        return image

    def _answer_batch(self, seen, questions: list[str]) -> list[Answer]:
        raise NotImplementedError

    def _pixels(self, image) -> dict:
        """The image processor's tensors for one image, on the judge's device (floats in its dtype)."""
        return _to(dict(self.processor.image_processor(image, return_tensors="pt")), self.device, self.dtype)

    def _tokens(self, questions: list[str], limit: int | None) -> dict:
        limit = limit if limit and limit > 0 else None
        tokens = self.tokenizer(questions, padding=True, truncation=limit is not None, max_length=limit,
                                return_tensors="pt")
        return _to(dict(tokens), self.device, self.dtype)

    def close(self) -> None:
        self.model = self.processor = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _to(tensors: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
            if isinstance(value, torch.Tensor) else value for key, value in tensors.items()}


def _label_id(id2label: dict, word: str) -> int | None:
    for index, label in sorted(id2label.items(), key=lambda item: int(item[0])):
        if str(label).strip().lower() == word:
            return int(index)
    return None


class ViltJudge(ModelJudge):
    kind = "vqa-classifier"
    rule = ('yes when the answer classifier\'s logit of the label "yes" is above that of "no" '
            '(margin = logit(yes) - logit(no)); the text is the top label')

    def __init__(self, *args):
        super().__init__(*args)
        id2label = dict(getattr(self.model.config, "id2label", None) or {})
        self.yes_id, self.no_id = _label_id(id2label, "yes"), _label_id(id2label, "no")
        if self.yes_id is None or self.no_id is None:
            labels = ", ".join(repr(str(v)) for v in list(id2label.values())[:8])
            raise JudgeError(f"The answer classifier {self.name!r} has no 'yes' and 'no' among its {len(id2label)} "
                             f"labels ({labels}{', ...' if len(id2label) > 8 else ''}), so it cannot answer yes/no "
                             "questions; use a VQA model trained on yes/no answers, e.g. "
                             "dandelin/vilt-b32-finetuned-vqa.")
        self.id2label = {int(k): str(v) for k, v in id2label.items()}

    def _read_image(self, image) -> dict:
        return self._pixels(image)

    def _answer_batch(self, seen: dict, questions: list[str]) -> list[Answer]:
        n = len(questions)
        pixels = {k: v.expand(n, *v.shape[1:]) for k, v in seen.items()}
        tokens = self._tokens(questions, getattr(self.model.config, "max_position_embeddings", None))
        logits = self.model(**tokens, **pixels).logits.float()
        margins = (logits[:, self.yes_id] - logits[:, self.no_id]).tolist()
        top = logits.argmax(dim=-1).tolist()
        return [Answer(text=self.id2label[t], yes=m > 0, margin=m) for t, m in zip(top, margins)]

    def describe(self) -> dict:
        return {**super().describe(), "labels": {"yes": self.yes_id, "no": self.no_id}}


class BlipVqaJudge(ModelJudge):
    kind = "vqa-generator"
    rule = ('yes when the decoder\'s log-likelihood of the answer "yes" (then its end) given the image and question is '
            'above that of "no" (margin = log p(yes) - log p(no)); the text is the greedy answer')

    def __init__(self, *args):
        super().__init__(*args)
        text_config = self.model.config.text_config
        self.start_id, self.end_id = text_config.bos_token_id, text_config.sep_token_id
        self.pad_id = text_config.pad_token_id
        self.sequences = {word: self._answer_ids(word) for word in ("yes", "no")}
        if None in (self.start_id, self.end_id):
            raise JudgeError(f"The BLIP-VQA judge {self.name!r} has no answer start (bos_token_id) or end "
                             "(sep_token_id) in its text config; download the model's config.json again.")

    def _answer_ids(self, word: str) -> list[int]:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids or self.tokenizer.unk_token_id in ids:
            raise JudgeError(f"The tokenizer of the judge {self.name!r} cannot spell {word!r}; download the model's "
                             "tokenizer files again.")
        return ids

    def _read_image(self, image) -> torch.Tensor:
        return self.model.vision_model(pixel_values=self._pixels(image)["pixel_values"])[0]

    def _answer_batch(self, seen: torch.Tensor, questions: list[str]) -> list[Answer]:
        """Questions of one token length at a time: BLIP's decoder in transformers 5 drops the mask of the question
        in its cross-attention (``BlipTextAttention`` does not pass ``encoder_attention_mask`` on), so a padded
        question would be read with its padding and answer otherwise than alone."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        lengths = [len(ids) for ids in self.tokenizer(questions, truncation=bool(limit), max_length=limit)["input_ids"]]
        answers: list[Answer | None] = [None] * len(questions)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            for row, answer in zip(rows, self._answer_same_length(seen, [questions[i] for i in rows], limit)):
                answers[row] = answer
        return answers

    def _answer_same_length(self, image_embeds: torch.Tensor, questions: list[str], limit) -> list[Answer]:
        n = len(questions)
        image_embeds = image_embeds.expand(n, *image_embeds.shape[1:])
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        tokens = self._tokens(questions, limit)
        question = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                           return_dict=False)[0]
        scores = {word: self._log_likelihood(question, tokens["attention_mask"], ids)
                  for word, ids in self.sequences.items()}
        margins = (scores["yes"] - scores["no"]).tolist()
        start = torch.full((n, 1), self.start_id, dtype=torch.long, device=self.device)
        generated = self.model.text_decoder.generate(
            input_ids=start, eos_token_id=self.end_id, pad_token_id=self.pad_id, encoder_hidden_states=question,
            encoder_attention_mask=tokens["attention_mask"], max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
            num_beams=1)
        texts = self.tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)
        return [Answer(text=t.strip(), yes=m > 0, margin=m) for t, m in zip(texts, margins)]

    def _log_likelihood(self, question, question_mask, answer_ids: list[int]) -> torch.Tensor:
        """log p(answer, end | image, question) per row: the decoder reads start + answer and scores each next
        token (as BLIP's generate starts its answers)."""
        sequence = torch.tensor([self.start_id, *answer_ids, self.end_id], device=self.device)
        sequence = sequence.expand(question.shape[0], -1)
        logits = self.model.text_decoder(input_ids=sequence[:, :-1], encoder_hidden_states=question,
                                         encoder_attention_mask=question_mask, return_dict=True).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return log_probs.gather(-1, sequence[:, 1:, None]).squeeze(-1).sum(-1)

    def describe(self) -> dict:
        return {**super().describe(), "answers": {word: ids for word, ids in self.sequences.items()}}


class VlmJudge(ModelJudge):
    kind = "vlm"

    def __init__(self, *args):
        super().__init__(*args)
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        if not self.encoder_decoder:  # the next token of every row sits at the end
            self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.yes_ids, self.no_ids = self._word_ids(YES_WORDS), self._word_ids(NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise JudgeError(f"The tokenizer of the judge {self.name!r} has no separate tokens for yes and no "
                             f"(yes: {self.yes_ids}, no: {self.no_ids}), so its answers cannot be scored; use "
                             "another judge.")
        self.chat_template = bool(getattr(self.processor, "chat_template", None))
        self.forward_inputs = set(inspect.signature(self.model.forward).parameters)
        self.token_words = {"yes": self.tokenizer.convert_ids_to_tokens(self.yes_ids),
                            "no": self.tokenizer.convert_ids_to_tokens(self.no_ids)}
        self.image_prefix: bool | None = None  # whether prompts start with the image token (found on first use)
        self.rule = (f'asked "<question>{PROMPT_SUFFIX}"'
                     f'{" through its chat template" if self.chat_template else " (no chat template)"}; yes when the '
                     "next-token probability of the yes tokens is above that of the no tokens (margin = "
                     "log P(yes tokens) - log P(no tokens)); the text is a greedy answer of up to "
                     f"{MAX_ANSWER_TOKENS} tokens")

    def _word_ids(self, words) -> list[int]:
        """The tokens that start an answer with one of ``words``: spellings that are one token, else the first
        token of each spelling."""
        unk = self.tokenizer.unk_token_id
        encoded = [self.tokenizer(text, add_special_tokens=False)["input_ids"]
                   for word in words for text in (word, " " + word)]
        encoded = [ids for ids in encoded if ids and unk not in ids]
        single = [ids[0] for ids in encoded if len(ids) == 1]
        return sorted(set(single or [ids[0] for ids in encoded]))

    def prompt(self, question: str) -> str:
        text = question.strip() + PROMPT_SUFFIX
        if not self.chat_template:
            return text
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, image, questions: list[str]) -> dict:
        prompts = [self.prompt(q) for q in questions]
        if self.image_prefix is None:
            self.image_prefix = self._needs_image_token(image, prompts[0])
        if self.image_prefix:
            prompts = [f"{self.processor.image_token}\n{p}" for p in prompts]
        try:
            inputs = dict(self._process(image, prompts))
        except Exception as exc:  # processors raise many types, varying by model and version
            raise JudgeError(f"The processor of the judge {self.name!r} did not take the image with the question "
                             f"({exc}). Judges without a chat template get the plain question; this model may need "
                             "a prompt format of its own: wrap it in a module:function judge.") from exc
        if "token_type_ids" in inputs and "token_type_ids" not in self.forward_inputs:
            del inputs["token_type_ids"]  # some tokenizers give them; generate refuses what forward lacks
        return _to(inputs, self.device, self.dtype)

    def _process(self, image, prompts: list[str]):
        return self.processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")

    def _needs_image_token(self, image, prompt: str) -> bool:
        """Whether a prompt without a chat template must carry the processor's image token: some processors add
        it themselves (PaliGemma, BLIP-2), others need it in the text (LLaVA), where they refuse a prompt without
        it or (older transformers) leave the image out of the input ids."""
        image_token = getattr(self.processor, "image_token", None)
        if self.chat_template or not isinstance(image_token, str):
            return False
        token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if not isinstance(token_id, int) or token_id == self.tokenizer.unk_token_id:
            return False
        try:
            ids = self._process(image, [prompt])["input_ids"]
        except Exception:  # a processor that counts image tokens refuses the prompt: it needs the token
            return True
        return not bool((ids == token_id).any())

    def _answer_batch(self, image, questions: list[str]) -> list[Answer]:
        inputs = self._inputs(image, questions)  # the image is processed per batch: processors expand it per prompt
        out = self.model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, num_beams=1,
                                  output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=self.tokenizer.pad_token_id)
        first = out.logits[0].float()  # the next-token logits after the prompt, before any processing
        margins = (torch.logsumexp(first[:, self.yes_ids], dim=-1)
                   - torch.logsumexp(first[:, self.no_ids], dim=-1)).tolist()
        sequences = out.sequences if self.encoder_decoder else out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [Answer(text=t.strip(), yes=m > 0, margin=m) for t, m in zip(texts, margins)]

    def describe(self) -> dict:
        return {**super().describe(), "prompt": "<question>" + PROMPT_SUFFIX, "chat_template": self.chat_template,
                "yes_tokens": self.token_words["yes"], "no_tokens": self.token_words["no"]}
