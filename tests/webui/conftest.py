"""The extension's script loaded into the A1111 1.10.1 host double (``tests/webui/a1111``), with tiny models in an
ELLA models folder and the real k-diffusion denoiser over the real SD 1.5 schedule."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ella_ext.connector import Connector, ConnectorConfig, init_random, save_connector

from ..kdiffusion import real_k_external, sd15_alphas_cumprod
from ..tiny_llms import HIDDEN

ROOT = Path(__file__).resolve().parents[2]
DOUBLE = Path(__file__).resolve().parent / "a1111"

# A small connector whose output has SD 1.5's context width, reading the tiny T5's features.
SD15_TINY = ConnectorConfig(time_channels=16, time_embed_dim=24, width=32, layers=1, heads=4, num_latents=8,
                            input_dim=HIDDEN, output_dim=768)
CONNECTOR = "tiny-sd15"
ENCODER = "tiny-t5"


class FakeSDModel:
    """What the extension reads of ``shared.sd_model``: the schedule, the model-type flags, the context width."""

    def __init__(self, context_width=768, is_sdxl=False):
        self.alphas_cumprod = sd15_alphas_cumprod().float()
        self.context_width = context_width
        self.is_sdxl = is_sdxl
        self.is_sd2 = context_width == 1024
        self.is_sd1 = context_width == 768
        if is_sdxl:
            self.conditioner = object()
        self.parameterization = "eps"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_t5_dir):
    root = tmp_path_factory.mktemp("webui-models")
    ella = root / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    connector = init_random(Connector(SD15_TINY), torch.Generator().manual_seed(3), std=0.2).eval()
    save_connector(connector, ella / f"{CONNECTOR}.safetensors")
    sdxl = ConnectorConfig(**{**SD15_TINY.__dict__, "output_dim": 2048})
    save_connector(init_random(Connector(sdxl), torch.Generator().manual_seed(4), std=0.2).eval(),
                   ella / "tiny-sdxl.safetensors")
    shutil.copytree(tiny_t5_dir, ella / "text_encoders" / ENCODER)
    return root


@dataclass
class Recorded:
    """Each conditioner call: the row texts, the timesteps (float64 list) and the rows it returned."""

    calls: list = field(default_factory=list)


@pytest.fixture
def host(models_dir, monkeypatch):
    """The host double with the extension loaded as the host loads a script file; yields a ``Host`` helper."""
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(DOUBLE))
    monkeypatch.syspath_prepend(str(ROOT))
    with real_k_external() as k_external:
        from modules import paths, script_callbacks, scripts, sd_samplers_kdiffusion, shared

        sd_samplers_kdiffusion.k_external = k_external
        paths.models_path = str(models_dir)
        shared.sd_model = FakeSDModel()
        script_callbacks.clear_callbacks()
        script_callbacks.reported.clear()
        scripts.reported.clear()
        spec = importlib.util.spec_from_file_location("ella_script", ROOT / "scripts" / "ella.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        helper = Host(module, monkeypatch)
        yield helper
        from ella_ext.models import registry

        registry.unload_all()
        from ella_ext.webui.loading import manager

        if manager._timer is not None:
            manager._timer.cancel()
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.")]:
        del sys.modules[name]


def ella_args(**changes):
    """The script's positional args as the UI gives them, ELLA on with the tiny models."""
    from ella_ext import options

    values = {**options.DEFAULTS.__dict__, "enabled": True, "connector": CONNECTOR, "text_encoder": ENCODER, **changes}
    return [values[name] for name in options.FIELD_NAMES]


class Host:
    def __init__(self, script_module, monkeypatch):
        from ella_ext.webui import generation

        self.module = script_module
        self.script = script_module.ELLAScript()
        self.recorded = Recorded()
        recorded = self.recorded

        class RecordingConditioner(generation.Conditioner):
            def __call__(self, texts, timesteps):
                out = super().__call__(texts, timesteps)
                recorded.calls.append((list(texts), torch.as_tensor(timesteps).double().tolist(), out))
                return out

        monkeypatch.setattr(generation, "Conditioner", RecordingConditioner)

    def run(self, prompt, negative_prompt="", *, args=None, img2img=False, **kwargs):
        from modules import processing, scripts

        self.recorded.calls.clear()
        args = ella_args() if args is None else args
        cls = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        self.script.args_to = 1 + len(args)
        p = cls(prompt, negative_prompt, script_args=[None, *args], **kwargs)
        runner = scripts.ScriptRunner(self.script)
        self.script.args_to = 1 + len(args)
        processed = processing.process_images(p, runner)
        p.runner = runner
        return p, processed

    @staticmethod
    def reported():
        from modules import script_callbacks, scripts

        return script_callbacks.reported + scripts.reported
