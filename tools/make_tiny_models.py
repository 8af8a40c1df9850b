"""Make the tiny ELLA models that tools/webui_smoke.py and the UI trials use, in a WebUI's models folder.

    python tools/make_tiny_models.py /path/to/webui/models      # with the WebUI's Python (torch, transformers)

Writes ``ELLA/tiny-sd15.safetensors`` (a random connector: SD 1.5's 768-wide context from the tiny LLM's features),
``ELLA/tiny-sd15-other-llm.safetensors`` (the same weights, its metadata naming another LLM, for the mismatch warning)
and ``ELLA/text_encoders/tiny-t5/`` (a tiny T5 encoder with a sentencepiece tokenizer trained on a few sentences),
made by the same code the tests use. Random weights: images change with ELLA, but show nothing. A LoRA for the
smoke's LoRA check is not made here: give ``--lora NAME`` of any LoRA in models/Lora (the real-host recipes'
``make_random_lora.py`` makes one), or leave it out.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ella_ext.connector import Connector, ConnectorConfig  # noqa: E402
from ella_ext.connector_file import META_LLM, save_connector  # noqa: E402
from tests.random_weights import init_random  # noqa: E402
from tests.tiny_llms import HIDDEN, make_t5  # noqa: E402

CONNECTOR = "tiny-sd15"
OTHER_LLM_CONNECTOR = "tiny-sd15-other-llm"
TEXT_ENCODER = "tiny-t5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="the WebUI's models folder")
    parser.add_argument("--width", type=int, default=768, help="the checkpoint's context width (SDXL: 2048)")
    args = parser.parse_args()
    ella = args.models / "ELLA"
    encoder = make_t5(ella / "text_encoders" / TEXT_ENCODER)
    config = ConnectorConfig(time_channels=16, time_embed_dim=24, width=32, layers=1, heads=4, num_latents=8,
                             input_dim=HIDDEN, output_dim=args.width)
    connector = init_random(Connector(config), torch.Generator().manual_seed(3), std=0.2).eval()
    path = ella / f"{CONNECTOR}.safetensors"
    save_connector(connector, path, metadata={META_LLM: TEXT_ENCODER})
    other = ella / f"{OTHER_LLM_CONNECTOR}.safetensors"
    save_connector(connector, other, metadata={META_LLM: "some-org/other-llm"})
    print(f"connectors   {path}, {other}\ntext encoder {encoder}")
    print(f"use: python tools/webui_smoke.py --connector {CONNECTOR} --text-encoder {TEXT_ENCODER} [--lora NAME]")


if __name__ == "__main__":
    main()
