"""Benchmarks of the core, side by side with the reference's way, in one run (full-size random weights in the
official layout). Not a test: it prints a Markdown report for docs/PERFORMANCE.md.

    python bench/bench_core.py                      # CPU, fp32
    python bench/bench_core.py --device cuda        # fp16 on a GPU, with the SD 1.5 UNet ratio (needs diffusers)

Sections:
1. TSC per call at 2/4/8 rows, fixed (128 tokens, no mask) and flexible (masked batch vs the reference's row loop).
2. A 20-step cond+uncond generation's conditioning: ours (prepare + one pass per call; and with precompute) against
   the reference's way (TSC at every call, flexible rows one by one, nothing cached).
3. LLM encode (T5-XL encoder shape, random weights), fixed 128 tokens, 2 and 8 rows.
4. On CUDA: one SD 1.5 UNet call at 512x512 (diffusers' UNet2DConditionModel, random weights), as the yardstick.
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import median_ms  # noqa: E402
from reference_tsc_module import ReferenceTSC  # noqa: E402

from ella_ext.conditioning import Conditioner  # noqa: E402
from ella_ext.connector import Connector, ConnectorConfig  # noqa: E402
from tests.random_weights import init_random  # noqa: E402

ROWS = (2, 4, 8)
STEPS = 20


def timer(device, repeats, warmup=3):
    return partial(median_ms, device=device, repeats=repeats, warmup=warmup)


def make_models(device, dtype):
    config = ConnectorConfig()
    ours = init_random(Connector(config), torch.Generator().manual_seed(0)).to(device, dtype).eval()
    reference = ReferenceTSC(config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference.to(device, dtype).eval(), config


def text_batch(rows, config, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(12, 120, (rows,), generator=g)]
    features = torch.randn(rows, 128, config.in_width, generator=g).to(device, dtype)
    mask = (torch.arange(128)[None] < torch.tensor(lengths)[:, None]).to(device)
    return features, mask, lengths


def check_agreement(ours, reference, config, device, dtype, report):
    features, mask, lengths = text_batch(4, config, device, dtype)
    t = torch.tensor([999.0, 500.5, 20.0, 1.0], device=device)
    with torch.inference_mode():
        fixed = (ours(features, t) - reference(features, t)).abs().max().item()
        flex = ours(features, t, mask)
        loop = torch.cat([reference(features[i : i + 1, :n], t[i : i + 1]) for i, n in enumerate(lengths)])
        flex_err = (flex - loop).abs().max().item()
    report(f"Agreement with the reference arrangement ({dtype}): max |diff| fixed {fixed:.2e}, "
           f"flexible {flex_err:.2e}\n")


def check_precision(ours, config, device, dtype, report):
    """The TSC in ``dtype`` against the same weights in fp32, on the same inputs."""
    if dtype == torch.float32:
        return
    full = Connector(config)
    full.load_state_dict(ours.state_dict())
    full = full.to(device, torch.float32).eval()
    features, mask, _ = text_batch(4, config, device, torch.float32)
    t = torch.tensor([999.0, 500.5, 20.0, 1.0], device=device)
    with torch.inference_mode():
        for label, m in (("fixed", None), ("flexible", mask)):
            ref = full(features, t, m)
            low = ours(features.to(dtype), t, m).float()
            rel = ((low - ref).norm() / ref.norm()).item()
            report(f"{dtype} vs fp32 ({label}): max |diff| {(low - ref).abs().max().item():.2e}, "
                   f"relative L2 error {rel:.2e}, output mean |x| {ref.abs().mean().item():.3f}")
    report("")


def bench_tsc(ours, reference, config, device, dtype, run, report):
    report("| rows | ours fixed (ms) | reference fixed (ms) | ours flexible, batched (ms) | reference flexible, "
           "row loop (ms) | flexible speed-up |")
    report("|---|---|---|---|---|---|")
    for rows in ROWS:
        features, mask, lengths = text_batch(rows, config, device, dtype)
        t = torch.tensor([500.0], device=device)
        with torch.inference_mode():
            ours_fixed = run(partial(ours, features, t))
            ref_fixed = run(partial(reference, features, t))
            ours_flex = run(partial(ours, features, t, mask))
            ref_flex = run(partial(reference.flexible, features, lengths, t))
        report(f"| {rows} | {ours_fixed:.2f} | {ref_fixed:.2f} | {ours_flex:.2f} | {ref_flex:.2f} | "
               f"{ref_flex / ours_flex:.1f}x |")
    report("")


class _FeatureEncoder:
    """Stands in for the LLM in the generation benchmark: fixed random features, so only the TSC is timed."""

    def __init__(self, features, mask, texts):
        self._rows = {text: i for i, text in enumerate(texts)}
        self.features, self.mask = features, mask

    def check_fits(self, width):
        pass

    def encode(self, texts, max_length):
        index = torch.tensor([self._rows[t] for t in texts], device=self.features.device)
        return self.features[index], self.mask[index]


def _ours_generation(ours, encoder, texts, schedule, precompute):
    cond = Conditioner(ours, encoder, max_length=None)
    cond.prepare(texts)
    if precompute:
        cond.precompute(schedule)
    for t in schedule:
        cond(texts, t)


def _reference_generation(reference, features, lengths, schedule):
    for t in schedule:
        reference.flexible(features, lengths, torch.tensor([t], device=features.device))


def bench_generation(ours, reference, config, device, dtype, run, report):
    schedule = torch.linspace(999, 0, STEPS).tolist()
    report(f"| rows per call (cond+uncond) | ours, {STEPS} calls (ms) | ours with precompute (ms) | reference way, "
           f"{STEPS} calls (ms) | ours per call (ms) | reference per call (ms) |")
    report("|---|---|---|---|---|---|")
    results = {}
    for rows in (2, 8):
        batch = rows // 2
        texts = [f"prompt {i}" for i in range(batch)] + [f"negative {i}" for i in range(batch)]
        features, mask, lengths = text_batch(rows, config, device, dtype, seed=rows)
        encoder = _FeatureEncoder(features, mask, texts)
        with torch.inference_mode():
            ours_ms = run(partial(_ours_generation, ours, encoder, texts, schedule, False))
            pre_ms = run(partial(_ours_generation, ours, encoder, texts, schedule, True))
            ref_ms = run(partial(_reference_generation, reference, features, lengths, schedule))
        results[rows] = ours_ms / STEPS
        report(f"| {rows} | {ours_ms:.1f} | {pre_ms:.1f} | {ref_ms:.1f} | {ours_ms / STEPS:.2f} | "
               f"{ref_ms / STEPS:.2f} |")
    report("")
    return results


def bench_llm(device, dtype, run, report):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(dtype).eval()
    report("| LLM encode (T5-XL shape, random weights, 128 tokens) | ms |")
    report("|---|---|")
    for rows in (2, 8):
        ids = torch.randint(0, 32000, (rows, 128), device=device)
        with torch.inference_mode():
            ms = run(partial(model, input_ids=ids))
        report(f"| {rows} rows | {ms:.1f} |")
    report("")


def bench_unet(device, dtype, run, report, per_call):
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        report("UNet yardstick skipped: diffusers is not installed (pip install diffusers).\n")
        return
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).to(device, dtype).eval()
    report("| rows | SD 1.5 UNet call, 512x512 (ms) | ours conditioner per call (ms) | ratio |")
    report("|---|---|---|---|")
    for rows in (2, 8):
        x = torch.randn(rows, 4, 64, 64, device=device, dtype=dtype)
        ctx = torch.randn(rows, 64, 768, device=device, dtype=dtype)
        t = torch.full((rows,), 500.0, device=device)
        with torch.inference_mode():
            ms = run(partial(unet, x, t, encoder_hidden_states=ctx))
        report(f"| {rows} | {ms:.1f} | {per_call[rows]:.2f} | {100 * per_call[rows] / ms:.1f}% |")
    report("")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median reported)")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--unet", action="store_true", help="time the SD 1.5 UNet yardstick (default on CUDA)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    run = timer(device, repeats)
    torch.manual_seed(0)

    def report(line=""):
        print(line, flush=True)

    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report(f"Device: {device} ({gpu}), {torch.get_num_threads()} CPU threads; dtype {dtype}; median of {repeats}")
    report(f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
           f"transformers {transformers.__version__}\n")

    ours, reference, config = make_models(device, dtype)
    check_agreement(ours, reference, config, device, dtype, report)
    check_precision(ours, config, device, dtype, report)
    report("### TSC per call (one timestep, 128-token features; flexible rows 12..119 real tokens)\n")
    bench_tsc(ours, reference, config, device, dtype, run, report)
    report(f"### One generation's conditioning: {STEPS} steps, cond+uncond, flexible length\n")
    per_call = bench_generation(ours, reference, config, device, dtype, run, report)
    if not args.skip_llm:
        report("### LLM encode, once per generation\n")
        bench_llm(device, dtype, timer(device, max(3, repeats // 5), warmup=1), report)
    if args.unet or device.type == "cuda":
        report("### Yardstick: the UNet call the conditioning rides along with\n")
        bench_unet(device, dtype, run, report, per_call)


if __name__ == "__main__":
    main()
