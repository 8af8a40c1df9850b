"""The extension's script loaded into the A1111 1.10.1 host double (``tests/webui/a1111``), with tiny models in an
ELLA models folder and the real k-diffusion denoiser and samplers over the real SD 1.5 schedule."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ella_ext import load_connector, load_text_encoder
from ella_ext.connector import Connector, ConnectorConfig
from ella_ext.connector_file import save_connector

from ..kdiffusion import real_k_diffusion, sd15_alphas_cumprod
from ..random_weights import init_random
from ..tiny_llms import HIDDEN, t5_token_weights

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent / "forge"))  # hostlayers (the doubles' layering)
from hostlayers import LAYERS  # noqa: E402

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


@pytest.fixture(scope="module")
def reference(models_dir):
    """Rows computed directly from the models, one text and one timestep at a time (flexible length)."""
    connector = load_connector(models_dir / "ELLA" / f"{CONNECTOR}.safetensors")
    encoder = load_text_encoder(models_dir / "ELLA" / "text_encoders" / ENCODER, "cpu", torch.float32)

    def row(text: str, t: float, max_length=None, word_weights=None) -> torch.Tensor:
        """``word_weights``: the emphasis of each word of ``text`` (tests/tiny_llms.py ``t5_token_weights`` spreads
        them over the tokens, apart from the extension)."""
        features, mask = encoder.encode([text], max_length)
        weights = None
        if word_weights is not None:
            weights = t5_token_weights(models_dir / "ELLA" / "text_encoders" / ENCODER, text, word_weights,
                                       max_length)[None]
        with torch.no_grad():
            return connector(features, torch.tensor([t]), None if max_length else mask, weights)[0]

    return row


@dataclass
class Recorded:
    """Each conditioner call (per call or foreseen): the row texts, the timesteps (float64 list) and the rows it
    returned; beside it, whether the call was foreseen (a lookup) and the conditioner's TSC pass count after it."""

    calls: list = field(default_factory=list)
    foreseen: list = field(default_factory=list)
    passes: list = field(default_factory=list)

    def clear(self):
        self.calls.clear()
        self.foreseen.clear()
        self.passes.clear()


HOST_PACKAGES = ("modules", "backend", "ldm_patched", "modules_forge", "forge_common", "hostlayers")


def _drop_host_modules():
    for name in [m for m in sys.modules if m.split(".")[0] in HOST_PACKAGES]:
        del sys.modules[name]


def forge_sd_model(new: bool, context_width=768, is_sdxl=False):
    """``shared.sd_model`` of a Forge double: the fake checkpoint plus ``forge_objects`` (original, after LoRA)."""
    from forge_common import ForgeObjects, UnetModel, UnetPatcher

    model = FakeSDModel(context_width, is_sdxl)
    model.forge_objects = ForgeObjects(UnetPatcher(UnetModel(model.alphas_cumprod, new)))
    model.forge_objects_original = model.forge_objects.shallow_copy()
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    return model


def _load_host(kind, models_dir, monkeypatch):
    """The host double of ``kind`` with the extension loaded as the host loads a script file."""
    _drop_host_modules()
    layers = LAYERS[kind]
    for layer in reversed(layers):
        monkeypatch.syspath_prepend(str(layer))
    monkeypatch.syspath_prepend(str(ROOT))
    import modules

    modules.__path__ = [str(layer / "modules") for layer in layers]
    from modules import devices, paths, script_callbacks, scripts, shared

    assert devices.device is not None  # Forge imports its memory manager with devices, before any script loads
    paths.models_path = str(models_dir)
    shared.sd_model = FakeSDModel() if kind == "a1111" else forge_sd_model(kind == "forge-new")
    script_callbacks.clear_callbacks()
    script_callbacks.reported.clear()
    scripts.reported.clear()
    spec = importlib.util.spec_from_file_location("ella_script", ROOT / "scripts" / "ella.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Host(module, monkeypatch, kind)


def _unload_models():
    from ella_ext.registry import registry

    registry.unload_all()
    from ella_ext.webui.loading import manager

    if manager._timer is not None:
        manager._timer.cancel()


def _hosted(kind: str, models_dir, monkeypatch):
    """The body of the host fixtures: the ``kind`` double with the extension loaded, then its models and modules
    dropped."""
    with real_k_diffusion():
        yield _load_host(kind, models_dir, monkeypatch)
        _unload_models()
    _drop_host_modules()


@pytest.fixture
def host(models_dir, monkeypatch):
    """The A1111 1.10.1 double with the extension loaded; yields a ``Host`` helper."""
    yield from _hosted("a1111", models_dir, monkeypatch)


@pytest.fixture(params=["a1111", "forge-classic", "forge-new"])
def any_host(request, models_dir, monkeypatch):
    """Each of the three host doubles with the extension loaded."""
    yield from _hosted(request.param, models_dir, monkeypatch)


@pytest.fixture(params=["forge-classic", "forge-new"])
def forge_host(request, models_dir, monkeypatch):
    """The Forge classic and Forge new doubles with the extension loaded; yields a ``Host`` helper."""
    yield from _hosted(request.param, models_dir, monkeypatch)


def ella_args(**changes):
    """The script's positional args as the UI gives them, ELLA on with the tiny models."""
    from ella_ext import options

    values = {**options.DEFAULTS.__dict__, "enabled": True, "connector": CONNECTOR, "text_encoder": ENCODER, **changes}
    return [values[name] for name in options.FIELD_NAMES]


class Host:
    def __init__(self, script_module, monkeypatch, kind="a1111"):
        from ella_ext.webui import generation

        self.kind = kind
        self.module = script_module
        self.script = script_module.ELLAScript()
        self.recorded = Recorded()
        recorded = self.recorded

        class RecordingConditioner(generation.Conditioner):
            def __call__(self, texts, timesteps):  # a call computed per call
                out = super().__call__(texts, timesteps)
                recorded.calls.append((list(texts), torch.as_tensor(timesteps).double().tolist(), out))
                recorded.foreseen.append(False)
                recorded.passes.append(self.tsc_passes)
                return out

            def lookup(self, texts, timesteps):  # a foreseen call
                out = super().lookup(texts, timesteps)
                recorded.calls.append((list(texts), [float(t) for t in timesteps], out))
                recorded.foreseen.append(True)
                recorded.passes.append(self.tsc_passes)
                return out

        monkeypatch.setattr(generation, "Conditioner", RecordingConditioner)

    def run(self, prompt, negative_prompt="", *, args=None, img2img=False, job=True, **kwargs):
        """One generation, as the UI's queue wrapper or the API runs it: inside ``state.begin`` / ``state.end``
        (``job=False``: as a nested generation, inside the job already running)."""
        from modules import processing, scripts, shared

        self.recorded.clear()
        args = ella_args() if args is None else args
        cls = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        self.script.args_to = 1 + len(args)
        p = cls(prompt, negative_prompt, script_args=[None, *args], **kwargs)
        runner = scripts.ScriptRunner(self.script)
        self.script.args_to = 1 + len(args)
        if job:
            shared.state.begin(job="test")
        try:
            processed = processing.process_images(p, runner)
        finally:
            if job:
                shared.state.end()
        p.runner = runner
        return p, processed

    @staticmethod
    def reported():
        from modules import script_callbacks, scripts

        return script_callbacks.reported + scripts.reported


def at_call(monkeypatch, call: int, action):
    """Run ``action()`` at the conditioner's ``call``-th call (1-based) of the generation, computed per call or
    foreseen: the n-th call of either."""
    from ella_ext.webui import generation

    count = {"n": 0}

    def hooked(original):
        def method(self, texts, timesteps):
            count["n"] += 1
            if count["n"] == call:
                action()
            return original(self, texts, timesteps)

        return method

    for name in ("__call__", "lookup"):
        monkeypatch.setattr(generation.Conditioner, name, hooked(getattr(generation.Conditioner, name)))


def fail_conditioner_at(monkeypatch, call: int, message="CUDA out of memory (simulated)"):
    """Make the conditioner raise at its ``call``-th call (1-based) of the generation, as an out-of-memory would."""

    def fail():
        raise RuntimeError(message)

    at_call(monkeypatch, call, fail)
