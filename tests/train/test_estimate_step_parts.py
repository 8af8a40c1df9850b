"""``estimate`` times what a training step does: without a cache a step also runs the VAE on its images, the LLM and
(SDXL) CLIP-G on its captions, so the measured time per step includes those passes (on a CPU they were most of an
SDXL step: 17 s of 23 s on a 2-core machine), and a run with a cache does not run them."""

from __future__ import annotations

import time

from ella_ext.train.config import load_config
from ella_ext.train.model import Base

from .conftest import needs_extras, write_config

needs_extras()
PAUSE = 0.2


def _slowed(monkeypatch) -> dict[str, int]:
    calls = {"encode_pixels": 0, "pooled": 0}
    for name in calls:
        original = getattr(Base, name)

        def slow(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            time.sleep(PAUSE)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Base, name, slow)
    return calls


def test_an_on_the_fly_step_times_the_vae_and_clip_g(tmp_path, sdxl_base, images8, tiny_t5_dir, monkeypatch):
    from ella_ext.train.estimate import _measure

    calls = _slowed(monkeypatch)
    config = load_config(write_config(tmp_path / "xl.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "xl", train={"steps": 10}))
    report = _measure(config, steps=2)
    assert calls == {"encode_pixels": 3, "pooled": 3}, "one warm-up step and two measured ones"
    assert report["seconds_per_step"] >= 2 * PAUSE


def test_a_cached_run_does_not_time_the_encoders(tmp_path, sdxl_base, images8, tiny_t5_dir, monkeypatch):
    from ella_ext.train.estimate import _measure

    calls = _slowed(monkeypatch)
    config = load_config(write_config(tmp_path / "xl.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "xl", train={"steps": 10, "cache": str(tmp_path / "cache")}))
    _measure(config, steps=1)
    assert calls == {"encode_pixels": 0, "pooled": 0}
