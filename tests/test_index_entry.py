"""The extension-index entry (index/sd-webui-ella.json) has the fields and tags the index's validator accepts
(AUTOMATIC1111/stable-diffusion-webui-extensions: extension_template.json, tags.json, .github/scripts/validate.py)."""

import json
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[1] / "index" / "sd-webui-ella.json"
# tags.json of the index, minus "installed" (internal) and "online" (this extension only downloads models once)
ALLOWED_TAGS = {"script", "localization", "tab", "dropdown", "ads", "training", "models", "UI related", "prompting",
                "editing", "manipulations", "animation", "query", "science", "extras"}


def test_entry_fields_and_tags():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert set(entry) == {"name", "url", "description", "tags"}
    assert entry["url"].startswith("https://github.com/") and entry["url"].endswith(".git")
    assert entry["tags"] and set(entry["tags"]) <= ALLOWED_TAGS
    assert 0 < len(entry["description"]) <= 400
