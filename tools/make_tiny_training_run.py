"""Make a tiny training run to try the trainer on a CPU in a few minutes: a tiny SD 1.5-shaped base (a diffusers
folder), a tiny T5 LLM, eight captioned images and a ``run.toml`` that trains on them.

    pip install -e ".[train,test]"                 # from a clone of this repository
    python tools/make_tiny_training_run.py runs/tiny
    python -m ella_ext.train train --config runs/tiny/run.toml

Random weights, made by the code the trainer's tests use: the run shows every file and log line a real run makes
(connector.safetensors, metrics.jsonl, checkpoints/, samples/, TensorBoard logs), not a useful connector.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_llms import make_t5  # noqa: E402
from tests.train.conftest import make_base, make_caption_folder, write_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the models, images and run.toml go (made if missing)")
    args = parser.parse_args()
    folder = args.folder.resolve()
    if (folder / "run.toml").exists():
        raise SystemExit(f"{folder / 'run.toml'} exists already; pick another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    base = make_base(folder / "tiny-sd15")
    llm = make_t5(folder / "tiny-t5")
    images = make_caption_folder(folder / "images")
    config = write_config(folder / "run.toml", base=base, llm=llm, images=images, output=folder / "output",
                          train={"steps": 20, "batch_size": 2, "lr": 1e-3, "save_every": 10, "sample_every": 10,
                                 "workers": 0},
                          sample={"prompts": ["a red square on a white background"], "steps": 10})
    print(f"Wrote {config}. Train with:\n  python -m ella_ext.train train --config {config}")


if __name__ == "__main__":
    main()
