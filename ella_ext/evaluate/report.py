"""``report.html``: one page a person opens (no scripts, no network): the score table, per-category bars, and for
each prompt every contestant's images side by side with the questions that failed. Prompts where the contestants
differ most come first."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from .questions import QuestionSet
from .scoring import after_parents

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}td.best{font-weight:bold;background:#e8f5e9}
.bar{height:12px;background:#5c8fd6;display:inline-block;vertical-align:middle}
.bars td{border:none;padding:1px 6px}.cat{margin:10px 0}
.prompt{border-top:2px solid #ddd;padding:10px 0}.prompt p{margin:4px 0}
.row{display:flex;gap:12px;align-items:flex-start;margin:6px 0}.who{width:220px;flex:none}
.imgs{display:flex;gap:4px;flex:none}.imgs figure{margin:0;text-align:center;font-size:12px}
.imgs img{width:160px;height:160px;object-fit:contain;background:#eee}
.fails{font-size:13px;color:#a33}.fails li{margin:0}.muted{color:#777}
"""


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.2f}"


def write_report(output: Path, content: dict, question_set: QuestionSet, records: list[dict]) -> Path:
    results = content["results"]
    names = list(results)
    quirks = content["questions"]["official_quirks"]
    images = content["settings"]["images_per_prompt"]
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ELLA eval: {esc(', '.join(names))}</title>"
             f"<style>{STYLE}</style></head><body>", "<h1>ELLA eval</h1>", _header(content)]

    categories = sorted({c for r in results.values() for c in r["categories"]})
    parts.append("<h2>Scores</h2><table><tr><th>contestant</th><th>overall</th>"
                 + "".join(f"<th>{esc(c)}</th>" for c in categories) + "</tr>")
    columns = [("overall", None)] + [("categories", c) for c in categories]
    best = {col: max((_value(results[n], *col) for n in names), default=float("nan")) for col in columns}
    for name in names:
        cells = []
        for col in columns:
            value = _value(results[name], *col)
            mark = " class='best'" if len(names) > 1 and value == best[col] else ""
            cells.append(f"<td{mark}>{_fmt(value)}</td>")
        parts.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    if content.get("comparisons"):
        parts.append("<table><tr><th>contestant</th><th>against</th><th>difference (points)</th><th>95% interval"
                     "</th><th>prompts better / worse / of</th><th>verdict</th></tr>")
        for name, c in content["comparisons"].items():
            low, high = c["ci95"]
            verdict = ("better" if low > 0 else "worse" if high < 0 else "cannot tell apart") if low == low \
                else "too few prompts"
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(c['against'])}</td><td>{c['mean']:+.2f}</td>"
                         f"<td>{_fmt(low)} to {_fmt(high)}</td><td>{c['better']} / {c['worse']} / {c['prompts']}"
                         f"</td><td>{verdict}</td></tr>")
        parts.append("</table><p class='muted'>The interval is the mean per-prompt difference &plusmn; 1.96 paired "
                     "standard errors; one that holds 0 means these prompts and this judge cannot tell the two "
                     "apart.</p>")

    parts.append("<h2>By category</h2>")
    for category in sorted({c for r in results.values() for c in r["subcategories"]}):
        rows = "".join(f"<tr><td>{esc(n)}</td><td><span class='bar' style='width:{max(0.0, v) * 3:.0f}px'></span> "
                       f"{_fmt(v)}</td></tr>"
                       for n in names for v in [results[n]["subcategories"].get(category, float("nan"))]
                       if v == v)
        parts.append(f"<div class='cat'><b>{esc(category)}</b><table class='bars'>{rows}</table></div>")

    parts.append("<h2>Prompts</h2><p class='muted'>Where the contestants differ most first. Under each image its "
                 "score; beside the images the questions that failed (answered no, or zeroed because a question "
                 "they depend on failed) and on how many images.</p>")
    by_image: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
    for r in records:
        by_image[(r["contestant"], r["item_id"], r["image"])][r["question_id"]] = r

    def spread(item) -> float:
        values = [results[n]["prompts"].get(item.id, 0.0) for n in names]
        return max(values) - min(values)

    for item in sorted(question_set.items, key=spread, reverse=True):
        parts.append(f"<div class='prompt'><p><b>{esc(item.id)}</b> <span class='muted'>(spread "
                     f"{spread(item):.1f})</span></p><p>{esc(item.prompt)}</p>")
        for name in names:
            figures, failed = [], defaultdict(lambda: [0, False])
            for index in range(images):
                answers = by_image.get((name, item.id, index), {})
                if len(answers) != len(item.questions):
                    continue
                scores = after_parents(item, {q: a["yes"] for q, a in answers.items()}, file_order=quirks)
                for q in item.questions:
                    if not scores[q.id]:
                        failed[q.id][0] += 1
                        failed[q.id][1] |= bool(answers[q.id]["yes"])  # answered yes but zeroed by a parent
                image_file = next(iter(answers.values()))["image_file"]
                value = 100 * sum(scores.values()) / len(scores)
                figures.append(f"<figure><img loading='lazy' src='{esc(image_file)}' alt=''><figcaption>"
                               f"{value:.0f}</figcaption></figure>")
            fails = "".join(
                f"<li>{esc(q.text)} <span class='muted'>({failed[q.id][0]}/{images}"
                f"{', zeroed by a parent' if failed[q.id][1] else ''})</span></li>"
                for q in item.questions if q.id in failed)
            parts.append(f"<div class='row'><div class='who'><b>{esc(name)}</b><br>"
                         f"{_fmt(results[name]['prompts'].get(item.id, float('nan')))}</div>"
                         f"<div class='imgs'>{''.join(figures)}</div><ul class='fails'>{fails}</ul></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    from .results import write_text

    return write_text(output / "report.html", "\n".join(parts))


def _value(result: dict, section: str, key: str | None) -> float:
    return result[section] if key is None else result[section].get(key, float("nan"))


def _header(content: dict) -> str:
    esc = html.escape
    s, q, judge = content["settings"], content["questions"], content["judge"]
    lines = [
        f"Questions: {esc(q['file'])} ({q['prompts']} prompts, {q['questions']} questions"
        f"{', official scorer quirks' if q['official_quirks'] else ''})",
        f"Judge: {esc(str(judge.get('name', '?')))}" + (f" ({esc(str(judge['kind']))})" if judge.get("kind") else ""),
        f"Base: {esc(s['base'])}; LLM: {esc(s['llm'])}; {s['images_per_prompt']} image(s) per prompt, {s['sampler']} "
        f"{s['steps']} steps, CFG {s['cfg']}, {s['resolution']} px, seed {s['seed']}, negative: {esc(s['negative'])}",
    ]
    lines += [f"Note: {esc(n)}" for n in q["notes"]]
    return "<p>" + "<br>".join(lines) + "</p>"
