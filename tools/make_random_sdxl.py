"""Make a random-weight SDXL base checkpoint in A1111's single-file layout, offline, with the WebUI's own model code.

The file has the key layout of Stability AI's ``sd_xl_base_1.0.safetensors`` (``model.diffusion_model.*`` the UNet,
``conditioner.embedders.0.transformer.*`` CLIP-L in the transformers layout, ``conditioner.embedders.1.model.*``
OpenCLIP ViT-bigG's text tower, ``first_stage_model.*`` the VAE), full size (2.6 B UNet parameters, about 6.9 GB in
fp16), so the extension and the connector trainer can be tried on SDXL without downloading 7 GB. The weights are
random: images are noise, but every shape, key and code path is the real one.

Run it with the Python of an AUTOMATIC1111 WebUI (1.6 or later: it carries Stability AI's ``generative-models``
(``sgm``) in ``repositories/``, and ``open_clip`` and ``transformers`` in its venv), offline:

    HF_HOME=<the WebUI's HF cache> HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        webui/venv/bin/python tools/make_random_sdxl.py --webui webui sdxl-random.safetensors \\
        --trainer-config sdxl-random-config

The models come from ``repositories/generative-models/configs/inference/sd_xl_base.yaml`` (what the WebUI loads SDXL
files with). CLIP-L is built from the config of ``openai/clip-vit-large-patch14`` in the HF cache (its tokenizer is
read there too: the WebUI needs the same cache); OpenCLIP's ViT-bigG is built with ``pretrained=None`` (no download)
and without its vision tower, which the WebUI deletes anyway. Memory stays near the largest part in fp16 (the UNet,
about 5 GB): the parts are built one at a time with float16 as the default dtype, and each part's tensors are
streamed into the file (the header is computed first from the same models built on the meta device). Weights the
code initialises to zero (``zero_module``: each ResBlock's last convolution, the transformers' ``proj_out``, the
UNet's last convolution) get N(0, 0.02), so the UNet's output depends on its input; biases stay as the code made
them.

``--small``: a reduced UNet (64 channels instead of 320, one transformer block per level instead of 1, 2, 10:
about 40 M parameters instead of 2.6 B); CLIP-L, CLIP-G and the VAE stay full size, so the context is still 2048
wide and the pooled vector 1280 wide (a connector trained on it fits the full-size file). The WebUI needs the
``.yaml`` written beside the file to load it (A1111 reads ``<checkpoint>.yaml``).

``--trainer-config DIR`` writes the diffusers-layout configs ``python -m ella_ext.train`` needs for this file as
``[model] base_config``: the project's carried SDXL configs (``unet/`` reduced with ``--small``) and ``tokenizer_2/``
(CLIP-G's tokenizer: OpenCLIP's vocabulary, the same as CLIP-L's, with ``!`` as the padding token as in the
official diffusers release), made from the CLIP tokenizer in the HF cache. Without an output file only these configs
are written (in seconds): what a real ``sd_xl_base_1.0.safetensors`` needs to be trained on as a single file.
"""

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRIED_CONFIGS = ROOT / "ella_ext" / "train" / "configs" / "sdxl"
CLIP_L = "openai/clip-vit-large-patch14"
SMALL_CHANNELS = 64
SMALL_DEPTH = [1, 1, 1]
DTYPE_NAMES = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32", "bfloat16": "BF16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("output", type=Path, nargs="?",
                        help="the .safetensors file to write (leave out to write only --trainer-config)")
    parser.add_argument("--webui", type=Path, required=True,
                        help="the A1111 WebUI folder (holds repositories/generative-models)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--small", action="store_true",
                        help="a 64-channel UNet with one transformer block per level (CLIPs and VAE full size)")
    parser.add_argument("--trainer-config", type=Path,
                        help="also write the diffusers configs and CLIP-G tokenizer for ella_ext.train's base_config")
    args = parser.parse_args()
    if args.output is None and args.trainer_config is None:
        parser.error("give the output file, --trainer-config, or both")
    return args


def model_config(webui: Path, small: bool):
    from omegaconf import OmegaConf

    config = OmegaConf.load(webui / "repositories" / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml")
    if small:
        config.model.params.network_config.params.model_channels = SMALL_CHANNELS
        config.model.params.network_config.params.transformer_depth = SMALL_DEPTH
    return config


def patch_offline() -> None:
    """CLIP-L from its config only, OpenCLIP without pretrained weights and without its vision tower."""
    import open_clip
    import open_clip.model
    import sgm.modules.encoders.modules as encoders
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    class NoVisual(torch.nn.Module):
        """Stands in for the vision tower, which the WebUI deletes after building (sgm's FrozenOpenCLIPEmbedder2)."""
        image_size = 224

    open_clip.model._build_vision_tower = lambda *args, **kwargs: NoVisual()
    create = open_clip.create_model_and_transforms

    def create_random(arch, *args, **kwargs):
        kwargs["pretrained"] = None
        kwargs["device"] = torch.empty(0).device  # the meta device while the header is computed
        return create(arch, *args, **kwargs)

    encoders.open_clip.create_model_and_transforms = create_random

    class RandomCLIPTextModel(CLIPTextModel):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return CLIPTextModel(CLIPTextConfig.from_pretrained(name))

    encoders.CLIPTextModel = RandomCLIPTextModel


def parts(config):
    """(key prefix, the sgm config that builds it), in the file's order."""
    params = config.model.params
    return [("model.diffusion_model.", params.network_config), ("conditioner.", params.conditioner_config),
            ("first_stage_model.", params.first_stage_config)]


def build(part_config, device: str):
    import torch
    from sgm.util import instantiate_from_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            module = instantiate_from_config(part_config)
    finally:
        torch.set_default_dtype(previous)
    return module.eval().requires_grad_(False)


def file_tensors(prefix: str, module):
    """The tensors a checkpoint holds for this part: floats in fp16, integer buffers (CLIP-L's position ids) as they
    are."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != torch.float16:
            tensor = tensor.to(torch.float16)
        yield prefix + name, tensor


def fill_zero_weights(module, seed: int) -> int:
    import torch

    generator = torch.Generator().manual_seed(seed)
    filled = 0
    for name, parameter in module.named_parameters():
        if parameter.numel() > 1 and not name.endswith("bias") and not torch.count_nonzero(parameter):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * 0.02)
            filled += 1
    return filled


def write_checkpoint(output: Path, config, seed: int, metadata: dict) -> dict:
    import torch

    header, offset, counts = {}, 0, {}
    for prefix, part_config in parts(config):
        module = build(part_config, "meta")
        for key, tensor in file_tensors(prefix, module):
            size = tensor.numel() * tensor.element_size()
            header[key] = {"dtype": DTYPE_NAMES[str(tensor.dtype).replace("torch.", "")],
                           "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
            offset += size
            group = ".".join(key.split(".")[:3]) if prefix == "conditioner." else prefix.rstrip(".")
            counts[group] = counts.get(group, 0) + 1
        del module
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        start = file.tell()
        for number, (prefix, part_config) in enumerate(parts(config)):
            torch.manual_seed(seed + number)
            module = build(part_config, "cpu")
            with torch.no_grad():
                filled = fill_zero_weights(module, seed + 100 + number)
            written = 0
            for key, tensor in file_tensors(prefix, module):
                entry = header[key]
                if list(tensor.shape) != entry["shape"] or file.tell() - start != entry["data_offsets"][0]:
                    raise RuntimeError(f"{key}: the real build differs from the meta build")
                file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                written += 1
            print(f"{prefix.rstrip('.')}: {written} tensors, "
                  f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M parameters, "
                  f"{filled} zero-initialised weights filled with N(0, 0.02)", flush=True)
            del module
        if file.tell() - start != offset:
            raise RuntimeError("the file's size differs from its header")
    partial.replace(output)
    return counts


def write_a1111_yaml(output: Path, webui: Path) -> Path:
    from omegaconf import OmegaConf

    path = output.with_suffix(".yaml")
    OmegaConf.save(model_config(webui, small=True), path)
    return path


def write_trainer_config(folder: Path, small: bool) -> None:
    from transformers.utils import cached_file

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(CARRIED_CONFIGS, folder)
    if small:
        unet_file = folder / "unet" / "config.json"
        unet = json.loads(unet_file.read_text())
        unet["block_out_channels"] = [SMALL_CHANNELS * m for m in (1, 2, 4)]
        unet["attention_head_dim"] = [SMALL_CHANNELS * m // 64 for m in (1, 2, 4)]
        unet["transformer_layers_per_block"] = SMALL_DEPTH
        unet_file.write_text(json.dumps(unet, indent=2) + "\n")
    tokenizer = folder / "tokenizer_2"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(cached_file(CLIP_L, name), tokenizer / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (tokenizer / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, **special}, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    webui = args.webui.resolve()
    sys.path.insert(0, str(webui / "repositories" / "generative-models"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import pytorch_lightning.utilities.rank_zero

    # what the WebUI itself does for pytorch_lightning >= 1.8 (modules/initialize_util.py)
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", pytorch_lightning.utilities.rank_zero)
    if args.output is None:
        write_trainer_config(args.trainer_config.resolve(), args.small)
        print(f"trainer configs: {args.trainer_config} (set [model] base_config to it)")
        return
    patch_offline()
    config = model_config(webui, args.small)
    metadata = {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "ella.note": "random weights for trying the ELLA extension offline; not a trained model",
                "ella.variant": "small" if args.small else "full", "ella.seed": str(args.seed)}
    counts = write_checkpoint(args.output, config, args.seed, metadata)
    print("tensors per group:", json.dumps(counts))
    print(f"{sum(counts.values())} tensors, {args.output.stat().st_size} bytes: {args.output}")
    if args.small:
        print("A1111 config beside it:", write_a1111_yaml(args.output, webui))
    if args.trainer_config:
        write_trainer_config(args.trainer_config.resolve(), args.small)
        print(f"trainer configs: {args.trainer_config} (set [model] base_config to it)")


if __name__ == "__main__":
    main()
