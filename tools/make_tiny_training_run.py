"""Make a tiny training run to try the trainer on a CPU in a few minutes: a tiny SD 1.5-shaped base (a diffusers
folder), a tiny T5 LLM, eight captioned images and a ``run.toml`` that trains on them.

    pip install -e ".[train,test]"                 # from a clone of this repository
    python tools/make_tiny_training_run.py runs/tiny
    python -m ella_ext.train train --config runs/tiny/run.toml
    cd runs/tiny && python -m ella_ext.train eval --config run.toml --connector output/connector-step10.safetensors \
        --connector output/connector.safetensors --baseline --questions questions.jsonl --vqa tiny-vilt-vqa \
        --output eval

Random weights, made by the code the trainer's tests use: the run shows every file and log line a real run makes
(connector.safetensors, metrics.jsonl, checkpoints/, samples/, TensorBoard logs), not a useful connector. The base
has its own CLIP (for ``eval --baseline``), and a question file and a tiny random VQA judge (ViLT-shaped) are there to
try ``eval``: its scores are noise, its files (eval.json, answers.jsonl, report.html) are what a real eval writes.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_llms import make_t5  # noqa: E402
from tests.train.conftest import (  # noqa: E402
    CAPTIONS,
    add_text_encoders,
    make_base,
    make_caption_folder,
    write_config,
)
from tests.train.tiny_judges import make_tiny_vilt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the models, images and run.toml go (made if missing)")
    args = parser.parse_args()
    folder = args.folder.resolve()
    if (folder / "run.toml").exists():
        raise SystemExit(f"{folder / 'run.toml'} exists already; pick another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    base = add_text_encoders(make_base(folder / "tiny-sd15"), "sd15")
    llm = make_t5(folder / "tiny-t5")
    images = make_caption_folder(folder / "images")
    config = write_config(folder / "run.toml", base=base, llm=llm, images=images, output=folder / "output",
                          train={"steps": 20, "batch_size": 2, "lr": 1e-3, "save_every": 10, "sample_every": 10,
                                 "workers": 0},
                          sample={"prompts": ["a red square on a white background"], "steps": 10})
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"p{i}", "prompt": caption, "questions": [
        {"id": 1, "question": f"Is there {caption.split(' on ')[0].split(' in ')[0]}?", "category": "entity - whole"},
        {"id": 2, "question": "Is the picture as described?", "parents": [1], "category": "global"}]}) + "\n"
        for i, caption in enumerate(CAPTIONS[:4])))
    make_tiny_vilt(folder / "tiny-vilt-vqa")
    print(f"Wrote {config}. Train with:\n  python -m ella_ext.train train --config {config}\nthen score two "
          f"checkpoints and the base model:\n  cd {folder} && python -m ella_ext.train eval --config run.toml "
          "--connector output/connector-step10.safetensors --connector output/connector.safetensors --baseline "
          "--questions questions.jsonl --vqa tiny-vilt-vqa --output eval")


if __name__ == "__main__":
    main()
