"""Tiny random judge models for the eval tests, saved as real model folders (config.json, model.safetensors,
processor and tokenizer files) so ``load_judge`` reads them the way it reads a downloaded judge. Nothing is
downloaded. Each builder returns the folder; the weights are random (seeded), so the answers mean nothing but are
deterministic.

- ``make_tiny_vilt(folder)``: a ViLT answer classifier (``ViltForQuestionAnswering``) whose labels are
  ``VILT_LABELS`` ("yes", "no", "red", "2") unless ``labels`` says otherwise.
- ``make_tiny_blip_vqa(folder)``: a BLIP-VQA answer generator (``BlipForQuestionAnswering``).
- ``make_tiny_vlm(folder)``: an image-text-to-text chat model (``LlavaForConditionalGeneration``: a tiny CLIP vision
  tower and a tiny Llama) with a ``LlavaProcessor``, an ``<image>`` token, yes/no tokens and a chat template
  (``chat_template=False`` leaves the template out).
- ``make_tiny_clip_text(folder)``: a CLIP text encoder, which is no judge (for the refusal tests).
- ``write_judge_module(folder, name)``: a Python file with ``module:function`` judges (``yes_judge`` and friends).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH = 16
WIDTH = 16
INIT = 0.2  # larger random weights than transformers' 0.02, so answers depend on the image and question
VILT_LABELS = ("yes", "no", "red", "2")
WORDS = [
    "is", "are", "there", "a", "an", "the", "red", "blue", "green", "cat", "dog", "square", "circle", "on", "in",
    "of", "left", "right", "two", "2", "answer", "or", "yes", "no", "picture", "image", "this", "what", "colour",
    "?", ".", ",",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_bert_vocab(folder: Path) -> Path:
    """A WordPiece vocabulary: the special tokens, a few whole words, and letters (so any word spells out)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*BERT_SPECIALS, *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS)]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def _bert_tokenizer(folder: Path, **kwargs):
    from transformers import BertTokenizer

    return BertTokenizer(str(_write_bert_vocab(folder)), do_lower_case=True, model_max_length=40, **kwargs)


def make_tiny_vilt(folder: Path, seed: int = 0, labels: tuple[str, ...] = VILT_LABELS) -> Path:
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    folder = Path(folder)
    tokenizer = _bert_tokenizer(folder)
    config = ViltConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=IMAGE_SIZE, patch_size=PATCH, max_position_embeddings=40, max_image_length=-1,
        initializer_range=INIT, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        architectures=["ViltForQuestionAnswering"])
    torch.manual_seed(seed)
    ViltForQuestionAnswering(config).save_pretrained(str(folder), safe_serialization=True)
    image_processor = ViltImageProcessor(size={"shortest_edge": IMAGE_SIZE}, size_divisor=PATCH)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def make_tiny_blip_vqa(folder: Path, seed: int = 0) -> Path:
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    tokenizer = _bert_tokenizer(folder, bos_token="[DEC]")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in BERT_SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, encoder_hidden_size=WIDTH, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, pad_token_id=ids["[PAD]"],
                bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
                initializer_range=INIT)
    vision = dict(hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=INIT)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=WIDTH,
                        architectures=["BlipForQuestionAnswering"])
    torch.manual_seed(seed)
    BlipForQuestionAnswering(config).save_pretrained(str(folder), safe_serialization=True)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


VLM_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT", ":", "Yes", "YES", "No", "NO"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT : {{ message['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def _vlm_tokenizer(folder: Path):
    """A word-level tokenizer (whitespace and punctuation split) over the question words, with Llama's special
    tokens, an ``<image>`` token and the yes/no words in several spellings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*VLM_TOKENS, *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=128,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def make_tiny_vlm(folder: Path, seed: int = 0, chat_template: bool = True) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = Path(folder)
    tokenizer = _vlm_tokenizer(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<s>", "</s>", "<pad>", "<image>")}
    vision = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=WIDTH,
                              initializer_factor=INIT / 0.02)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                       tie_word_embeddings=False, initializer_range=INIT)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", architectures=["LlavaForConditionalGeneration"],
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2, pad_token_id=ids["<pad>"],
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(str(folder), safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE if chat_template else None)
    processor.save_pretrained(str(folder))
    return folder


def make_tiny_clip_text(folder: Path, seed: int = 0) -> Path:
    """A CLIP text encoder folder: a real transformers model that is no judge."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    config = CLIPTextConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, architectures=["CLIPTextModel"])
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


JUDGE_MODULE = '''"""module:function judges for the tests."""

ANSWERS = {}


def yes_judge(image, question):
    return "Yes "


def scripted_judge(image, question):
    """Answers from ANSWERS (question -> answer), "no" for other questions."""
    return ANSWERS.get(question, "no")


def number_judge(image, question):
    return 1


not_callable = "yes"
'''


def write_judge_module(folder: Path, name: str = "tiny_judge_module") -> Path:
    """A Python module ``name`` in ``folder`` with the judges ``yes_judge`` (always "Yes "), ``scripted_judge``
    (answers from its ``ANSWERS`` dict), ``number_judge`` (returns 1, not a str) and a non-callable
    ``not_callable``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(JUDGE_MODULE)
    return path
