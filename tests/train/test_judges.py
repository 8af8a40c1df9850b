"""Judges for ``eval``: each kind loads from a real (tiny, random) model folder, answers deterministically and the
same in batches as one by one, and decides yes/no by the scores it says it uses (forced by biasing the yes or no
logit); module:function judges count only "yes"; what cannot be a judge is refused with what to do."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys

import pytest
import torch

from ella_ext.evaluate.judges import Answer, JudgeError, counts_as_yes, load_judge

from .conftest import make_image, needs_extras
from .tiny_judges import make_tiny_blip_vqa, make_tiny_clip_text, make_tiny_vilt, make_tiny_vlm, write_judge_module

needs_extras()

QUESTIONS = [
    "Is there a red cat?",
    "Are there two dogs on the left of the blue square in this picture?",
    "Is this a circle?",
    "Is the square green?",
    "What colour is the dog on the right?",
]
BUILDERS = {"vilt": make_tiny_vilt, "blip": make_tiny_blip_vqa, "vlm": make_tiny_vlm}
KINDS = {"vilt": "vqa-classifier", "blip": "vqa-generator", "vlm": "vlm"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {name: build(root / f"tiny-{name}") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def judges(folders):
    loaded = {name: load_judge(str(folder), batch_size=16) for name, folder in folders.items()}
    yield loaded
    for judge in loaded.values():
        judge.close()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_kind_loads_and_answers_deterministically_by_its_margin(judges, name):
    judge = judges[name]
    assert judge.kind == KINDS[name] and judge.name == f"tiny-{name}"
    first = judge.answer(make_image(0), QUESTIONS)
    assert len(first) == len(QUESTIONS)
    for answer in first:
        assert isinstance(answer, Answer) and isinstance(answer.text, str)
        assert isinstance(answer.margin, float) and answer.yes == (answer.margin > 0)
    again = judge.answer(make_image(0), QUESTIONS)  # the same, up to float rounding (threads may sum otherwise)
    assert [(a.text, a.yes) for a in again] == [(a.text, a.yes) for a in first]
    assert [a.margin for a in again] == pytest.approx([a.margin for a in first], abs=1e-5)
    facts = judge.describe()
    assert facts["name"] == f"tiny-{name}" and facts["kind"] == KINDS[name] and facts["rule"]
    assert facts["dtype"] == "float32" and facts["device"] == "cpu" and facts["transformers"]
    assert facts["model_class"] == {"vilt": "ViltForQuestionAnswering", "blip": "BlipForQuestionAnswering",
                                    "vlm": "LlavaForConditionalGeneration"}[name]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batches_give_the_answers_of_one_by_one(judges, name):
    judge = judges[name]
    image = make_image(3, (48, 40))
    single = [judge.answer(image, [question])[0] for question in QUESTIONS]
    judge.batch_size = 2  # chunks of 2, 2 and 1, padded to their longest question
    try:
        batched = judge.answer(image, QUESTIONS)
    finally:
        judge.batch_size = 16
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.yes for a in batched] == [a.yes for a in single]
    assert [a.margin for a in batched] == pytest.approx([a.margin for a in single], abs=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_answers_depend_on_the_image_and_the_question(judges, name):
    judge = judges[name]
    margins = [[a.margin for a in judge.answer(make_image(i), QUESTIONS)] for i in (0, 1)]
    assert max(abs(a - b) for a, b in zip(*margins)) > 1e-3  # the image reaches the model
    assert max(margins[0]) - min(margins[0]) > 1e-3  # so does the question


def test_an_rgba_or_grey_image_is_answered_as_rgb(judges):
    judge = judges["vilt"]
    image = make_image(2)
    rgba, rgb = judge.answer(image.convert("RGBA"), QUESTIONS[:2]), judge.answer(image, QUESTIONS[:2])
    assert [a.margin for a in rgba] == pytest.approx([a.margin for a in rgb], abs=1e-5)
    assert len(judge.answer(image.convert("L"), QUESTIONS[:2])) == 2


@contextlib.contextmanager
def _biased(parameter: torch.nn.Parameter, index: int, amount: float):
    with torch.no_grad():
        parameter[index] += amount
    try:
        yield
    finally:
        with torch.no_grad():
            parameter[index] -= amount


def test_vilt_decides_by_the_yes_and_no_logits_not_the_top_label(judges):
    judge = judges["vilt"]
    bias = judge.model.classifier[-1].bias
    labels = judge.model.config.label2id
    image = make_image(0)
    with _biased(bias, labels["red"], 100.0), _biased(bias, labels["yes"], 50.0):
        answers = judge.answer(image, QUESTIONS)
    assert all(a.text == "red" and a.yes for a in answers)  # the top label is not yes, but yes beats no
    assert all(a.margin == pytest.approx(50.0, abs=5.0) for a in answers)
    with _biased(bias, labels["red"], 100.0), _biased(bias, labels["no"], 50.0):
        answers = judge.answer(image, QUESTIONS)
    assert all(a.text == "red" and not a.yes and a.margin < -40 for a in answers)
    with _biased(bias, labels["yes"], 100.0):
        assert [a.text for a in judge.answer(image, QUESTIONS)] == ["yes"] * len(QUESTIONS)


def test_blip_decides_by_the_likelihood_of_the_answers(judges):
    judge = judges["blip"]
    bias = judge.model.text_decoder.cls.predictions.bias
    yes_id, no_id = (judge.tokenizer.convert_tokens_to_ids(word) for word in ("yes", "no"))
    image = make_image(1)
    with _biased(bias, yes_id, 30.0):
        answers = judge.answer(image, QUESTIONS)
    assert all(a.yes and a.margin > 20 and a.text.split()[0] == "yes" for a in answers)
    with _biased(bias, no_id, 30.0):
        answers = judge.answer(image, QUESTIONS)
    assert all(not a.yes and a.margin < -20 and a.text.split()[0] == "no" for a in answers)


def test_blip_scores_the_whole_answer_including_its_end(judges):
    """With the answer's end made certain, the margin is the first tokens' difference alone; without, it also holds
    log p(end | yes) - log p(end | no). The two differ: the end is scored."""
    judge = judges["blip"]
    bias = judge.model.text_decoder.cls.predictions.bias
    image = make_image(1)
    plain = judge.answer(image, QUESTIONS)
    with _biased(bias, judge.model.config.text_config.sep_token_id, 30.0):
        ended = judge.answer(image, QUESTIONS)
    assert all(a.text == "" for a in ended)  # the greedy answer ends at once
    assert [a.margin for a in ended] != pytest.approx([a.margin for a in plain], abs=1e-3)


@contextlib.contextmanager
def _lm_head_bias(model, amounts: dict[int, float]):
    """These tokens' logits are exactly ``amounts`` (their output rows zeroed, a bias added) while it lasts."""
    head = model.get_output_embeddings()
    ids = list(amounts)
    rows = head.weight[ids].clone()
    bias = torch.zeros(head.out_features)
    bias[ids] = torch.tensor(list(amounts.values()))
    with torch.no_grad():
        head.weight[ids] = 0.0
    head.bias = torch.nn.Parameter(bias)
    try:
        yield
    finally:
        head.bias = None
        with torch.no_grad():
            head.weight[ids] = rows


def test_vlm_decides_by_the_next_token_of_yes_and_no_words(judges):
    judge = judges["vlm"]
    ids = judge.tokenizer.convert_tokens_to_ids
    image = make_image(2)
    assert judge.prompt("Is there a cat?") == "USER : <image> Is there a cat? Answer yes or no. ASSISTANT :"
    assert set(judge.describe()["yes_tokens"]) == {"yes", "Yes", "YES"}
    with _lm_head_bias(judge.model, {ids("Yes"): 30.0}):
        answers = judge.answer(image, QUESTIONS)
    assert all(a.yes and a.margin > 20 and a.text.split()[0] == "Yes" for a in answers)
    with _lm_head_bias(judge.model, {ids("no"): 30.0}):
        answers = judge.answer(image, QUESTIONS)
    assert all(not a.yes and a.margin < -20 and a.text.split()[0] == "no" for a in answers)
    # the yes spellings count together: three each a little below one no spelling win (29 + ln 3 > 29.5), though
    # the greedy text starts with "No"
    with _lm_head_bias(judge.model, {ids("yes"): 29.0, ids("Yes"): 29.0, ids("YES"): 29.0, ids("No"): 29.5}):
        answers = judge.answer(image, QUESTIONS)
    assert all(a.text.split()[0] == "No" and a.yes for a in answers)
    assert all(a.margin == pytest.approx(29.0 + math.log(3) - 29.5, abs=0.05) for a in answers)


def test_vlm_without_a_chat_template_gets_the_plain_question_with_its_image_token(tmp_path):
    with load_judge(str(make_tiny_vlm(tmp_path / "no-template", chat_template=False))) as judge:
        assert judge.prompt("Is there a cat?") == "Is there a cat? Answer yes or no."
        answers = judge.answer(make_image(0), QUESTIONS[:3])
        assert judge.image_prefix is True  # a LLaVA processor needs <image> in the text
        assert all(a.yes == (a.margin > 0) for a in answers)
        assert judge.describe()["chat_template"] is False


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_half_precision_judge_answers_like_the_float32_one(judges, folders, name):
    """float16 is the default on CUDA; here on the CPU it runs the same casts (pixels to the model's dtype, scores
    compared in float32)."""
    with load_judge(str(folders[name]), dtype=torch.float16) as half:
        assert half.describe()["dtype"] == "float16" and half.model.dtype == torch.float16
        answers = half.answer(make_image(1), QUESTIONS)
    reference = judges[name].answer(make_image(1), QUESTIONS)
    assert all(a.yes == (a.margin > 0) for a in answers)
    assert [a.margin for a in answers] == pytest.approx([a.margin for a in reference], abs=0.05)


def test_a_hub_cache_snapshot_is_named_by_its_repository(folders, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-vilt" / "snapshots" / "0123abc"
    shutil.copytree(folders["vilt"], snapshot)
    with load_judge(str(snapshot)) as judge:
        assert judge.name == "someone/tiny-vilt"


def test_a_closed_judge_refuses_to_answer(folders):
    judge = load_judge(str(folders["vilt"]))
    judge.close()
    assert judge.describe()["name"] == "tiny-vilt"
    with pytest.raises(JudgeError, match="closed"):
        judge.answer(make_image(0), QUESTIONS[:1])


# --------------------------------------------------------------------------------------------------------------------
# module:function


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    """A judge module in a fresh current folder; sys.path and sys.modules are restored afterwards."""
    name = f"judge_module_{tmp_path.name.replace('-', '_')}"
    write_judge_module(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_a_function_judge_counts_only_yes(judge_module):
    judge = load_judge(f"{judge_module}:scripted_judge")
    assert judge.kind == "function" and judge.name == f"{judge_module}:scripted_judge"
    sys.modules[judge_module].ANSWERS.update({"a": "Yes ", "b": "yes", "c": "yeah", "d": "no", "e": " YES\n"})
    answers = judge.answer(make_image(0), ["a", "b", "c", "d", "e", "f"])
    assert [a.text for a in answers] == ["Yes ", "yes", "yeah", "no", " YES\n", "no"]
    assert [a.yes for a in answers] == [True, True, False, False, True, False]
    assert all(a.margin is None for a in answers)
    assert judge.describe()["kind"] == "function"
    assert load_judge(f"{judge_module}:yes_judge").answer(make_image(0), ["?"]) == [Answer("Yes ", True)]
    assert counts_as_yes("Yes.") is False  # as DPG-Bench: only the word itself


def test_function_judge_errors_say_what_to_fix(judge_module, tmp_path):
    with pytest.raises(JudgeError, match=r"no_such_module.*no_such_module\.py"):
        load_judge("no_such_module:judge")
    with pytest.raises(JudgeError, match=r"has no 'missing'.*def missing\(image, question\) -> str.*yes_judge"):
        load_judge(f"{judge_module}:missing")
    with pytest.raises(JudgeError, match="not_callable is a str.*not a function"):
        load_judge(f"{judge_module}:not_callable")
    judge = load_judge(f"{judge_module}:number_judge")
    with pytest.raises(JudgeError, match=r"number_judge returned 1 \(a int\).*must return its answer as a str"):
        judge.answer(make_image(0), ["Is there a cat?"])
    (tmp_path / "needs_a_package.py").write_text("import not_a_package_anyone_has\n\ndef judge(image, q):\n    pass\n")
    with pytest.raises(JudgeError, match="imports 'not_a_package_anyone_has'.*Install it"):
        load_judge("needs_a_package:judge")
    (tmp_path / "raising.py").write_text("def judge(image, question):\n    raise RuntimeError('out of quota')\n")
    with pytest.raises(JudgeError, match="raising:judge raised RuntimeError: out of quota"):
        load_judge("raising:judge").answer(make_image(0), ["Is there a cat?"])
    sys.modules.pop("raising", None)


# --------------------------------------------------------------------------------------------------------------------
# what is no judge


def test_a_model_that_answers_no_questions_is_refused_with_what_is_accepted(tmp_path):
    folder = make_tiny_clip_text(tmp_path / "clip-text")
    with pytest.raises(JudgeError, match=r"'clip-text' is a clip_text_model model \(CLIPTextModel\).*"
                                         r"Salesforce/blip-vqa-base.*dandelin/vilt-b32-finetuned-vqa.*module:function"):
        load_judge(str(folder))


def test_a_classifier_without_yes_and_no_labels_is_refused(tmp_path):
    folder = make_tiny_vilt(tmp_path / "colours", labels=("red", "green", "blue"))
    with pytest.raises(JudgeError, match="no 'yes' and 'no' among its 3 labels"):
        load_judge(str(folder))


def test_missing_paths_and_offline_hub_ids_are_refused_with_how_to_get_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for spec in (str(tmp_path / "nothing-here"), "C:\\judges\\vilt", "C:/judges/vilt", "~/no/such/judge/here"):
        with pytest.raises(JudgeError, match="does not exist"):
            load_judge(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(JudgeError, match="holds no model config.json"):
        load_judge(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(JudgeError, match=r"HF_HUB_OFFLINE is set.*huggingface-cli download nobody-x/no-such-judge"):
        load_judge("nobody-x/no-such-judge")
    with pytest.raises(JudgeError, match="batch size"):
        load_judge("anything", batch_size=0)
    (tmp_path / "my_judge.py").write_text("")
    with pytest.raises(JudgeError, match="is a file, not a model folder: give a function in it as my_judge:"):
        load_judge(str(tmp_path / "my_judge.py"))


def test_weights_that_are_pickles_corrupt_or_incomplete_are_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folders["vilt"] / "model.safetensors"))
    pickled = shutil.copytree(folders["vilt"], tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    with pytest.raises(JudgeError, match=r"\.safetensors files only.*only \.bin weights.*use_safetensors=False\)"
                                         r"\.save_pretrained"):
        load_judge(str(pickled))

    corrupt = shutil.copytree(folders["vilt"], tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(JudgeError, match="could not be loaded.*corrupt or partial: download the model again"):
        load_judge(str(corrupt))

    headless = shutil.copytree(folders["vilt"], tmp_path / "headless")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")},
              str(headless / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(JudgeError, match=r"loaded without \d+ of its weights \(classifier\..*random"):
        load_judge(str(headless))
