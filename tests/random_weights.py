"""Random connector weights for tests and benchmarks (never for a real connector: the trainer has its own init)."""

from __future__ import annotations

import torch

from ella_ext.connector import Connector


def init_random(model: Connector, generator: torch.Generator | None = None, std: float = 0.02) -> Connector:
    """Fill every parameter with small random values (the reference zero-inits AdaLN, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj_out.1.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model
