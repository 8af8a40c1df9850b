"""Shared fixtures: tiny models the tests make themselves, so the real loading code runs offline."""

from __future__ import annotations

import pytest
import torch

from ella_ext.connector import Connector, ConnectorConfig
from ella_ext.connector_file import save_connector

from .random_weights import init_random


def _cpu_fp16_products() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
    except RuntimeError:  # torch 2.1 (A1111 1.10's): "addmm_impl_cpu_" not implemented for 'Half'
        return False
    return True


CPU_FP16 = _cpu_fp16_products()
needs_cpu_fp16 = pytest.mark.skipif(
    not CPU_FP16, reason="this torch (2.1, A1111 1.10's) has no fp16 matrix products on the CPU; newer stacks run it"
)

TINY = ConnectorConfig(time_channels=16, time_embed_dim=24, width=32, layers=2, heads=4, num_latents=8, input_dim=20)


def make_connector(config: ConnectorConfig = TINY, seed: int = 0) -> Connector:
    return init_random(Connector(config), torch.Generator().manual_seed(seed), std=0.2).eval()


@pytest.fixture(scope="session")
def tiny_connector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("connector") / "tiny-tsc.safetensors"
    save_connector(make_connector(), path)
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    from .tiny_llms import make_t5

    return make_t5(tmp_path_factory.mktemp("llm") / "tiny-t5")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from .tiny_llms import make_llama

    return make_llama(tmp_path_factory.mktemp("llm") / "tiny-llama")
