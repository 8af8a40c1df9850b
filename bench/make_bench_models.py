"""Random-weight models of full size for bench_host.py: a connector of the trainer's default shape and an LLM of
flan-T5-XL's width, so a WebUI can be timed with ELLA on and off without downloading anything.

    python bench/make_bench_models.py --family sdxl --tokenizer <a T5 folder with spiece.model> \\
        --llm-layers 2 --out <the WebUI's models/ELLA>

writes ``<out>/<family>-full-random.safetensors`` (the trainer's default TSC shape for the family, reading 2048-wide
features: 0.47 B parameters for SDXL, with SDXL's attention pool unless ``--pooled clip``) and
``<out>/text_encoders/t5-xl-width-random/`` (a T5 encoder with flan-T5-XL's width, heads and feed-forward size, and
``--llm-layers`` of its 24 layers: the connector's cost is full size, the LLM's is a fraction of T5-XL's, which
bench_core.py times whole). Weights are random: the images mean nothing, the time and memory do.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ella_ext.connector import ConnectorConfig  # noqa: E402
from ella_ext.connector_file import META_BASE_FAMILY, META_LLM, save_connector  # noqa: E402
from ella_ext.train.model import FAMILY_DEFAULTS, init_connector  # noqa: E402

T5_XL = {"d_model": 2048, "d_ff": 5120, "num_heads": 32, "d_kv": 64, "vocab_size": 32128}  # flan-t5-xl's encoder
CONTEXT = {"sd15": 768, "sdxl": 2048}
POOLED = {"sdxl": 1280}
LLM_NAME = "t5-xl-width-random"
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def connector_shape(family: str, pooled: str) -> ConnectorConfig:
    d = FAMILY_DEFAULTS[family]
    out = CONTEXT[family]
    shape = ConnectorConfig(time_channels=d["time_channels"], time_embed_dim=d["width"], width=d["width"],
                            layers=d["layers"], heads=d["heads"], num_latents=d["latents"], input_dim=T5_XL["d_model"],
                            output_dim=None if out == d["width"] else out)
    if pooled == "attention":
        if family not in POOLED:
            raise SystemExit("--pooled attention is for SDXL (SD 1.5 takes no pooled vector)")
        shape = replace(shape, pooled_width=POOLED[family])
    return shape


def tokenizer_files(tokenizer: Path) -> list[str]:
    found = [name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if "spiece.model" not in found and "tokenizer.json" not in found:
        raise SystemExit(f"{tokenizer} has neither spiece.model nor tokenizer.json: give a T5 tokenizer's folder")
    return found


def write_llm(folder: Path, tokenizer: Path, layers: int, seed: int) -> int:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(**T5_XL, num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    model = T5EncoderModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in tokenizer_files(tokenizer):
        shutil.copy2(tokenizer / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CONTEXT), default="sdxl")
    parser.add_argument("--pooled", choices=("clip", "attention"), default=None,
                        help="SDXL's pooled vector (default: attention for sdxl, clip for sd15)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a T5 tokenizer's folder (spiece.model)")
    parser.add_argument("--llm-layers", type=int, default=2, help="encoder layers of the LLM (T5-XL has 24)")
    parser.add_argument("--out", type=Path, required=True, help="the WebUI's models/ELLA folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pooled = args.pooled or ("attention" if args.family == "sdxl" else "clip")

    shape = connector_shape(args.family, pooled)
    tokenizer_files(args.tokenizer)  # before anything is written
    model = init_connector(shape, args.seed)
    for parameter in model.parameters():  # a trained connector's AdaLN is not zero: give every weight a value
        if parameter.abs().max() == 0:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(args.seed))
    path = args.out / f"{args.family}-full-random.safetensors"
    args.out.mkdir(parents=True, exist_ok=True)
    save_connector(model, path, {META_LLM: LLM_NAME, META_BASE_FAMILY: args.family})
    connector_params = sum(p.numel() for p in model.parameters())
    llm_params = write_llm(args.out / "text_encoders" / LLM_NAME, args.tokenizer, args.llm_layers, args.seed)
    print(f"connector: {path} ({connector_params / 1e6:.1f} M parameters, pooled = {pooled})")
    print(f"LLM: {args.out / 'text_encoders' / LLM_NAME} ({llm_params / 1e6:.1f} M parameters, "
          f"{args.llm_layers} of T5-XL's 24 layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
