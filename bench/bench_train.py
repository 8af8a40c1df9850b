"""Training throughput: one TSC training step (``ella_ext.train.objective.compute_loss`` + backward + AdamW step, on
cached latents and features) against the floor no TSC trainer can beat: the bare frozen UNet's forward and backward
at the same batch, with a context that needs a gradient (the gradient enters at the cross-attention and flows back
through the whole UNet either way). Both in one run, alternating, after a warm-up.

    python bench/bench_train.py                       # CPU, small UNet (SD 1.5's block structure, narrow)
    python bench/bench_train.py --size sd15 --batch 8 --resolution 512 --gradient-checkpointing   # on a GPU
    python bench/bench_train.py --size sdxl --batch 4 --resolution 1024 --gradient-checkpointing

Prints images/s for both, the ratio (target on a GPU: a step at most 1.15x the floor) and, on CUDA, peak memory.
Random weights: the time and memory do not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ella_ext.train.model import CONFIGS, FAMILY_DEFAULTS, Base, init_connector  # noqa: E402


def make_unet(size: str):
    from diffusers import UNet2DConditionModel

    if size in ("sd15", "sdxl"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / size, subfolder="unet"))
    return UNet2DConditionModel(  # SD 1.5's structure at an eighth of its width
        block_out_channels=(40, 80, 160, 160), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "sd15", "sdxl"), default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--llm-width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    args = parser.parse_args()

    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from ella_ext.train.feed import Inputs
    from ella_ext.train.model import connector_config  # noqa: F401  (the shape rules the trainer uses)
    from ella_ext.train.objective import compute_loss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if cuda else torch.float32)
    accelerator = Accelerator(mixed_precision={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no"))
    family = "sdxl" if args.size == "sdxl" else "sd15"
    unet = make_unet(args.size).to(device, dtype).requires_grad_(False).eval()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler.from_pretrained(CONFIGS / family, subfolder="scheduler")
    base = Base(family, unet, None, scheduler, "epsilon", args.size)
    context_width = unet.config.cross_attention_dim
    shape = FAMILY_DEFAULTS[family]
    from ella_ext.connector import ConnectorConfig

    tsc_shape = ConnectorConfig(time_channels=shape["time_channels"], time_embed_dim=shape["width"],
                                width=shape["width"], layers=shape["layers"], heads=shape["heads"],
                                num_latents=shape["latents"], input_dim=args.llm_width,
                                output_dim=None if context_width == shape["width"] else context_width)
    connector = init_connector(tsc_shape, 0).to(device).train()
    optimizer = torch.optim.AdamW(connector.parameters(), lr=1e-5, weight_decay=0.01)
    connector, optimizer = accelerator.prepare(connector, optimizer)
    latent = args.resolution // 8
    b = args.batch
    generator = torch.Generator().manual_seed(0)

    def inputs():
        return Inputs(torch.randn(b, 4, latent, latent, generator=generator).to(device),
                      torch.randn(b, args.tokens, args.llm_width, generator=generator).to(device), None,
                      torch.randint(0, 1000, (b,), generator=generator).to(device),
                      torch.randn(b, 4, latent, latent, generator=generator).to(device),
                      torch.randn(b, 1280).to(device) if family == "sdxl" else None,
                      torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * b,
                                   dtype=torch.float32) if family == "sdxl" else None)

    def ours():
        loss = compute_loss(connector, base, inputs(), accelerator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def floor():
        x = inputs()
        context = torch.randn(b, shape["latents"], context_width, device=device, dtype=dtype, requires_grad=True)
        noisy = scheduler.add_noise(x.latents, x.noise, x.timesteps)
        with accelerator.autocast():
            out = unet(noisy.to(dtype), x.timesteps, encoder_hidden_states=context,
                       added_cond_kwargs=base.added_conditions(x.pooled, x.time_ids, dtype)).sample
        torch.nn.functional.mse_loss(out.float(), x.noise.float()).backward()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() if cuda else None)

    timed(floor)
    timed(ours)  # warm-up
    results = {"floor": [], "ours": []}
    memory = {}
    for _ in range(args.steps):
        for name, fn in (("floor", floor), ("ours", ours)):
            seconds, peak = timed(fn)
            results[name].append(seconds)
            memory[name] = peak
    tsc = sum(p.numel() for p in accelerator.unwrap_model(connector).parameters())
    print(f"device {device}, dtype {dtype}, UNet {args.size} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M)"
          f", TSC {tsc / 1e6:.1f} M, batch {b}, {args.resolution} px, {args.tokens} tokens, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.steps} timed steps each")
    for name in ("floor", "ours"):
        median = statistics.median(results[name])
        mem = f", peak {memory[name] / 2**30:.2f} GiB" if memory[name] is not None else ""
        label = "bare frozen UNet fwd+bwd" if name == "floor" else "TSC training step"
        print(f"{label:>26}: {median * 1000:8.1f} ms/step, {b / median:7.2f} images/s{mem}")
    print(f"ratio ours/floor (median): {statistics.median(results['ours']) / statistics.median(results['floor']):.3f}")


if __name__ == "__main__":
    main()
