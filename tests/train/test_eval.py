"""``python -m ella_ext.train eval`` end to end on tiny models: two checkpoints of a run and the baseline scored on a
question file by a ``module:function`` judge, every output written; the same seeds for every contestant; resume after
an interrupt (while making images and while judging) without redoing work; two processes give one process's
result; SDXL's baseline and pooled path; the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ella_ext.evaluate import run as eval_run
from ella_ext.evaluate.questions import read_questions
from ella_ext.evaluate.scoring import score
from ella_ext.train.cli import main
from ella_ext.train.config import load_config
from ella_ext.train.loop import train

from .conftest import add_text_encoders, make_base, needs_extras, write_clip_tokenizer, write_config

needs_extras()

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [
    {"id": "shapes", "prompt": "a red square on a white background", "questions": [
        {"id": 1, "question": "Is there a square?", "category": "entity - whole"},
        {"id": 2, "question": "Is the square red?", "parents": [1], "category": "attribute - color"},
        {"id": 3, "question": "Is the background white?", "category": "attribute - color"}]},
    {"id": "dots", "prompt": "two blue dots side by side", "questions": [
        {"id": 1, "question": "Are there dots?", "category": "entity - whole"},
        {"id": 2, "question": "Are there two dots?", "parents": [1], "category": "other - count"}]},
    {"id": "x/y", "prompt": "a yellow stripe", "questions": ["Is there a stripe?"]},
]
# The judge: yes when the image's mean brightness, offset by the question, is even: a deterministic function of
# the image, so the test can answer every question again from the images on disk.
JUDGE = '''
import os
CALLS = []

def answer(image, question):
    CALLS.append(question)
    stop = os.environ.get("ELLA_TEST_STOP_AFTER")
    if stop and len(CALLS) > int(stop):
        raise KeyboardInterrupt
    grey = image.convert("L")
    value = sum(grey.tobytes()) // max(1, grey.width * grey.height)
    return "Yes " if (value + len(question)) % 2 == 0 else "no"
'''


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, images8, tiny_t5_dir):
    """A tiny SD 1.5 base with its CLIP, a run's two checkpoints (steps 1 and 3), a question file, a judge."""
    root = tmp_path_factory.mktemp("eval")
    base = add_text_encoders(make_base(root / "base"), "sd15")
    config_path = write_config(root / "run.toml", base=base, llm=tiny_t5_dir, images=images8, output=root / "run",
                               train={"steps": 3, "save_every": 1, "lr": 1e-2},
                               sample={"steps": 2, "resolution": 32, "cfg": 4.0, "seed": 11})
    train(load_config(config_path))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tiny_judge.py").write_text(JUDGE)
    connectors = [root / "run" / "connector-step1.safetensors", root / "run" / "connector.safetensors"]
    return {"root": root, "config": config_path, "questions": questions, "connectors": connectors}


def _evaluate(setup, output, monkeypatch, **kwargs):
    monkeypatch.chdir(setup["root"])  # module:function judges are imported from the working folder
    sys.modules.pop("tiny_judge", None)
    args = dict(connectors=setup["connectors"], baseline=True, questions=setup["questions"],
                judge="tiny_judge:answer", images=2, output=output)
    args.update(kwargs)
    return eval_run.evaluate(load_config(setup["config"]), **args)


def _answer_again(output: Path, records: list[dict]) -> dict:
    """Each record's yes, recomputed from the image on disk by the judge's rule."""
    from PIL import Image

    def rule(image, question):
        grey = image.convert("L")
        value = sum(grey.tobytes()) // (grey.width * grey.height)
        return (value + len(question)) % 2 == 0

    return {(r["contestant"], r["item_id"], r["image"], r["question_id"]):
            rule(Image.open(output / r["image_file"]), r["question"]) for r in records}


def _count_images(monkeypatch) -> list[int]:
    """The seeds of every image made from now on (eval imports denoise from ella_ext.train.sample when it makes
    images)."""
    import ella_ext.train.sample as sample

    made, real = [], sample.denoise

    def counting(config, base, context_at, seeds, *args):
        made.extend(seeds)
        return real(config, base, context_at, seeds, *args)

    monkeypatch.setattr(sample, "denoise", counting)
    return made


@pytest.fixture(scope="module")
def full(eval_setup, tmp_path_factory):
    """One uninterrupted eval (the reference the resume and two-process tests compare with)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        output = tmp_path_factory.mktemp("full") / "eval"
        content = _evaluate(eval_setup, output, monkeypatch)
    return output, content


def test_eval_writes_every_output_and_scores_by_the_rule(eval_setup, full):
    output, content = full
    names = ["connector-step1.safetensors", "connector.safetensors", "baseline"]
    assert list(content["results"]) == names
    on_disk = json.loads((output / "eval.json").read_text())
    assert on_disk["results"] == content["results"]
    for result in content["results"].values():
        assert set(result) == {"overall", "categories", "subcategories", "prompts"}
        assert set(result["prompts"]) == {"shapes", "dots", "x/y"}
        assert set(result["categories"]) == {"entity", "attribute", "other"}
    records = [json.loads(line) for line in (output / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * (3 + 2 + 1)  # contestants x images x questions
    assert {r["answer"] for r in records} <= {"Yes ", "no"}  # the raw answer, as the judge said it
    assert all(r["yes"] == (r["answer"] == "Yes ") for r in records)
    # the scores follow from the answers by the rule, and the answers from the images by the judge
    again = _answer_again(output, records)
    assert all(r["yes"] == again[(r["contestant"], r["item_id"], r["image"], r["question_id"])] for r in records)
    items = read_questions(eval_setup["questions"]).items
    for name in names:
        answers = {}
        for r in records:
            if r["contestant"] == name:
                answers.setdefault((r["item_id"], r["image"]), {})[r["question_id"]] = r["yes"]
        assert content["results"][name] == score(items, answers, 2)
    assert set(content["comparisons"]) == {"connector-step1.safetensors", "connector.safetensors"}
    for name, compared in content["comparisons"].items():
        assert compared["against"] == "baseline" and compared["prompts"] == 3
        overall = content["results"][name]["overall"] - content["results"]["baseline"]["overall"]
        assert compared["mean"] == pytest.approx(overall)  # every prompt weighs the same in both
    # same seeds for every contestant; the conditioning differs
    seeds = {}
    for r in records:
        seeds.setdefault((r["item_id"], r["image"]), set()).add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len({next(iter(s)) for s in seeds.values()}) == 6
    from PIL import Image

    pixels = {name: [Image.open(output / r["image_file"]).tobytes() for r in records
                     if r["contestant"] == name and r["question_id"] == 1] for name in names}
    assert pixels["baseline"] != pixels["connector.safetensors"] != pixels["connector-step1.safetensors"]
    assert len(list((output / "images").rglob("*.png"))) == 3 * 3 * 2
    assert not list(output.rglob("*.partial"))
    # the record of how it was made
    assert content["judge"]["name"] == "tiny_judge:answer"
    assert content["settings"]["images_per_prompt"] == 2 and content["settings"]["steps"] == 2
    assert content["contestants"]["connector.safetensors"]["trained"]["steps"] == "3"
    assert content["questions"]["prompts"] == 3 and "torch" in content["versions"]
    report = (output / "report.html").read_text()
    for name in names:
        assert name in report
    sources = [part.split("'")[0] for part in report.split("src='")[1:]]
    assert len(sources) == 18 and all((output / s).is_file() for s in sources)
    assert "Is the square red?" in report or "Is there a stripe?" in report  # some question failed somewhere


def test_a_finished_eval_run_again_loads_nothing(eval_setup, full, tmp_path, monkeypatch):
    import shutil

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)

    def refuse(*args, **kwargs):
        raise AssertionError("no model should load: every image and answer is there")

    monkeypatch.setattr("ella_ext.train.model.load_base", refuse)
    monkeypatch.setattr("ella_ext.evaluate.judges.load_judge", refuse)
    again = _evaluate(eval_setup, copy, monkeypatch)
    assert again["results"] == content["results"]
    assert (copy / "answers.jsonl").read_text() == (output / "answers.jsonl").read_text()


def test_resume_after_interrupts_redoes_nothing(eval_setup, full, tmp_path, monkeypatch):
    output = tmp_path / "eval"
    saved = []
    real_save = eval_run._Work._save_image

    def save_then_stop(self, image, contestant, item, index):
        if len(saved) == 7:
            raise KeyboardInterrupt
        real_save(self, image, contestant, item, index)
        saved.append((contestant.key, item.id, index))

    monkeypatch.setattr(eval_run._Work, "_save_image", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(eval_setup, output, monkeypatch)
    assert len(list((output / "images").rglob("*.png"))) == 7
    monkeypatch.setattr(eval_run._Work, "_save_image", real_save)
    made = _count_images(monkeypatch)
    monkeypatch.setenv("ELLA_TEST_STOP_AFTER", "10")  # now interrupt the judging after 10 answers
    with pytest.raises(KeyboardInterrupt):
        _evaluate(eval_setup, output, monkeypatch)
    assert len(made) == 18 - 7  # only the images not made before
    part = (output / "answers" / "part-0.jsonl").read_text().splitlines()
    assert len(part) >= 6  # whole images' answers were written before the interrupt (10 calls: 6 + 3 + 1)
    monkeypatch.delenv("ELLA_TEST_STOP_AFTER")
    made.clear()
    content = _evaluate(eval_setup, output, monkeypatch)
    judge = sys.modules["tiny_judge"]
    assert made == [] and len(judge.CALLS) == 36 - len(part)  # no image made again, no answer asked twice
    full_output, full_content = full
    assert content["results"] == full_content["results"]
    assert (output / "answers.jsonl").read_text().replace(str(output), "") == \
        (full_output / "answers.jsonl").read_text().replace(str(full_output), "")


def test_changed_settings_make_new_images(eval_setup, full, tmp_path, monkeypatch):
    import shutil

    output, _ = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    made = _count_images(monkeypatch)
    config_text = eval_setup["config"].read_text().replace("steps = 2", "steps = 3")
    changed = dict(eval_setup, config=tmp_path / "run.toml")
    changed["config"].write_text(config_text.replace(str(eval_setup["root"] / "run"), str(tmp_path / "run")))
    content = _evaluate(changed, copy, monkeypatch, baseline=False, connectors=eval_setup["connectors"][1:])
    assert len(made) == 3 * 2 and list(content["results"]) == ["connector.safetensors"]
    assert content["settings"]["steps"] == 3


def test_two_processes_give_the_one_process_result(eval_setup, full, tmp_path):
    output = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
               "2", "-m", "ella_ext.train", "eval", "--config", str(eval_setup["config"]), "--baseline",
               "--questions", str(eval_setup["questions"]), "--vqa", "tiny_judge:answer", "--images-per-prompt", "2",
               "--output", str(output)]
    for connector in eval_setup["connectors"]:
        command += ["--connector", str(connector)]
    run = subprocess.run(command, cwd=eval_setup["root"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    assert run.stdout.count("Report:") == 1  # the main process reports; the other only worked
    content = json.loads((output / "eval.json").read_text())
    full_output, full_content = full
    assert content["processes"] == 2
    assert content["results"] == full_content["results"]
    parts = sorted(p.name for p in (output / "answers").glob("part-*.jsonl"))
    assert parts == ["part-0.jsonl", "part-1.jsonl"]  # both processes judged their share
    assert (output / "answers.jsonl").read_text().replace(str(output), "") == \
        (full_output / "answers.jsonl").read_text().replace(str(full_output), "")


def test_sdxl_connector_and_baseline(tmp_path, tiny_t5_dir, images8, monkeypatch):
    base = add_text_encoders(make_base(tmp_path / "xl", "sdxl"), "sdxl")
    config_path = write_config(tmp_path / "run.toml", base=base, llm=tiny_t5_dir, images=images8,
                               output=tmp_path / "run", train={"steps": 1, "lr": 1e-2},
                               sample={"steps": 2, "resolution": 32, "seed": 1})
    train(load_config(config_path))
    (tmp_path / "tiny_judge.py").write_text(JUDGE)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[0]) + "\n")
    setup = {"root": tmp_path, "config": config_path, "questions": questions,
             "connectors": [tmp_path / "run" / "connector.safetensors"]}
    content = _evaluate(setup, tmp_path / "eval", monkeypatch, images=1)
    assert list(content["results"]) == ["connector.safetensors", "baseline"]
    from ella_ext.evaluate.baseline import load_base_text
    from ella_ext.train.model import load_base

    config = load_config(config_path)
    xl = load_base(config, torch.device("cpu"), torch.float32)
    rows, pooled = load_base_text(config, xl, torch.device("cpu"), torch.float32).encode("a red square")
    assert rows.shape == (1, 16, 2048) and pooled.shape == (1, 32)
    assert torch.equal(pooled, xl.pooled(["a red square"]))  # CLIP-G's pooled embedding, as training uses it


def test_cli_eval_prints_the_table_and_refuses_bad_input(eval_setup, full, tmp_path, monkeypatch, capsys):
    import shutil

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    monkeypatch.chdir(eval_setup["root"])
    common = ["eval", "--config", str(eval_setup["config"]), "--questions", str(eval_setup["questions"]),
              "--images-per-prompt", "2", "--output", str(copy)]
    connectors = [a for c in eval_setup["connectors"] for a in ("--connector", str(c))]
    assert main([*common, *connectors, "--baseline", "--vqa", "tiny_judge:answer"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "vs baseline" in out and f"{content['results']['baseline']['overall']:7.2f}" in out
    assert main([*common, "--vqa", "tiny_judge:answer"]) == 2
    assert "Nothing to score" in capsys.readouterr().err
    assert main([*common, "--baseline", "--vqa", "no_such_module:answer"]) == 2
    assert "no_such_module" in capsys.readouterr().err
    assert main([*common, "--connector", str(tmp_path / "missing.safetensors"), "--vqa", "tiny_judge:answer"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*common, "--baseline", "--vqa", "tiny_judge:answer", "--official-quirks"]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_dpg_bench_csv_with_official_quirks_and_limit(eval_setup, full, tmp_path, monkeypatch):
    """The same prompts as DPG-Bench's CSV: the images and answers are reused (same prompts, ids and questions); the
    quirks drop the first row and the prompt depending on it; --limit keeps the first prompts."""
    import csv
    import shutil

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    path = tmp_path / "dpg_bench.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                         "category_detailed", "tuple", "question_natural_language"])
        for item in QUESTIONS:
            for number, q in enumerate(item["questions"], 1):
                q = q if isinstance(q, dict) else {"id": number, "question": q, "category": "other"}
                parents = ",".join(str(p) for p in q.get("parents", [])) or "0"
                writer.writerow([item["id"], item["prompt"], "", q["id"], parents, "", "",
                                 f"{q['category']} (x)", q["question"]])

    def refuse(*args, **kwargs):
        raise AssertionError("the images and answers of the same prompts and questions are reused")

    monkeypatch.setattr("ella_ext.train.model.load_base", refuse)
    monkeypatch.setattr("ella_ext.evaluate.judges.load_judge", refuse)
    plain = _evaluate(eval_setup, copy, monkeypatch, questions=path)
    assert plain["results"] == content["results"]  # the CSV says what the JSONL says
    quirks = _evaluate(eval_setup, copy, monkeypatch, questions=path, official_quirks=True)
    for name, result in quirks["results"].items():
        assert set(result["prompts"]) == {"dots", "x/y"}  # "shapes" lost its first question, which others need
        assert result["prompts"]["dots"] == content["results"][name]["prompts"]["dots"]
    assert len(quirks["questions"]["notes"]) == 2
    assert "official scorer quirks" in (copy / "report.html").read_text()
    limited = _evaluate(eval_setup, copy, monkeypatch, questions=path, limit=1)
    assert all(set(r["prompts"]) == {"shapes"} for r in limited["results"].values())


def test_baseline_from_an_a1111_single_file(tmp_path, tiny_t5_dir, images8):
    """A single file's CLIP-L (cond_stage_model.transformer.*) gives the rows the model itself gives; without a
    tokenizer the message says where to get one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ella_ext.evaluate.baseline import BaselineError, load_base_text
    from ella_ext.train.model import load_base

    from .conftest import write_sd15_single_file

    torch.manual_seed(5)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=768, intermediate_size=32, num_attention_heads=12,
                                        num_hidden_layers=2, max_position_embeddings=16, hidden_act="quick_gelu",
                                        bos_token_id=58, eos_token_id=59, pad_token_id=59)).eval()
    state = {}
    for key, value in clip.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key  # the file's names on every stack
        state["cond_stage_model.transformer." + name] = value
    path = tmp_path / "tiny-sd15.safetensors"
    configs, _, _ = write_sd15_single_file(path, state)
    config = load_config(write_config(tmp_path / "run.toml", base=path, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "out", model={"base_config": str(configs)}))
    base = load_base(config, torch.device("cpu"), torch.float32)
    with pytest.raises(BaselineError, match="base_config to a diffusers folder .* tokenizer/"):
        load_base_text(config, base, torch.device("cpu"), torch.float32)
    write_clip_tokenizer(configs / "tokenizer")
    text = load_base_text(config, base, torch.device("cpu"), torch.float32)
    rows, pooled = text.encode("a red square")
    ids = text.tokenizer(["a red square"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip(ids).last_hidden_state
    assert pooled is None and rows.shape == (1, 16, 768)
    assert torch.allclose(rows, expected, atol=1e-6)


def test_a_judge_that_cannot_load_is_refused_before_any_image(eval_setup, tmp_path, monkeypatch):
    from ella_ext.evaluate.judges import JudgeError

    from .tiny_judges import make_tiny_clip_text

    def refuse(*args, **kwargs):
        raise AssertionError("no model may load before the judge is known to work")

    monkeypatch.setattr("ella_ext.train.model.load_base", refuse)
    for judge, message in (("tiny_judge:nothing", "has no 'nothing'"),
                           (str(make_tiny_clip_text(tmp_path / "clip")), "does not answer questions about images"),
                           (str(tmp_path / "missing"), "does not exist")):
        with pytest.raises(JudgeError, match=message):
            _evaluate(eval_setup, tmp_path / "eval", monkeypatch, judge=judge)
    assert not (tmp_path / "eval" / "images").exists()


def test_eval_with_a_tiny_vqa_model_judge(eval_setup, full, tmp_path, monkeypatch):
    """A transformers judge end to end (a tiny random ViLT): answers are its labels, yes by its yes/no logits."""
    import shutil

    from .tiny_judges import make_tiny_vilt

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    vilt = make_tiny_vilt(tmp_path / "vilt")
    from ella_ext.evaluate.judges import check_judge

    assert check_judge(str(vilt)) == "vqa-classifier" and check_judge("tiny_judge:answer") == "function"
    result = _evaluate(eval_setup, copy, monkeypatch, judge=str(vilt))
    assert result["judge"]["kind"] == "vqa-classifier" and result["judge"]["name"] == "vilt"
    records = [json.loads(line) for line in (copy / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 36 and all(r["judge"].startswith("vilt@") for r in records)
    assert all((r["margin"] > 0) == r["yes"] for r in records)
    for name in result["results"]:
        answers = {}
        for r in records:
            if r["contestant"] == name:
                answers.setdefault((r["item_id"], r["image"]), {})[r["question_id"]] = r["yes"]
        assert result["results"][name] == score(read_questions(eval_setup["questions"]).items, answers, 2)


def test_the_judge_scores_during_training_as_eval_scores_the_saved_file(eval_setup, tmp_path, images8, tiny_t5_dir,
                                                                         monkeypatch):
    """[validation] eval_every: eval_score in metrics.jsonl at those steps; at the last step it is the score `eval`
    gives the saved connector (the same seeds, settings and weights give the same images and answers)."""
    from ella_ext.train.config import ConfigError

    monkeypatch.chdir(eval_setup["root"])
    sys.modules.pop("tiny_judge", None)
    base = eval_setup["config"].read_text().split('base = "')[1].split('"')[0]
    sample = {"steps": 2, "resolution": 32, "cfg": 4.0, "seed": 11}
    with pytest.raises(ConfigError, match="eval_every = 2 needs \\[validation\\] questions"):
        load_config(write_config(tmp_path / "bad.toml", base=Path(base), llm=tiny_t5_dir, images=images8,
                                 output=tmp_path / "bad", validation={"eval_every": 2}))
    config_path = write_config(tmp_path / "run.toml", base=Path(base), llm=tiny_t5_dir, images=images8,
                               output=tmp_path / "run", sample=sample,
                               train={"steps": 4, "lr": 1e-2, "save_precision": "fp32"},
                               validation={"eval_every": 2, "questions": str(eval_setup["questions"]),
                                           "judge": "tiny_judge:answer", "eval_images": 2})
    train(load_config(config_path))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    judged = [line for line in lines if "eval_score" in line]
    assert [line["step"] for line in judged] == [2, 4]
    assert {"eval_entity", "eval_attribute", "eval_other"} <= set(judged[-1])
    content = eval_run.evaluate(load_config(config_path), [tmp_path / "run" / "connector.safetensors"], False,
                                eval_setup["questions"], "tiny_judge:answer", images=2, output=tmp_path / "eval")
    result = content["results"]["connector.safetensors"]
    assert judged[-1]["eval_score"] == pytest.approx(result["overall"])
    assert judged[-1]["eval_entity"] == pytest.approx(result["categories"]["entity"])


def test_a_renamed_connector_and_a_second_run_keep_the_earlier_work(eval_setup, full, tmp_path, monkeypatch):
    """Images and answers follow the file's digest: a renamed file, and one that must be named by its folder once a
    second run's connector.safetensors joins, reuse them under their new names."""
    import shutil

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    renamed = tmp_path / "mine" / "connector.safetensors"
    renamed.parent.mkdir()
    shutil.copy(eval_setup["connectors"][1], renamed)
    other = tmp_path / "other" / "connector.safetensors"
    other.parent.mkdir()
    shutil.copy(eval_setup["connectors"][0], other)
    made = _count_images(monkeypatch)
    result = _evaluate(eval_setup, copy, monkeypatch, connectors=[renamed, other])
    assert made == []  # every image was there under the old names
    assert list(result["results"]) == ["mine/connector.safetensors", "other/connector.safetensors", "baseline"]
    assert result["results"]["mine/connector.safetensors"] == content["results"]["connector.safetensors"]
    assert result["results"]["other/connector.safetensors"] == content["results"]["connector-step1.safetensors"]
    records = [json.loads(line) for line in (copy / "answers.jsonl").read_text().splitlines()]
    assert {r["contestant"] for r in records} == set(result["results"])
    assert all((copy / r["image_file"]).is_file() for r in records)


def test_an_edited_judge_answers_again(eval_setup, full, tmp_path, monkeypatch):
    import shutil

    output, content = full
    copy = tmp_path / "eval"
    shutil.copytree(output, copy)
    judge = eval_setup["root"] / "tiny_judge.py"
    original = judge.read_text()
    try:
        judge.write_text(original.replace('"Yes " if', '"no" if').replace('else "no"', 'else "Yes "'))
        result = _evaluate(eval_setup, copy, monkeypatch)
    finally:
        judge.write_text(original)
    records = [json.loads(line) for line in (copy / "answers.jsonl").read_text().splitlines()]
    assert len(sys.modules["tiny_judge"].CALLS) == 36  # every question asked again: the judge's source changed
    old = {(r["contestant"], r["item_id"], r["image"], r["question_id"]): r["yes"] for r in
           (json.loads(line) for line in (output / "answers.jsonl").read_text().splitlines())}
    assert all(r["yes"] != old[(r["contestant"], r["item_id"], r["image"], r["question_id"])] for r in records)
    assert result["judge_identity"] != content["judge_identity"]


def test_an_overflowing_judge_stops_instead_of_answering_no(tmp_path):
    from ella_ext.evaluate.judge_models import check_finite
    from ella_ext.evaluate.judges import Answer, JudgeError

    class Judge:
        name, dtype = "tiny", torch.float16

    fine = [Answer("yes", True, 2.0), Answer("no", False, -1.0), Answer("no", False, None)]
    assert check_finite(fine, Judge()) == fine
    with pytest.raises(JudgeError, match="non-finite scores in float16.*--judge-dtype float32"):
        check_finite([Answer("no", False, float("nan"))], Judge())


def test_image_batches_change_nothing_but_speed(eval_setup, full, tmp_path, monkeypatch):
    """One image per UNet batch gives the images (within one level of rounding) and seeds of a prompt's batch."""
    import numpy as np
    from PIL import Image

    output, content = full
    result = _evaluate(eval_setup, tmp_path / "eval", monkeypatch, baseline=False,
                       connectors=eval_setup["connectors"][1:], image_batch=1)
    for path in (tmp_path / "eval" / "images").rglob("*.png"):
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(output / path.relative_to(tmp_path / "eval")), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, path
    assert result["settings"]["image_batch"] == 1


def test_a_connector_with_a_pool_gives_sdxl_its_pooled_vector(tmp_path, tiny_t5_dir, images8, monkeypatch):
    """SDXL with a pooled connector: eval (and sample, through the same pooled_pair) hand the UNet the pool's vector
    of the prompt and of the empty negative, not CLIP-G's."""
    from dataclasses import replace

    from ella_ext import load_connector, save_connector
    from ella_ext.evaluate.models import encode_text
    from ella_ext.train.model import init_connector, load_base
    from ella_ext.train.runtime import load_encoder

    base_dir = make_base(tmp_path / "xl", "sdxl")
    config_path = write_config(tmp_path / "run.toml", base=base_dir, llm=tiny_t5_dir, images=images8,
                               output=tmp_path / "run", sample={"steps": 2, "resolution": 32, "seed": 1})
    config = load_config(config_path)
    base = load_base(config, torch.device("cpu"), torch.float32)
    encoder = load_encoder(config, torch.device("cpu"))
    shape = load_connector(_tiny_sdxl_connector(tmp_path, config), "cpu", torch.float32).config
    pooled_file = tmp_path / "pooled.safetensors"
    save_connector(init_connector(replace(shape, pooled_width=32), 3), pooled_file,
                   {"ella.pooled": "attention", "ella.base_family": "sdxl"})
    (tmp_path / "tiny_judge.py").write_text(JUDGE)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(QUESTIONS[2]) + "\n")
    seen = []
    import ella_ext.train.sample as sample

    real = sample.denoise

    def spy(config, base, context_at, seeds, pooled, empty_pooled, prompt):
        seen.append((pooled, empty_pooled))
        return real(config, base, context_at, seeds, pooled, empty_pooled, prompt)

    monkeypatch.setattr(sample, "denoise", spy)
    setup = {"root": tmp_path, "config": config_path, "questions": questions, "connectors": [pooled_file]}
    _evaluate(setup, tmp_path / "eval", monkeypatch, baseline=False, images=1)
    connector = load_connector(pooled_file, "cpu", torch.float32)
    with torch.no_grad():
        expected = [connector.pooled(*encode_text(encoder, config, text)) for text in (QUESTIONS[2]["prompt"], "")]
    (pooled, empty_pooled), = seen
    torch.testing.assert_close(pooled, expected[0])
    torch.testing.assert_close(empty_pooled, expected[1])
    assert not torch.allclose(pooled, base.pooled([QUESTIONS[2]["prompt"]]))


def _tiny_sdxl_connector(tmp_path, config) -> Path:
    """A connector file of the tiny SDXL base's shape (no pool), made by a one-step run."""
    run = load_config(write_config(tmp_path / "one.toml", base=Path(config.model["base"]),
                                   llm=Path(config.model["llm"]), images=Path(config.sources[0].path),
                                   output=tmp_path / "one", train={"steps": 1}))
    return train(run).connector
