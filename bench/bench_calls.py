"""ELLA's work at each sampler call, counted where no GPU is needed: 20-step generations driven through the host
doubles of A1111 1.10.1, Forge classic and Forge new (``tests/webui``), with the extension's script loaded as the
hosts load it. Not timed: for every call, the torch operations ELLA's denoiser callback dispatches are counted with a
``TorchDispatchMode`` (on a GPU nearly every one is a kernel launch, the per-call cost that matters while the TSC is
launch-bound), and the TSC passes it runs. Three arrangements of that callback:

- ours: each pass's (text, timestep) pairs foreseen and computed at its first call, later calls one lookup;
- per-call path: the same conditioner with nothing foreseen (one batched TSC pass per call for the pairs it has not
  seen, a pair seen earlier reused: the behaviour before precompute);
- reference: the reference's arrangement (``reference_tsc_module.py``): the TSC at every call, flexible rows one at a
  time, nothing reused.

The connector has the official SD 1.5 connector's layout (6 blocks, 64 latents, 8 heads) but is narrow (width 64,
projected out to SD 1.5's 768) and reads the tiny test T5: operation counts do not depend on widths, and the
reference's arrangement runs on a CPU in seconds.

    python bench/bench_calls.py            # prints a Markdown table; its last line is the summary over the samplers

The last line reads ``max ops per call after the first: N, TSC passes after the first: M`` for ours, over every
sampler whose schedule is known (all those driven here).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CountOps  # noqa: E402
from reference_tsc_module import ReferenceTSC  # noqa: E402

from ella_ext.conditioning import Conditioner, timestep_keys  # noqa: E402
from ella_ext.connector import Connector, ConnectorConfig  # noqa: E402
from ella_ext.connector_file import save_connector  # noqa: E402
from tests.random_weights import init_random  # noqa: E402
from tests.tiny_llms import HIDDEN, make_t5  # noqa: E402

STEPS = 20
# the official SD 1.5 connector's layout, narrow: 6 blocks, 64 latents, 8 heads, out to 768
CONFIG = ConnectorConfig(time_channels=32, time_embed_dim=64, width=64, layers=6, heads=8, num_latents=64,
                         input_dim=HIDDEN, output_dim=768)
HOSTS = ("a1111", "forge-classic", "forge-new")
SCENARIOS = {  # name -> the generation's parameters (batch 1: one cond row and one uncond row per call)
    "Euler": dict(sampler_name="Euler"),
    "DPM++ 2M": dict(sampler_name="DPM++ 2M"),
    "Heun": dict(sampler_name="Heun"),
    "DDIM": dict(sampler_name="DDIM"),
    "Euler + hires": dict(sampler_name="Euler", enable_hr=True, hr_second_pass_steps=STEPS, denoising_strength=0.5),
    "Euler, [a:b:10]": dict(sampler_name="Euler", prompt="a [red:blue:10] cube on a table"),
}
PROMPT, NEGATIVE = "a red cube on a table", "blurry"
ARRANGEMENTS = ("ours", "per-call path", "reference")


class ReferenceConditioner(Conditioner):
    """The reference's arrangement: the TSC at every call over every row, flexible rows one prompt at a time."""

    def _reference(self):
        found = getattr(self, "_reference_tsc", None)
        if found is None:
            found = ReferenceTSC(self.connector.config).to(self.connector.device, self.connector.dtype).eval()
            found.load_state_dict(self.connector.state_dict(), strict=True)
            self._reference_tsc = found
        return found

    def __call__(self, texts, timesteps):
        indices = self._row_map(texts)
        steps = timestep_keys(timesteps)
        steps = steps * len(texts) if len(steps) == 1 else steps
        reference = self._reference()
        rows = []
        with torch.inference_mode():
            for index, t in zip(indices, steps):
                length = self._lengths[index] if self.max_length is None else self._features.shape[1]
                rows.append(reference(self._features[index : index + 1, :length], torch.tensor([t])))
                self.tsc_passes += 1
        return torch.cat(rows)


@dataclass
class Pass:
    ops: list[int] = field(default_factory=list)
    tsc_passes: list[int] = field(default_factory=list)  # the conditioner's count after each call

    def after_first(self) -> tuple[int, int]:
        """(max ops of a call after the first, TSC passes after the first call)."""
        later = self.ops[1:]
        return (max(later) if later else 0), self.tsc_passes[-1] - self.tsc_passes[0]


def make_models(root: Path, connector_name: str, encoder_name: str) -> None:
    ella = root / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    connector = init_random(Connector(CONFIG), torch.Generator().manual_seed(3), std=0.2).eval()
    save_connector(connector, ella / f"{connector_name}.safetensors")
    make_t5(ella / "text_encoders" / encoder_name)


def count_calls(kind: str, models_dir: Path) -> dict[tuple[str, str], list[Pass]]:
    """Run every scenario in every arrangement through one host double; per (scenario, arrangement), the passes."""
    import pytest

    from tests.kdiffusion import real_k_diffusion
    from tests.webui import conftest

    results: dict[tuple[str, str], list[Pass]] = {}
    with pytest.MonkeyPatch.context() as patch, real_k_diffusion():
        host = conftest._load_host(kind, models_dir, patch)
        from modules import script_callbacks

        from ella_ext.webui import generation

        passes: dict[int, Pass] = {}

        def counted(callback):
            def run(params):
                with CountOps() as count:
                    callback(params)
                state = getattr(params.denoiser.p, generation.ATTRIBUTE, None)
                record = passes.setdefault(id(params.denoiser), Pass())
                record.ops.append(count.count)
                record.tsc_passes.append(state.conditioner.tsc_passes if state is not None else 0)

            return run

        callbacks = script_callbacks.callback_map["cfg_denoiser"]
        callbacks[:] = [(name, counted(callback)) for name, callback in callbacks]
        for scenario, options in SCENARIOS.items():
            for arrangement in ARRANGEMENTS:
                passes.clear()
                with pytest.MonkeyPatch.context() as inner:
                    inner.setattr(generation, "Conditioner",
                                  ReferenceConditioner if arrangement == "reference" else Conditioner)
                    if arrangement != "ours":
                        inner.setattr(generation, "watch_sampler", lambda p: None)
                    run = {"prompt": PROMPT, **options}
                    p, processed = host.run(run.pop("prompt"), NEGATIVE, steps=STEPS, **run)
                if host.reported() or "ELLA error" in processed.infotexts[0]:
                    raise RuntimeError(f"{kind} {scenario} {arrangement}: {host.reported()} {processed.infotexts[0]}")
                results[scenario, arrangement] = list(passes.values())
        conftest._unload_models()
    conftest._drop_host_modules()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (counts do not depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from tests.webui.conftest import CONNECTOR, ENCODER

    print(f"Host doubles of A1111 1.10.1, Forge classic (bfee03d8) and Forge new (dfdcbab6); {STEPS} steps, batch 1 "
          f"(one cond and one uncond row per call), flexible length; connector: {CONFIG.layers} blocks, "
          f"{CONFIG.num_latents} latents, {CONFIG.heads} heads, width {CONFIG.width} -> {CONFIG.out_width}, fp32 on "
          f"the CPU; Python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}\n")
    print("Per sampler and host: calls, then for each arrangement the most torch operations ELLA's callback "
          "dispatched at one call after the first call of a pass (first call of the first pass in brackets for "
          "ours: it plans and computes the pass), and the TSC passes run after each pass's first call (summed over "
          "the passes).\n")
    print("| host | sampler | calls | ours: ops/call (1st) | ours: TSC passes after 1st | per-call path: ops/call | "
          "per-call path: TSC passes after 1st | reference: ops/call | reference: TSC passes after 1st |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst_ops, worst_passes = 0, 0
    root = Path(tempfile.mkdtemp(prefix="ella-bench-calls-"))
    try:
        make_models(root, CONNECTOR, ENCODER)
        for kind in HOSTS:
            results = count_calls(kind, root)
            for scenario in SCENARIOS:
                cells = []
                for arrangement in ARRANGEMENTS:
                    passes = results[scenario, arrangement]
                    ops = max(p.after_first()[0] for p in passes)
                    tsc = sum(p.after_first()[1] for p in passes)
                    first = f" ({passes[0].ops[0]})" if arrangement == "ours" else ""
                    cells += [f"{ops}{first}", str(tsc)]
                    if arrangement == "ours":
                        worst_ops, worst_passes = max(worst_ops, ops), worst_passes + tsc
                calls = sum(len(p.ops) for p in results[scenario, "ours"])
                print(f"| {kind} | {scenario} | {calls} | " + " | ".join(cells) + " |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("On a GPU the sigma column each call reads back (its one sync, as before) adds one device-to-host copy to "
          "every arrangement; the dtype conversions counted here (an fp32 connector, the hosts' fp16 context) are "
          "absent when the connector runs in the UNet's dtype.")
    print(f"max ops per call after the first: {worst_ops}, TSC passes after the first: {worst_passes}")


if __name__ == "__main__":
    main()
