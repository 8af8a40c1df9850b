"""DPG-Bench's scoring rule against hand-worked cases, the question files (DPG-Bench's CSV and our JSONL), and the
official scorer's quirks. Pure Python: runs on every stack."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ella_ext.evaluate.questions import Item, Question, QuestionsError, read_questions
from ella_ext.evaluate.scoring import after_parents, score

HEADER = ("item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
          "question_natural_language\n")


def _csv(tmp_path, rows, name="dpg.csv"):
    path = tmp_path / name
    out = io.StringIO()
    csv.writer(out).writerows(rows)  # quotes "1,2" and tuples with commas, as the published file does
    path.write_text(HEADER + out.getvalue(), encoding="utf-8")
    return path


def _item(item_id="p", *questions):
    return Item(item_id, f"prompt {item_id}", list(questions))


CHAIN = _item("chain", Question(1, "Is there a cat?", (), "entity - whole"),
              Question(2, "Is the cat red?", (1,), "attribute - color"),
              Question(3, "Is the red cat on a chair?", (2,), "relation - spatial"))


def test_a_no_zeroes_every_descendant_along_the_chain():
    assert after_parents(CHAIN, {1: False, 2: True, 3: True}) == {1: 0, 2: 0, 3: 0}
    assert after_parents(CHAIN, {1: True, 2: False, 3: True}) == {1: 1, 2: 0, 3: 0}
    assert after_parents(CHAIN, {1: True, 2: True, 3: True}) == {1: 1, 2: 1, 3: 1}
    # a child answered no does not touch its parent
    assert after_parents(CHAIN, {1: True, 2: True, 3: False}) == {1: 1, 2: 1, 3: 0}


def test_parents_are_settled_first_even_when_the_file_lists_children_first():
    backwards = _item("b", Question(3, "q3", (2,)), Question(2, "q2", (1,)), Question(1, "q1"))
    answers = {1: False, 2: True, 3: True}
    assert after_parents(backwards, answers) == {1: 0, 2: 0, 3: 0}
    # the official scorer walks the file's order: q3 is settled while q2 still counts 1
    assert after_parents(backwards, answers, file_order=True) == {1: 0, 2: 0, 3: 1}


def test_several_parents_any_zero_counts():
    item = _item("m", Question(1, "a"), Question(2, "b"), Question(3, "a and b", (1, 2)))
    assert after_parents(item, {1: True, 2: False, 3: True})[3] == 0
    assert after_parents(item, {1: True, 2: True, 3: True})[3] == 1


def test_scores_by_hand_two_prompts_two_images():
    other = _item("two", Question(1, "Is there a dog?", (), "entity - whole"),
                  Question(2, "Is the dog big?", (1,), "attribute - size"))
    answers = {
        ("chain", 0): {1: True, 2: True, 3: True},  # 3/3
        ("chain", 1): {1: True, 2: False, 3: True},  # q3 zeroed by q2: 1/3
        ("two", 0): {1: False, 2: True},  # q2 zeroed: 0/2
        ("two", 1): {1: True, 2: False},  # 1/2
    }
    result = score([CHAIN, other], answers, images=2)
    assert result["prompts"] == pytest.approx({"chain": 100 * (1 + 1 / 3) / 2, "two": 100 * (0 + 0.5) / 2})
    assert result["overall"] == pytest.approx(((1 + 1 / 3) / 2 + 0.25) / 2 * 100)
    # every question of every image after the parent rule:
    # entity - whole: chain q1 (1, 1), two q1 (0, 1) -> 3/4; attribute - color: (1, 0); attribute - size: (0, 0);
    # relation - spatial: (1, 0)
    assert result["subcategories"] == pytest.approx({"attribute - color": 50.0, "attribute - size": 0.0,
                                                     "entity - whole": 75.0, "relation - spatial": 50.0})
    # broad categories pool the questions (not the fine categories' means): attribute 1 of 4
    assert result["categories"] == pytest.approx({"attribute": 25.0, "entity": 75.0, "relation": 50.0})


def test_official_quirks_categories_use_the_last_image_before_the_parent_rule():
    answers = {("chain", 0): {1: False, 2: False, 3: False}, ("chain", 1): {1: False, 2: True, 3: True}}
    ours = score([CHAIN], answers, images=2)
    official = score([CHAIN], answers, images=2, official_quirks=True)
    assert ours["overall"] == official["overall"] == 0.0  # the parent rule still zeroes every image's score
    assert ours["subcategories"] == {"attribute - color": 0.0, "entity - whole": 0.0, "relation - spatial": 0.0}
    # the last image's raw answers: q2 and q3 answered yes
    assert official["subcategories"] == {"attribute - color": 100.0, "entity - whole": 0.0,
                                         "relation - spatial": 100.0}


def test_official_quirks_broad_category_splits_at_the_first_hyphen():
    item = _item("h", Question(1, "q", (), "entity-whole"), Question(2, "q", (), "global"))
    answers = {("h", 0): {1: True, 2: False}}
    assert score([item], answers, 1)["categories"] == {"entity-whole": 100.0, "global": 0.0}
    assert score([item], answers, 1, official_quirks=True)["categories"] == {"entity": 100.0, "global": 0.0}


def test_a_category_without_a_subcategory_is_named_cleanly():
    item = _item("g", Question(1, "q", (), "global -"), Question(2, "q", (), "entity - whole"))
    answers = {("g", 0): {1: True, 2: False}}
    ours = score([item], answers, 1)
    assert ours["subcategories"] == {"entity - whole": 0.0, "global": 100.0}
    assert ours["categories"] == {"entity": 0.0, "global": 100.0}
    official = score([item], answers, 1, official_quirks=True)  # the official script's names, as it prints them
    assert official["subcategories"] == {"entity - whole": 0.0, "global -": 100.0}
    assert official["categories"] == {"entity": 0.0, "global": 100.0}


def test_missing_answers_are_an_error_not_a_zero():
    with pytest.raises(KeyError, match="image 1"):
        score([CHAIN], {("chain", 0): {1: True, 2: True, 3: True}}, images=2)


# -- reading question files ---------------------------------------------------------------------------------------

ROWS = [
    ["a1", "a cat", "cat", "1", "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"],
    ["a1", "a cat", "red", "2", "1", "attribute", "color", "attribute - color (cat, red)", "Is the cat red?"],
    ["b2", "two dogs, one big", "dog", "1", "0", "entity", "whole", "entity - whole (dog)", "Are there dogs?"],
    ["b2", "two dogs, one big", "big", "2", "1", "attribute", "size", "attribute - size (dog, big)",
     "Is one dog big?"],
    ["b2", "two dogs, one big", "two", "3", "1,2", "other", "count", "other - count (dog, ==2)",
     "Are there two dogs?"],
]


def test_reads_dpg_bench_csv(tmp_path):
    questions = read_questions(_csv(tmp_path, ROWS))
    assert questions.format == "dpg-bench-csv" and questions.question_count == 5 and not questions.notes
    a, b = questions.items
    assert (a.id, a.prompt, b.prompt) == ("a1", "a cat", "two dogs, one big")
    assert b.questions[2] == Question(3, "Are there two dogs?", (1, 2), "other - count")
    assert a.questions[0].parents == ()
    assert len(questions.digest) == 64


def test_official_quirks_skip_the_first_row_and_drop_its_orphans(tmp_path):
    questions = read_questions(_csv(tmp_path, ROWS), official_quirks=True)
    # row 1 (a1's question 1) is skipped; a1's question 2 depends on it, so a1 is left out, as the official
    # scorer's KeyError leaves it out
    assert [item.id for item in questions.items] == ["b2"]
    assert len(questions.notes) == 2 and "line 2" in questions.notes[0] and "'a1' left out" in questions.notes[1]


def test_csv_problems_name_the_line(tmp_path):
    with pytest.raises(QuestionsError, match="line 3: proposition_id must be a whole number"):
        read_questions(_csv(tmp_path, [ROWS[0], [*ROWS[1][:3], "two", *ROWS[1][4:]]]))
    with pytest.raises(QuestionsError, match="question 2 depends on \\[7\\]"):
        read_questions(_csv(tmp_path, [ROWS[0], [*ROWS[1][:4], "7", *ROWS[1][5:]]]))
    with pytest.raises(QuestionsError, match="cycle"):
        read_questions(_csv(tmp_path, [[*ROWS[0][:4], "2", *ROWS[0][5:]], ROWS[1]]))
    bad = tmp_path / "other.csv"
    bad.write_text("prompt,question\na,b\n")
    with pytest.raises(QuestionsError, match="not DPG-Bench's CSV.*TencentQQGYLab/ELLA"):
        read_questions(bad)
    with pytest.raises(QuestionsError, match="no such file.*dpg_bench.csv"):
        read_questions(tmp_path / "dpg_bench.csv")
    with pytest.raises(QuestionsError, match="--official-quirks left no prompt"):
        read_questions(_csv(tmp_path, ROWS[:2]), official_quirks=True)


def test_reads_our_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"id": "cat", "prompt": "a red cat", "questions": [
                {"id": 1, "question": "Is there a cat?", "category": "entity - whole"},
                {"id": 2, "question": "Is the cat red?", "parents": [1], "category": "attribute - color"}]},
             {"prompt": "a dog", "questions": ["Is there a dog?", "Is it running?"]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    questions = read_questions(path)
    assert questions.format == "jsonl"
    cat, dog = questions.items
    assert cat.questions[1] == Question(2, "Is the cat red?", (1,), "attribute - color")
    assert dog.id == "2" and [q.id for q in dog.questions] == [1, 2] and dog.questions[0].category == "other"
    assert questions.limited(1).items == [cat]
    with pytest.raises(QuestionsError, match="does not apply"):
        read_questions(path, official_quirks=True)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1 is not JSON"),
    ('{"prompt": "", "questions": ["q"]}', "non-empty string"),
    ('{"prompt": "p", "questions": []}', "non-empty list"),
    ('{"prompt": "p", "questions": [{"question": "q", "parents": ["1"]}]}', "whole numbers"),
    ('{"prompt": "p", "questions": [{"question": "q", "parents": [2]}]}', "depends on \\[2\\]"),
])
def test_jsonl_problems_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(QuestionsError, match=message):
        read_questions(path)


def test_paired_difference_by_hand():
    from ella_ext.evaluate.scoring import paired_difference

    a = {"p1": 50.0, "p2": 100.0, "p3": 0.0, "only_a": 100.0}
    b = {"p1": 25.0, "p2": 75.0, "p3": 25.0}
    result = paired_difference(a, b)
    # differences 25, 25, -25: mean 25/3; sample variance ((50/3)^2 * 2 + (100/3)^2) / 2 = 2500 / 3
    assert result["prompts"] == 3 and (result["better"], result["worse"]) == (2, 1)
    assert result["mean"] == pytest.approx(25 / 3)
    half = 1.96 * ((2500 / 3) / 3) ** 0.5
    assert result["ci95"] == pytest.approx([25 / 3 - half, 25 / 3 + half])
    one = paired_difference({"p": 1.0}, {"p": 0.0})
    assert one["mean"] == 1.0 and one["ci95"][0] != one["ci95"][0]  # no interval from one prompt
