"""Question sets: DPG-Bench's CSV as published, or a JSONL file of the user's own prompts and questions.

DPG-Bench's CSV has one row per question ("proposition") with the columns ``item_id, text, keywords, proposition_id,
dependency, category_broad, category_detailed, tuple, question_natural_language``: the rows of one prompt share its
``item_id`` and ``text``; ``dependency`` lists the proposition ids a question depends on (``0`` = none, else e.g.
``1,2``); the category is the ``tuple``'s text before ``(`` (e.g. ``entity - whole``).

The JSONL format, one prompt per line::

    {"id": "cat-1", "prompt": "a red cat on a blue chair",
     "questions": [{"id": 1, "question": "Is there a cat?", "category": "entity - whole"},
                   {"id": 2, "question": "Is the cat red?", "parents": [1], "category": "attribute - color"}]}

``id`` defaults to the line number, a question's ``id`` to its place (1, 2, ...), ``parents`` to none and ``category``
to ``other``; a question may also be a bare string.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ELLAError

CSV_COLUMNS = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")
GET_DPG_BENCH = ("DPG-Bench's questions are dpg_bench/dpg_bench.csv in the ELLA repository "
                 "(github.com/TencentQQGYLab/ELLA); download that file and pass its path.")


class QuestionsError(ELLAError):
    """The question file cannot be read: the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Question:
    id: int
    text: str
    parents: tuple[int, ...] = ()
    category: str = "other"  # the fine category (DPG-Bench's "L2"), e.g. "entity - whole"


@dataclass
class Item:
    id: str
    prompt: str
    questions: list[Question]


@dataclass
class QuestionSet:
    items: list[Item]
    name: str  # the file's name
    format: str  # "dpg-bench-csv" or "jsonl"
    digest: str  # sha256 of the file's bytes
    notes: list[str] = field(default_factory=list)  # what the official quirks dropped

    @property
    def question_count(self) -> int:
        return sum(len(item.questions) for item in self.items)

    def limited(self, limit: int | None) -> QuestionSet:
        if limit is None or limit >= len(self.items):
            return self
        return QuestionSet(self.items[:limit], self.name, self.format, self.digest, list(self.notes))


def read_questions(path: Path, official_quirks: bool = False) -> QuestionSet:
    """Read a DPG-Bench CSV (``.csv``) or a JSONL question file (``.jsonl``).

    ``official_quirks``: read the CSV as DPG-Bench's own scorer does: its first data row is skipped, and a prompt
    with a question whose parent is then missing is left out (the official script fails on it and moves on)."""
    path = Path(path)
    if not path.is_file():
        hint = f" {GET_DPG_BENCH}" if path.suffix.lower() == ".csv" or "dpg" in path.name.lower() else ""
        raise QuestionsError(f"--questions {path}: no such file.{hint}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QuestionsError(f"{path.name} is not UTF-8 text ({exc}); save it as UTF-8.") from exc
    if path.suffix.lower() == ".csv":
        items, notes = _read_csv(text, path.name, official_quirks)
        kind = "dpg-bench-csv"
    elif path.suffix.lower() in (".jsonl", ".json"):
        if official_quirks:
            raise QuestionsError("--official-quirks reproduces DPG-Bench's own scorer on its CSV; it does not apply "
                                 f"to {path.name}. Leave it out, or pass dpg_bench.csv.")
        items, notes, kind = _read_jsonl(text, path.name), [], "jsonl"
    else:
        raise QuestionsError(f"{path.name}: give DPG-Bench's .csv or a .jsonl question file (see README, "
                             "\"Evaluating connectors\").")
    if not items:
        if notes:
            raise QuestionsError(f"{path.name}: --official-quirks left no prompt ({'; '.join(notes)}).")
        raise QuestionsError(f"{path.name} holds no questions.")
    for item in items:
        _check_parents(item, path.name, allow_missing=official_quirks)
    return QuestionSet(items, path.name, kind, digest, notes)


def _read_csv(text: str, name: str, official_quirks: bool) -> tuple[list[Item], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold line breaks
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise QuestionsError(f"{name} lacks the column(s) {', '.join(missing)}: it is not DPG-Bench's CSV. "
                             f"{GET_DPG_BENCH} For your own prompts, write a .jsonl file (README, \"Evaluating "
                             "connectors\").")
    items: dict[str, Item] = {}
    notes = []
    for number, row in enumerate(reader):
        line = number + 2  # the header is line 1
        if official_quirks and number == 0:
            notes.append(f"line {line} (prompt {row['item_id']!r}, question {row['proposition_id']}) skipped, as "
                         "the official scorer skips its first data row")
            continue
        item_id = (row["item_id"] or "").strip()
        if not item_id:
            raise QuestionsError(f"{name} line {line}: item_id is empty.")
        question = Question(_whole(row["proposition_id"], name, line, "proposition_id"),
                            (row["question_natural_language"] or "").strip(),
                            _parents(row["dependency"], name, line), _category(row["tuple"]))
        if not question.text:
            raise QuestionsError(f"{name} line {line}: question_natural_language is empty.")
        item = items.setdefault(item_id, Item(item_id, (row["text"] or "").strip(), []))
        if any(q.id == question.id for q in item.questions):
            raise QuestionsError(f"{name} line {line}: prompt {item_id!r} has question {question.id} twice.")
        item.questions.append(question)
    result = []
    for item in items.values():
        if not item.prompt:
            raise QuestionsError(f"{name}: prompt {item.id!r} has an empty text.")
        if official_quirks:
            known = {q.id for q in item.questions}
            lost = sorted({p for q in item.questions for p in q.parents if p not in known})
            if lost:
                notes.append(f"prompt {item.id!r} left out: its questions depend on question(s) {lost}, which the "
                             "skipped row held (the official scorer fails on it and leaves it out)")
                continue
        result.append(item)
    return result, notes


def _whole(value: str | None, name: str, line: int, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise QuestionsError(f"{name} line {line}: {column} must be a whole number; got {value!r}.") from None


def _parents(value: str | None, name: str, line: int) -> tuple[int, ...]:
    parents = [_whole(part, name, line, "dependency") for part in str(value or "0").split(",") if part.strip()]
    return tuple(p for p in parents if p != 0)


def _category(value: str | None) -> str:
    return (value or "").split("(")[0].strip() or "other"


def _read_jsonl(text: str, name: str) -> list[Item]:
    items, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionsError(f"{name} line {number} is not JSON ({exc.msg}).") from None
        if not isinstance(row, dict):
            raise QuestionsError(f"{name} line {number}: a line is an object with \"prompt\" and \"questions\".")
        prompt = row.get("prompt", row.get("text"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise QuestionsError(f"{name} line {number}: \"prompt\" must be a non-empty string.")
        item_id = str(row.get("id", row.get("item_id", number)))
        if item_id in seen:
            raise QuestionsError(f"{name} line {number}: the id {item_id!r} is used twice.")
        seen.add(item_id)
        raw = row.get("questions")
        if not isinstance(raw, list) or not raw:
            raise QuestionsError(f"{name} line {number}: \"questions\" must be a non-empty list.")
        items.append(Item(item_id, prompt.strip(), [_jsonl_question(q, i, name, number) for i, q in enumerate(raw)]))
    return items


def _jsonl_question(raw, index: int, name: str, line: int) -> Question:
    if isinstance(raw, str):
        raw = {"question": raw}
    if not isinstance(raw, dict):
        raise QuestionsError(f"{name} line {line}: question {index + 1} must be a string or an object.")
    text = raw.get("question", raw.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise QuestionsError(f"{name} line {line}: question {index + 1} has no \"question\" text.")
    qid, parents = raw.get("id", index + 1), raw.get("parents", [])
    if isinstance(parents, int):
        parents = [parents]
    if not isinstance(qid, int) or isinstance(qid, bool) or not isinstance(parents, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in parents):
        raise QuestionsError(f"{name} line {line}: question {index + 1}: \"id\" is a whole number and \"parents\" a "
                             "list of whole numbers.")
    category = raw.get("category", "other")
    return Question(qid, text.strip(), tuple(p for p in parents if p != 0), str(category).strip() or "other")


def _check_parents(item: Item, name: str, allow_missing: bool) -> None:
    ids = [q.id for q in item.questions]
    if len(set(ids)) != len(ids):
        raise QuestionsError(f"{name}: prompt {item.id!r} uses a question id twice.")
    known = set(ids)
    for q in item.questions:
        lost = [p for p in q.parents if p not in known]
        if lost and not allow_missing:
            raise QuestionsError(f"{name}: prompt {item.id!r}, question {q.id} depends on {lost}, which it does not "
                                 "have.")
        if q.id in q.parents:
            raise QuestionsError(f"{name}: prompt {item.id!r}, question {q.id} depends on itself.")
    dependency_order(item)  # refuses cycles


def dependency_order(item: Item) -> list[Question]:
    """The questions with every parent before its children (file order otherwise); a cycle is refused."""
    by_id = {q.id: q for q in item.questions}
    order: list[Question] = []
    state: dict[int, int] = {}  # 1 = being visited, 2 = done

    def visit(q: Question, path: tuple[int, ...]) -> None:
        if state.get(q.id) == 2:
            return
        if state.get(q.id) == 1:
            raise QuestionsError(f"prompt {item.id!r}: the questions' dependencies form a cycle "
                                 f"({' -> '.join(map(str, (*path, q.id)))}).")
        state[q.id] = 1
        for parent in q.parents:
            if parent in by_id:
                visit(by_id[parent], (*path, q.id))
        state[q.id] = 2
        order.append(q)

    for q in item.questions:
        visit(q, ())
    return order
