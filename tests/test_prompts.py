"""Tests of ella_ext.prompts against the rules of AUTOMATIC1111 v1.10.1 (commit 82a973c0).

Every expected value below is worked out from the host source named next to it:
    PP = modules/prompt_parser.py, EN = modules/extra_networks.py,
    DN = modules/sd_samplers_cfg_denoiser.py + PP reconstruct_multicond_batch (which schedule entry a step uses).
Where a case is a doctest of the host function, the comment says so.  The host-mirroring cases were also checked
once against the host's own prompt_parser.py (lark 1.1.2, as v1.10.1 pins) under several hash seeds.
"""

from __future__ import annotations

import sys
import time

import pytest

from ella_ext.errors import InputError
from ella_ext.pass_rows import PassTexts, _schedule
from ella_ext.prompts import (
    MAX_EMPHASIS,
    WeightedText,
    attention_segments,
    clean_text,
    emphasis_weights,
    llm_text,
    prompt_schedule,
    split_and,
    strip_extra_networks,
)

ROUND = 1.1  # PP parse_prompt_attention: round_bracket_multiplier
SQUARE = 1 / 1.1  # PP parse_prompt_attention: square_bracket_multiplier


def text_at_step(prompt, step, steps, hires_steps=None, use_old_scheduling=False) -> str:
    """DN: the schedule entry the host conditions on at 0-based ``step`` (the first with ``step <= end``, else the
    first entry), as the product's row schedule gives it to the LLM (each entry cleaned: emphasis and BREAK out,
    whitespace trimmed)."""
    return _schedule(prompt, steps, hires_steps, use_old_scheduling, False, []).at(step)


def llm_texts(prompt, step, steps, hires_steps=None, use_old_scheduling=False, negative=False):
    """What the LLM reads per sub-prompt at ``step``: the product's rows for a one-image pass (``PassTexts``: tags out,
    AND split unless a negative prompt, schedule at the step, emphasis and BREAK removed), each beside the AND weight
    the host gives that sub-prompt (``split_and``; a negative prompt is one row of weight 1)."""
    if negative:
        _, texts = PassTexts([], [prompt], steps, hires_steps, use_old_scheduling=use_old_scheduling).at(step)
        return [(text, 1.0) for text in texts]
    texts, _ = PassTexts([prompt], [], steps, hires_steps, use_old_scheduling=use_old_scheduling).at(step)
    weights = [weight for _, weight in split_and(strip_extra_networks(prompt))]
    return list(zip(texts, weights, strict=True))


def alternating(steps: int, *texts: str) -> list[tuple[int, str]]:
    """PP at_step for [a|b|...]: option (step - 1) % n at every step 1..steps (collect_steps adds range(1, steps+1))."""
    return [(step, texts[(step - 1) % len(texts)]) for step in range(1, steps + 1)]


# ------------------------------------------------------------------------------------------------ extra networks
# EN re_extra_net = <(\w+):([^>]+)> replaced by "" in parse_prompt.


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a <lora:foo:0.8> cat", "a  cat"),
        ("<hypernet:x>", ""),
        ("<lora:a:1><lyco:b:0.5:te=1>x", "x"),
        ("<lora:>", "<lora:>"),  # [^>]+ needs at least one character
        ("<lo ra:x>", "<lo ra:x>"),  # the name is \w+ only
        ("a <lora:x:1", "a <lora:x:1"),  # unclosed
        ("<lora:x:1>AND<lora:y:1>", "AND"),
    ],
)
def test_strip_extra_networks(prompt: str, expected: str) -> None:
    assert strip_extra_networks(prompt) == expected


# ------------------------------------------------------------------------------------------------------------ AND
# PP get_multicond_prompt_list: re_AND = \bAND\b split; re_weight keeps group 1 (leading whitespace kept, trailing
# dropped) and a trailing ":number" (\d+\.? or \d*\.\d+, signed) as the weight, default 1.0.


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
        ("a AND b AND c:2", [("a", 1.0), (" b", 1.0), (" c", 2.0)]),
        ("SANDWICH", [("SANDWICH", 1.0)]),  # no word boundary around AND
        ("a ANDb", [("a ANDb", 1.0)]),
        ("cat(AND)dog", [("cat(", 1.0), (")dog", 1.0)]),  # brackets are word boundaries
        ("x:0.5", [("x", 0.5)]),
        ("x:10", [("x", 10.0)]),
        ("x:.5", [("x", 0.5)]),
        ("x:5.", [("x", 5.0)]),
        ("x : -1 ", [("x", -1.0)]),
        ("x:+2", [("x", 2.0)]),
        ("x:1:2", [("x:1", 2.0)]),
        ("(a:1.2)", [("(a:1.2)", 1.0)]),  # ends with ")", so no weight
        ("x:1.5e2", [("x:1.5e2", 1.0)]),  # no exponent in re_weight
        ("a\nb:2", [("a\nb", 2.0)]),  # (?:\s|.) crosses newlines
        ("", [("", 1.0)]),
        ("AND", [("", 1.0), ("", 1.0)]),
        ("a AND a", [("a", 1.0), (" a", 1.0)]),
    ],
)
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


# ------------------------------------------------------------------------------------------------- prompt editing
# PP get_learned_conditioning_prompt_schedules (grammar schedule_parser, collect_steps, at_step).


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # doctests of the host function (steps=10)
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", alternating(10, "a", "(b:1.1)")),
        ("[fe|]male", alternating(10, "female", "male")),
        ("[fe|||]male", alternating(10, "female", "male", "male", "male")),
        # The doctest "a [{b|d{:.5] c" is stale: plain excludes "|" and no alternate rule fits, so the parse fails and
        # get_schedule returns [[steps, prompt]] (checked against lark 1.1.2, the version v1.10.1 pins).
        ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
        # scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
        ("[a:b:3 ]", [(3, "a"), (10, "b")]),
        ("[a::3]", [(3, "a"), (10, "")]),
        ("[a:b:10]", [(10, "a")]),
        ("[a:b:12]", [(10, "a")]),  # min(steps, N)
        ("[a:b:0]", [(10, "b")]),  # N < 1 is not a switch step, and step <= 0 never holds
        ("[a:b:-1]", [(10, "b")]),
        ("[a:b:+3]", [(3, "a"), (10, "b")]),  # SIGNED_NUMBER
        ("[a:b:0.5]", [(5, "a"), (10, "b")]),
        ("[[a:b:3]:c:6]", [(3, "a"), (6, "b"), (10, "c")]),
        ("[a:[b:c:6]:3]", [(3, "a"), (6, "b"), (10, "c")]),
        ("([a:b:3]:1.2)", [(3, "(a:1.2)"), (10, "(b:1.2)")]),  # emphasized keeps its brackets
        ("\\[a:3\\]", [(10, "\\[a:3\\]")]),  # escapes are plain text
        ("[\\]:3]", [(3, ""), (10, "\\]")]),
        ("", [(10, "")]),
        # alternation nested in prompt editing
        ("[[a|b]:c:3]", [(1, "a"), (2, "b"), (3, "a"), *[(step, "c") for step in range(4, 11)]]),
        # grammar failures keep the prompt: "|" outside an alternate, too many ":", a lone trailing "\"
        ("a | b", [(10, "a | b")]),
        ("(a|b)", [(10, "(a|b)")]),
        ("[a|b:3]", [(10, "[a|b:3]")]),
        ("[a:b:c:3]", [(10, "[a:b:c:3]")]),
        ("[a:3] \\", [(10, "[a:3] \\")]),
        # stray brackets and colons are allowed at the top level only (start: (prompt | /[][():]/+)*)
        ("[[a:3]", [(3, "["), (10, "[a")]),
        ("a:[b:3]", [(3, "a:"), (10, "a:b")]),
        ("(a)[b:3]", [(3, "(a)"), (10, "(a)b")]),
        ("[a:3][b:4]", [(3, ""), (4, "a"), (10, "ab")]),
        ("(a [b:3] c", [(3, "(a  c"), (10, "(a b c")]),
    ],
)
def test_schedule(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_alternation_cycles_by_step() -> None:
    # PP at_step alternate: args[(step - 1) % len(args)]
    assert prompt_schedule("x [a|b|c]", 4) == [(1, "x a"), (2, "x b"), (3, "x c"), (4, "x a")]


def test_fraction_is_truncated() -> None:
    # PP collect_steps: int(0.29 * 100) == int(28.999999999999996) == 28
    assert prompt_schedule("[a:b:0.29]", 100) == [(28, "a"), (100, "b")]


@pytest.mark.parametrize(
    ("prompt", "new", "old"),
    [
        # PP collect_steps. New: "." in N -> N * steps, else N is a step. Old: N < 1 -> N * steps, else N.
        ("[a:b:1.0]", [(10, "a")], [(1, "a"), (10, "b")]),
        ("[a:b:2.5]", [(10, "a")], [(2, "a"), (10, "b")]),
        ("[a:b:1e-1]", [(10, "b")], [(1, "a"), (10, "b")]),
        ("[a:b:3]", [(3, "a"), (10, "b")], [(3, "a"), (10, "b")]),
        ("[a:b:0.5]", [(5, "a"), (10, "b")], [(5, "a"), (10, "b")]),
    ],
)
def test_old_and_new_scheduling(prompt: str, new: list[tuple[int, str]], old: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == new
    assert prompt_schedule(prompt, 10, use_old_scheduling=True) == old


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # doctests with hires_steps=10 (base 10)
        ("a [b:.5] c", [(10, "a b c")]),
        ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
        # PP: int_offset = base steps, flt_offset = 1.0, steps = hires steps
        ("[a:b:15]", [(5, "a"), (10, "b")]),
        ("[a:b:5]", [(10, "b")]),
        ("[a:b:1.7]", [(7, "a"), (10, "b")]),  # (1.7 - 1.0) * 10 == 7.0
        ("[a:b:25]", [(10, "a")]),
    ],
)
def test_hires_schedule(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10, hires_steps=10) == expected


def test_hires_with_other_base_steps() -> None:
    # PP: N=25 with base 20 -> 25 - 20 = 5 of the 8 hires steps
    assert prompt_schedule("[a:b:25]", 20, hires_steps=8) == [(5, "a"), (8, "b")]


def test_old_scheduling_ignores_hires_steps() -> None:
    # PP: "if hires_steps is None or use_old_scheduling": steps = base_steps, no offsets
    assert prompt_schedule("[a:b:0.5]", 10, hires_steps=20, use_old_scheduling=True) == [(5, "a"), (10, "b")]


@pytest.mark.parametrize(("steps", "hires_steps"), [(0, None), (10, 0), (2.5, None), (True, None)])
def test_bad_steps(steps: int, hires_steps: int | None) -> None:
    with pytest.raises(InputError):
        prompt_schedule("a", steps, hires_steps)


# ------------------------------------------------------------------------------------------------- text at a step
# DN: the denoiser's step counter starts at 0; reconstruct_multicond_batch takes the first entry with
# current_step <= end_at_step, and entry 0 when none fits.


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, "a"), (3, "a"), (4, "a b"), (10, "a b"), (11, "a")],  # the host's entry is "a " (test_schedule), cleaned
)
def test_text_at_step(step: int, expected: str) -> None:
    assert text_at_step("a [b:3]", step, 10) == expected


@pytest.mark.parametrize(("step", "expected"), [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (9, "a"), (10, "b")])
def test_alternation_at_step(step: int, expected: str) -> None:
    assert text_at_step("[a|b]", step, 10) == expected


def test_text_at_step_hires() -> None:
    # hires pass: base 10, hires 10, [a:b:15] switches after hires step 5
    assert [text_at_step("[a:b:15]", step, 10, hires_steps=10) for step in (0, 5, 6)] == ["a", "a", "b"]


# -------------------------------------------------------------------------------------------------------- emphasis
# PP parse_prompt_attention (re_attention tokens, multiply_range, unclosed brackets closed at the end, merge of equal
# neighbours) and re_break.


def test_attention_doctests() -> None:
    assert attention_segments("normal text") == [("normal text", 1.0)]
    assert attention_segments("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert attention_segments("(unbalanced") == [("unbalanced", 1.1)]
    assert attention_segments("\\(literal\\]") == [("(literal]", 1.0)]
    assert attention_segments("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert attention_segments("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[a]", [("a", SQUARE)]),
        ("[[a]]", [("a", SQUARE * SQUARE)]),
        ("((a))", [("a", ROUND * ROUND)]),
        ("(a: 1.5 )", [("a", 1.5)]),  # v1.10 allows spaces around the weight
        ("(a:10)b", [("a", 10.0), ("b", 1.0)]),
        ("(a:.5)", [("a", 0.5)]),
        ("(a:b)", [("a:b", 1.1)]),  # ":b" is no weight, ")" closes with 1.1
        ("a:b", [("a:b", 1.0)]),
        ("a)b]", [("a)b]", 1.0)]),  # closers without an opener stay text
        ("[a (b]", [("a ", SQUARE), ("b", SQUARE * ROUND)]),  # "]" closes "[", "(" closes at the end
        ("(a [b", [("a ", ROUND), ("b", ROUND * SQUARE)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("\\\\", [("\\", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("aBREAK BREAKb", [("aBREAK BREAKb", 1.0)]),  # \bBREAK\b
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # the marker is multiplied too
    ],
)
def test_attention_segments(text: str, expected: list[tuple[str, float]]) -> None:
    got = attention_segments(text)
    assert [segment for segment, _ in got] == [segment for segment, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def test_attention_bad_weight() -> None:
    # PP: float("1.2.3") raises in the host as well
    with pytest.raises(InputError):
        attention_segments("(a:1.2.3)")


@pytest.mark.parametrize(
    ("text", "expected_text", "expected_weights"),
    [
        ("a (b:1.5) c", "a b c", [1.0, 1.5, 1.0]),
        ("a  (b)\n\n[c]", "a b c", [1.0, ROUND, SQUARE]),
        ("(dog:1.5),", "dog,", [1.5]),  # the letters decide, not the comma
        ("(un)happy", "unhappy", [1.0]),  # 5 letters at 1.0 against 2 at 1.1
        ("(ab)cd", "abcd", [1.1]),  # a tie goes to the earliest
        ("\\(a\\) \\[b\\] \\\\", "(a) [b] \\", [1.0, 1.0, 1.0]),
        ("BREAK a BREAK b BREAK", "a b", [1.0, 1.0]),
        ("a BREAK, b", "a , b", [1.0, 1.0, 1.0]),
        ("(a BREAK b)", "a b", [1.1, 1.1]),
        ("((a))", "a", [ROUND * ROUND]),
        ("", "", []),
        ("  ", "", []),
    ],
)
def test_emphasis_weights(text: str, expected_text: str, expected_weights: list[float]) -> None:
    cleaned, weights = emphasis_weights(text)
    assert cleaned == expected_text
    assert weights == pytest.approx(expected_weights)
    assert len(weights) == len(cleaned.split())
    assert clean_text(text) == expected_text


@pytest.mark.parametrize(
    ("text", "expected", "out_of_range"),
    [
        ("red cube", "red cube", []),
        ("(red:1) cube", "red cube", []),  # every word at 1: the plain text, the same key as "red cube"
        ("(red:1.5) cube", WeightedText("red cube", (1.5, 1.0)), []),
        ("((a) b:1.2), c", WeightedText("a b, c", (ROUND * 1.2, 1.2, 1.0)), []),
        ("[a] BREAK b", WeightedText("a b", (SQUARE, 1.0)), []),
        ("(a:0) b", WeightedText("a b", (0.0, 1.0)), []),
        ("(a:10) b", WeightedText("a b", (10.0, 1.0)), []),
        ("(a:10.5) b", WeightedText("a b", (MAX_EMPHASIS, 1.0)), [10.5]),
        ("(a:-2) (b:1e0)", WeightedText("a b:1e0", (0.0, ROUND)), [-2.0]),  # "1e0" is no host weight
        ("(a:" + "9" * 400 + ")", WeightedText("a", (MAX_EMPHASIS,)), [float("inf")]),
        ("", "", []),
    ],
)
def test_llm_text(text, expected, out_of_range) -> None:
    got, clamped = llm_text(text)
    assert type(got) is type(expected)
    if isinstance(expected, WeightedText):
        assert got.text == expected.text and got.weights == pytest.approx(expected.weights)
    else:
        assert got == expected
    assert clamped == out_of_range


# ----------------------------------------------------------------------------------------------------- llm_texts
# processing.py: parse_extra_network_prompts (EN) first, then PP get_multicond_prompt_list, then the schedule at the
# step (DN), then the CLIP side's parse_prompt_attention; negatives go through get_learned_conditioning (no AND).

FULL = "<lora:x:1> a (red:1.2) [cat:dog:0.5] BREAK on a [hill|mountain] AND snow:0.3"


@pytest.mark.parametrize(
    ("step", "first"),
    [
        (0, "a red cat on a hill"),
        (2, "a red cat on a mountain"),
        (5, "a red cat on a hill"),
        (7, "a red dog on a hill"),
    ],
)
def test_llm_texts_full(step: int, first: str) -> None:
    assert llm_texts(FULL, step, 10) == [(first, 1.0), ("snow", 0.3)]


def test_llm_texts_examples() -> None:
    assert llm_texts("", 0, 20) == [("", 1.0)]
    assert llm_texts("a cat AND a dog :0.5", 0, 20) == [("a cat", 1.0), ("a dog", 0.5)]
    assert llm_texts("SANDWICH AND x", 0, 20) == [("SANDWICH", 1.0), ("x", 1.0)]
    assert llm_texts("a AND a", 0, 20) == [("a", 1.0), ("a", 1.0)]
    assert llm_texts("a AND b", 0, 20, negative=True) == [("a AND b", 1.0)]
    assert llm_texts("<lora:n:1> a, BREAK [b::3]", 5, 20, negative=True) == [("a,", 1.0)]
    assert llm_texts("[a:b:15]", 6, 10, hires_steps=10) == [("b", 1.0)]
    assert llm_texts("[a:b:1.0]", 3, 10, use_old_scheduling=True) == [("b", 1.0)]
    assert llm_texts("[a:b:1.0]", 3, 10) == [("a", 1.0)]


# ----------------------------------------------------------------------------------------------------------- scale


def test_thousand_words_finish() -> None:
    """A hang guard, not a speed claim: a parser that backtracks exponentially on long prompts takes hours here; the
    linear one takes well under a second on an idle machine (the bound is 30 s so that a loaded CI cannot fail it)."""
    forms = ["(w{}:1.1)", "[w{}:x:0.5]", "w{}"]  # emphasis, prompt editing, plain
    prompt = " ".join(forms[index % 3].format(index) for index in range(1000)) + " [a|b]"
    started = time.perf_counter()
    texts = llm_texts(prompt, 0, 150)
    cleaned, weights = emphasis_weights(prompt)
    assert time.perf_counter() - started < 30.0
    assert texts[0][0].split()[:3] == ["w0", "w1", "w2"]
    assert len(texts[0][0].split()) == 1001
    assert len(weights) == len(cleaned.split())


def test_deep_nesting_does_not_recurse() -> None:
    depth = sys.getrecursionlimit() * 2
    nested = "(" * depth + "a" + ")" * depth
    assert prompt_schedule(nested, 10) == [(10, nested)]
    assert clean_text(nested) == "a"
    unclosed = "[" * depth + "a:3]"
    assert prompt_schedule(unclosed, 10) == [(3, "[" * (depth - 1)), (10, "[" * (depth - 1) + "a")]
