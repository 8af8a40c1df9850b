"""Does one fused modulation product pay for its copy of the weights? Side by side, in one run.

Every adaptive LayerNorm of the TSC (3 per block) and the latents' time shift is a Linear of the time embedding:
19 Linears for the official connector, 21.8 M of its 66.8 M parameters. Two arrangements of the same arithmetic:

- **fused**: the 19 weights concatenated once into a second copy (kept beside the parameters), one matrix product
  per TSC pass;
- **per layer**: 19 products over the parameters themselves, results concatenated; no copy.

Reported per arrangement, for 1, 2 and 8 timesteps per pass: the median time of the modulation step alone, the
torch operations it dispatches (kernel launches on a GPU), the extra memory, and the time of a whole TSC pass at 2
rows for scale. On a CPU compare the columns of one run; absolute times mean something only on a GPU.

    python bench/bench_modulation.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CountOps, median_ms  # noqa: E402

from ella_ext.connector import Connector, ConnectorConfig  # noqa: E402
from tests.random_weights import init_random  # noqa: E402


def ops(fn):
    with CountOps() as counter:
        fn()
    return counter.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = init_random(Connector(ConnectorConfig()), torch.Generator().manual_seed(0)).to(device, dtype).eval()
    layers = model._modulation_layers()
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
    copy_mb = (weight.numel() + bias.numel()) * weight.element_size() / 2**20
    total_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    def fused(hidden):
        return F.linear(hidden, weight, bias)

    def per_layer(hidden):
        return torch.cat([layer(hidden) for layer in layers], dim=-1)

    print(f"device {device}, {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"modulation weights: {len(layers)} Linears, {weight.numel() / 1e6:.1f} M parameters; the fused copy "
          f"costs {copy_mb:.1f} MiB beside the connector's {total_mb:.1f} MiB ({copy_mb / total_mb:.0%} more)\n")
    features = torch.randn(2, 77, model.config.in_width, device=device, dtype=dtype)
    print("| timesteps per pass | fused (ms) | per layer (ms) | fused ops | per-layer ops "
          "| whole TSC pass, 2 rows (ms) |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for count in (1, 2, 8):
            hidden = torch.randn(count, model.config.time_embed_dim, device=device, dtype=dtype)
            torch.testing.assert_close(fused(hidden), per_layer(hidden))
            t = torch.linspace(999, 1, count, device=device)
            rows = features[:1].expand(count, -1, -1) if count != 2 else features
            pass_ms = median_ms(lambda t=t, rows=rows: model(rows, t), device, repeats=20)
            print(f"| {count} | {median_ms(lambda h=hidden: fused(h), device):.3f} | "
                  f"{median_ms(lambda h=hidden: per_layer(h), device):.3f} | {ops(lambda h=hidden: fused(h))} | "
                  f"{ops(lambda h=hidden: per_layer(h))} | {pass_ms:.2f} |")


if __name__ == "__main__":
    main()
