"""What a long real run needs beyond the happy path: an earlier run is never overwritten, one run per output folder,
clear errors before any model loads, the output folder vanishing mid-run, the connector's shape and LLM on resume
and init_from, the files' precision and metadata, learning-rate schedules and loss weighting, the console."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from ella_ext.connector_file import META_TRAINING, read_metadata
from ella_ext.train.checkpoints import LOCK_NAME, OutputLock
from ella_ext.train.cli import main
from ella_ext.train.config import ConfigError, load_config
from ella_ext.train.loop import TrainingStopped, train
from ella_ext.train.model import BaseModelError
from ella_ext.train.objective import lr_at, min_snr_weights

from .conftest import needs_extras, write_config

needs_extras()


def _config(tmp_path, sd15_base, images8, tiny_t5_dir, name="run", **sections):
    return load_config(write_config(tmp_path / f"{name}.toml", base=sd15_base, llm=tiny_t5_dir, images=images8,
                                    output=tmp_path / name, **{"train": {"steps": 2}, **sections}))


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a base model or an LLM is loaded (the refusals must come before)."""
    import ella_ext.train.loop as loop
    import ella_ext.train.model as model

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(model, "load_base", refuse)
    monkeypatch.setattr(loop, "load_encoder", refuse)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- an earlier run is never destroyed ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sd15_base, images8, tiny_t5_dir):
    """A finished 4-step run with checkpoints every 2 steps."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 4, "save_every": 2})
    train(config)
    return tmp_path / "run.toml"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME and "logs" not in p.parts}


def test_a_second_run_into_a_finished_runs_folder_is_refused_before_any_model_loads(finished, no_models):
    output = finished.parent / "run"
    before = _snapshot(output)
    assert len(json.loads("[" + ",".join((output / "metrics.jsonl").read_text().splitlines()) + "]")) == 4
    with pytest.raises(ConfigError) as refused:
        train(load_config(finished, ["train.steps=2"]))
    message = str(refused.value)
    assert str(output) in message and "--resume latest" in message and "[train] output" in message
    assert "--overwrite" in message
    assert _snapshot(output) == before, "the earlier run's files were touched"


def test_the_command_line_refuses_it_too_with_exit_code_2(finished, no_models, capsys):
    assert main(["train", "--config", str(finished)]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_overwrite_replaces_the_earlier_run_and_resume_then_continues_the_new_one(tmp_path, sd15_base, images8,
                                                                                   tiny_t5_dir):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 4, "save_every": 2})
    train(config)
    config = load_config(config.path, ["train.steps=2", "train.save_every=0"])
    result = train(config, overwrite=True)
    output = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002"]
    assert not list(output.glob("connector-step*.safetensors"))
    assert read_metadata(result.connector)["ella.steps"] == "2"
    resumed = train(load_config(config.path, ["train.steps=3"]), resume="latest")
    assert resumed.step == 3  # the new run's step 2, not the old run's step 4


def test_a_second_run_while_one_holds_the_folder_is_refused(tmp_path, sd15_base, images8, tiny_t5_dir, no_models):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir)
    with OutputLock(config.output):
        with pytest.raises(ConfigError, match="in use by another training run"):
            train(config)
        with pytest.raises(ConfigError, match="in use by another training run"):
            train(config, resume="latest")  # a resume too


def test_a_killed_runs_lock_does_not_block_the_next_run(tmp_path):
    """The lock is the operating system's: a process killed while holding it (SIGKILL: no clean-up) frees it."""
    folder = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ella_ext.train.checkpoints import OutputLock
        lock = OutputLock(Path({str(folder)!r}))
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits for the holder, however slow the machine
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            OutputLock(folder).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = OutputLock(folder)
    lock.acquire()  # the dead holder's lock went with it
    lock.release()
    assert (folder / LOCK_NAME).is_file()


# -- checks before any model loads -----------------------------------------------------------------------------------


def test_a_missing_source_is_reported_before_any_model_loads(tmp_path, sd15_base, tiny_t5_dir, no_models):
    from ella_ext.train.data import DataError

    config = load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=[],
                                      output=tmp_path / "out", train={"steps": 2},
                                      sources=[{"path": str(tmp_path / "nowhere")}]))
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        train(config)
    shards = load_config(write_config(tmp_path / "shards.toml", base=sd15_base, llm=tiny_t5_dir, images=[],
                                      output=tmp_path / "out2", train={"steps": 2},
                                      sources=[{"path": str(tmp_path / "data-{000..003}.tar")}]))
    with pytest.raises(DataError, match="no such shard .*data-000.tar"):
        train(shards)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_a_pickled_base_is_refused_with_the_reason(tmp_path, images8, tiny_t5_dir, suffix):
    pickle = tmp_path / f"model{suffix}"
    pickle.write_bytes(b"not read")
    config = load_config(write_config(tmp_path / "run.toml", base=pickle, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "out", train={"steps": 1}))
    with pytest.raises(BaseModelError, match=r"only \.safetensors single files are read.*run any code"):
        train(config)


def test_an_llm_layer_the_llm_does_not_have_is_refused_when_it_loads(tmp_path, sd15_base, images8, tiny_llama_dir):
    from ella_ext.train.runtime import load_encoder

    config = load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_llama_dir, images=images8,
                                      output=tmp_path / "out", model={"llm_layer": -7}, train={"steps": 1}))
    with pytest.raises(ConfigError, match=r"llm_layer = -7 is not a hidden state of .*which has 3 \(its 2 layers.*-3"):
        load_encoder(config, torch.device("cpu"))
    assert load_encoder(load_config(config.path, ["model.llm_layer=-3"]), torch.device("cpu")).layer == -3


def test_an_llm_layer_on_t5_is_ignored_with_a_warning(tmp_path, sd15_base, images8, tiny_t5_dir, caplog):
    from ella_ext.train.runtime import load_encoder

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, model={"llm_layer": -2})
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert load_encoder(config, torch.device("cpu")).layer is None
    assert "llm_layer = -2 is ignored" in caplog.text


# -- resume and init_from: the shape and the LLM ---------------------------------------------------------------------


def test_resume_after_the_connector_shape_changed_says_what_changed(finished):
    with pytest.raises(ConfigError) as refused:
        train(load_config(finished, ["connector.width=64", "train.steps=6"]), resume="latest")
    assert "width 32 -> 64" in str(refused.value) and "ella-run.toml" in str(refused.value)


def test_resume_or_init_from_with_another_llm_is_refused_unless_allowed(tmp_path, finished, sd15_base, images8,
                                                                         caplog):
    from tests.tiny_llms import make_t5

    other = make_t5(tmp_path / "other-t5", seed=5)  # the same width, another model
    with pytest.raises(ConfigError, match="trained with the LLM tiny-t5.*allow_other_llm"):
        train(load_config(finished, [f"model.llm={json.dumps(str(other))}", "train.steps=6"]), resume="latest")
    connector = finished.parent / "run" / "connector.safetensors"
    config = load_config(write_config(tmp_path / "init.toml", base=sd15_base, llm=other, images=images8,
                                      output=tmp_path / "init", train={"steps": 1},
                                      connector={"init_from": str(connector)}))
    with pytest.raises(ConfigError, match="init_from connector.safetensors was trained with the LLM tiny-t5"):
        train(config)
    allowed = load_config(config.path, ["model.allow_other_llm=true"])
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert train(allowed).step == 1
    assert "going on because [model] allow_other_llm = true" in caplog.text


def test_init_from_messages_lead_out_of_the_circle(tmp_path, finished, sdxl_base, images8, tiny_t5_dir):
    connector = finished.parent / "run" / "connector.safetensors"
    wrong_family = load_config(write_config(tmp_path / "xl.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                                            output=tmp_path / "xl", train={"steps": 1},
                                            connector={"init_from": str(connector)}))
    with pytest.raises(ConfigError) as refused:
        train(wrong_family)
    assert "another model family" in str(refused.value) and "remove init_from" in str(refused.value)
    keyed = load_config(write_config(tmp_path / "keyed.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                                     output=tmp_path / "keyed", train={"steps": 1},
                                     connector={"init_from": str(connector), "out_width": 2048}))
    with pytest.raises(ConfigError, match=r"out_width = 2048 \(the file: 768\).*remove the key"):
        train(keyed)


# -- the output folder vanishing -------------------------------------------------------------------------------------


def test_the_output_folder_deleted_mid_run_is_made_again_and_nothing_is_lost(tmp_path, sd15_base, images8,
                                                                             tiny_t5_dir, caplog):
    import shutil

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 3})

    def delete(step, _model):
        if step == 1:
            shutil.rmtree(config.output)

    with caplog.at_level(logging.WARNING, logger="ella"):
        result = train(config, on_step=delete)
    assert result.connector.is_file() and read_metadata(result.connector)["ella.steps"] == "3"
    assert [json.loads(line)["step"] for line in (config.output / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    assert "was deleted during the run; it was made again" in caplog.text


def test_an_output_that_cannot_be_written_sends_the_weights_to_a_rescue_file(tmp_path, sd15_base, images8,
                                                                             tiny_t5_dir, monkeypatch):
    import shutil

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2})
    monkeypatch.chdir(tmp_path)

    def block(step, _model):
        if step == 2:  # the folder is replaced by a file: nothing can be written under it any more
            shutil.rmtree(config.output)
            config.output.write_text("")

    with pytest.raises(TrainingStopped) as stopped:
        train(config, on_step=block)
    rescued = list(tmp_path.glob("ella-rescued-*-connector.safetensors"))
    assert len(rescued) == 1 and str(rescued[0]) in str(stopped.value)
    assert read_metadata(rescued[0])["ella.steps"] == "2"


# -- what the files hold -----------------------------------------------------------------------------------------------


def test_files_are_fp16_by_default_and_carry_the_training_record(tmp_path, sd15_base, images8, tiny_t5_dir):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2, "batch_size": 2})
    result = train(config)
    with safe_open(str(result.connector), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    record = json.loads(read_metadata(result.connector)[META_TRAINING])
    assert record["lr"] == 1e-3 and record["global_batch"] == 2 and record["steps_trained"] == 2
    assert record["sources"] == [{"name": images8.name, "images": 8, "repeats": 1, "caption_dropout": 0.0}]
    assert record["base"] == sd15_base.name and record["llm"] == tiny_t5_dir.name
    assert record["trainer"].startswith("ella_ext.train ")
    assert str(tmp_path) not in json.dumps(record), "no absolute path in a file people share"
    saved = load_config(config.output / "ella-run.toml")  # the resolved config, read back
    assert saved.train == {**config.train, "output": str(config.output.resolve())}
    assert saved.model["base"] == str(sd15_base.resolve()) and saved.sources == config.sources


def test_the_same_run_twice_gives_byte_identical_files(tmp_path, sd15_base, images8, tiny_t5_dir):
    digests = []
    for name in ("a", "b"):
        digests.append(_digest(train(_config(tmp_path, sd15_base, images8, tiny_t5_dir, name=name,
                                             train={"steps": 1, "save_precision": "bf16"})).connector))
    assert digests[0] == digests[1]


def test_a_connector_file_digest_does_not_depend_on_the_process(tmp_path):
    """safetensors' own writer orders the metadata differently per process; ours sorts it."""
    code = textwrap.dedent("""
        import hashlib, sys, torch
        from ella_ext.connector import Connector, ConnectorConfig
        from ella_ext.connector_file import save_connector
        from tests.random_weights import init_random
        model = init_random(Connector(ConnectorConfig(time_channels=8, time_embed_dim=8, width=8, layers=1, heads=2,
                                                      num_latents=4, input_dim=6, output_dim=12)),
                            torch.Generator().manual_seed(0))
        save_connector(model, sys.argv[1], metadata={f"key{i}": str(i) for i in range(12)}, dtype=torch.float16)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{name}.safetensors")], check=True,
                       env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert _digest(tmp_path / "one.safetensors") == _digest(tmp_path / "two.safetensors")
    from ella_ext import load_connector

    assert load_connector(tmp_path / "one.safetensors").config.out_width == 12


# -- learning rate, loss weighting ------------------------------------------------------------------------------


def test_learning_rate_schedules(tmp_path, sd15_base, images8, tiny_t5_dir):
    def rates(**train_keys):
        config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 10, **train_keys})
        return [lr_at(config, step, 1.0) for step in range(10)]

    assert rates() == [1.0] * 10
    warm = rates(warmup_steps=4)
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4:] == [1.0] * 6
    linear = rates(warmup_steps=2, lr_schedule="linear")
    assert linear[:2] == [0.5, 1.0] and linear[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    cosine = rates(lr_schedule="cosine")
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5, abs=0.03) and cosine[9] < 0.03
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    with pytest.raises(ConfigError, match="leaves no step for the cosine decay"):
        _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 3, "warmup_steps": 3,
                                                                  "lr_schedule": "cosine"})


def test_the_default_learning_rate_is_the_papers_for_the_family(tmp_path, sd15_base, sdxl_base, images8,
                                                                tiny_t5_dir):
    from ella_ext.train.runtime import peak_lr

    config = load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "out", train={"steps": 1, "lr": 2e-3}))
    raw = config.path.read_text().replace("lr = 0.002\n", "")
    (tmp_path / "default.toml").write_text(raw)
    default = load_config(tmp_path / "default.toml")
    assert default.train["lr"] is None
    assert peak_lr(default, "sd15") == 1e-4 and peak_lr(default, "sdxl") == 1e-5 and peak_lr(config, "sdxl") == 2e-3


def test_min_snr_weights_follow_the_formula(tmp_path, sd15_base, tiny_t5_dir, images8):
    from ella_ext.train.model import load_base

    base = load_base(_config(tmp_path, sd15_base, images8, tiny_t5_dir), torch.device("cpu"), torch.float32)
    timesteps = torch.tensor([0, 100, 500, 999])
    alpha_bar = base.scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert torch.allclose(min_snr_weights(base, timesteps, 5.0).double(), expected, rtol=1e-5)
    assert min_snr_weights(base, timesteps, 5.0)[0] < 0.01 and min_snr_weights(base, timesteps, 5.0)[3] == 1.0
    base.prediction = "v_prediction"
    assert torch.allclose(min_snr_weights(base, timesteps, 5.0).double(),
                          torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-5)


def test_min_snr_weights_each_samples_loss(tmp_path, sd15_base, images8, tiny_t5_dir):
    from ella_ext.train.feed import Inputs
    from ella_ext.train.model import connector_config, init_connector, load_base
    from ella_ext.train.objective import compute_loss
    from ella_ext.train.runtime import load_encoder, make_accelerator

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir)
    base = load_base(config, torch.device("cpu"), torch.float32)
    features, _ = load_encoder(config, torch.device("cpu")).encode(["a red square", "a blue circle"], 16)
    connector = init_connector(connector_config(config, "sd15", 20, 768), 0)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([10, 900])  # SNR far above 5, and below 1
    inputs = Inputs(latents, features, None, timesteps, torch.randn(2, 4, 4, 4, generator=generator), None, None)
    accelerator = make_accelerator(None)
    with torch.no_grad():
        plain = compute_loss(connector, base, inputs, accelerator)
        weighted = compute_loss(connector, base, inputs, accelerator, 5.0)
        each = [compute_loss(connector, base, Inputs(latents[i:i + 1], features[i:i + 1], None, timesteps[i:i + 1],
                                                     inputs.noise[i:i + 1], None, None), accelerator)
                for i in range(2)]
    weights = min_snr_weights(base, timesteps, 5.0)
    assert plain.item() == pytest.approx((each[0] + each[1]).item() / 2, rel=1e-5)
    assert weighted.item() == pytest.approx((weights[0] * each[0] + weights[1] * each[1]).item() / 2, rel=1e-5)
    assert weights[0] < 0.1 and weights[1] == 1.0


# -- the console, trackers and samples -------------------------------------------------------------------------------


def test_a_summary_is_logged_before_the_first_step(tmp_path, sd15_base, images8, tiny_t5_dir, caplog):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 6, "batch_size": 2})
    with caplog.at_level(logging.INFO, logger="ella"):
        train(config)
    text = caplog.text
    for expected in (f"data {images8.name}: 8 image(s) x 1 repeat(s)", "buckets (images per epoch): 32x32: 8",
                     "an epoch: 8 images = about 4 steps of 2; 6 steps = 1.5 epochs",
                     "global batch 2 = 1 process(es) x batch 2 x accumulation 1", "frozen: UNet",
                     "trained: the connector", "memory per device", "s per step over the first 3 steps",
                     "CPU thread(s) per process"):
        assert expected in text, expected
    first_step = text.index("s per step over the first")
    assert text.index("memory per device") < first_step


def test_library_chatter_is_hidden_unless_verbose():
    from ella_ext.train.cli import _setup_logging

    root = logging.getLogger()
    saved = root.level, logging.getLogger("ella").level
    try:
        _setup_logging(False)
        assert not logging.getLogger("accelerate.accelerator").isEnabledFor(logging.INFO)
        assert logging.getLogger("ella").isEnabledFor(logging.INFO)
        _setup_logging(True)
        assert logging.getLogger("accelerate.accelerator").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        logging.getLogger("ella").setLevel(saved[1])


def test_trackers_are_checked(tmp_path, sd15_base, images8, tiny_t5_dir, monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="'mlflow' unknown"):
        _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 1, "trackers": ["mlflow"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 1, "trackers": ["wandb"]})
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(config)


def test_samples_go_to_tensorboard_with_their_prompt_in_the_png(tmp_path, sd15_base, images8, tiny_t5_dir):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 1},
                     sample={"prompts": ["a red square"], "steps": 2})
    train(config)
    image = Image.open(config.output / "samples" / "step000001-0.png")
    assert image.text["parameters"].startswith("a red square\nSteps: 2, Sampler: DDIM")
    events = EventAccumulator(str(config.output / "logs" / "ella"), size_guidance={"images": 0})
    events.Reload()
    assert "samples/0" in events.Tags()["images"], events.Tags()
    assert events.Images("samples/0")[0].step == 1


def test_sample_never_replaces_an_earlier_image(tmp_path, finished, capsys):
    connector = finished.parent / "run" / "connector.safetensors"
    out = tmp_path / "images"
    for _ in range(2):
        assert main(["sample", "--config", str(finished), "--connector", str(connector), "--prompt", "a red square",
                     "--out", str(out), "--set", "sample.steps=2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["connector-0-2.png", "connector-0.png"]
    from PIL import Image

    assert "ELLA connector: connector.safetensors" in Image.open(out / "connector-0.png").text["parameters"]


def test_sample_with_a_connector_for_another_family_says_so(tmp_path, finished, sdxl_base, capsys):
    connector = finished.parent / "run" / "connector.safetensors"
    code = main(["sample", "--config", str(finished), "--connector", str(connector), "--prompt", "a red square",
                 "--set", f"model.base={json.dumps(str(sdxl_base))}", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "was made for an sd15 base (768-wide tokens)" in err and "sdxl" in err


# -- threads --------------------------------------------------------------------------------------------------------


def test_threads_leave_room_for_the_loader_workers(tmp_path, sd15_base, images8, tiny_t5_dir, monkeypatch):
    from ella_ext.train.runtime import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
        config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 1, "workers": 2})
        assert "6 CPU thread(s) per process" in set_threads(config, 1, torch.device("cpu"))
        assert torch.get_num_threads() == 6
        assert "2 CPU thread(s) per process" in set_threads(config, 2, torch.device("cpu"))  # 8 cores, 2 processes
        assert "4 CPU thread(s) per process" in set_threads(config, 2, torch.device("cuda"))  # workers feed a GPU
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert "(OMP_NUM_THREADS)" in set_threads(config, 1, torch.device("cpu")) and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)



# -- the VAE's precision and another VAE ---------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "vae", "vae_dtype", "dtype", "expected"), [
    ("sdxl", "", "auto", torch.float16, torch.float32),  # SDXL's own VAE overflows in fp16
    ("sdxl", "", "auto", torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range
    ("sdxl", "fixed-vae", "auto", torch.float16, torch.float16),  # a VAE made for fp16
    ("sd15", "", "auto", torch.float16, torch.float16),
    ("sdxl", "", "float16", torch.float16, torch.float16),  # the user's word
    ("sd15", "", "float32", torch.float16, torch.float32),
])
def test_the_vae_dtype_rule(tmp_path, sd15_base, images8, tiny_t5_dir, family, vae, vae_dtype, dtype, expected):
    from ella_ext.train.model import vae_dtype_for

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, model={"vae": vae, "vae_dtype": vae_dtype})
    assert vae_dtype_for(config, family, dtype) == expected


def test_sdxl_in_fp16_keeps_its_vae_in_fp32(tmp_path, sdxl_base, images8, tiny_t5_dir):
    from ella_ext.train.model import load_base

    config = load_config(write_config(tmp_path / "xl.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                                      output=tmp_path / "xl", train={"steps": 1}))
    base = load_base(config, torch.device("cpu"), torch.float16)
    assert base.unet.dtype == torch.float16 and base.clip_g.dtype == torch.float16
    assert base.vae.dtype == torch.float32


@pytest.fixture(scope="module")
def overflowing_vae(tmp_path_factory):
    """A VAE whose first convolution gives values near 1e6: fine in fp32, infinite in fp16 (max 65504)."""
    from .conftest import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)
    folder = tmp_path_factory.mktemp("vae") / "overflowing-vae"
    vae.save_pretrained(folder)
    return folder


def test_a_vae_that_overflows_stops_cache_and_train_with_what_to_do(tmp_path, sd15_base, images8, tiny_t5_dir,
                                                                     overflowing_vae, capsys):
    model = {"vae": str(overflowing_vae), "vae_dtype": "float16"}
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images8,
                        output=tmp_path / "out", model=model, train={"steps": 1, "cache": str(tmp_path / "cache")})
    assert main(["cache", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "overflowing-vae, float16) turned an image into non-finite latents" in err
    assert "vae_dtype = 'float32'" in err and "sdxl-vae-fp16-fix" in err
    with pytest.raises(BaseModelError, match="non-finite latents"):
        train(load_config(path, ['train.cache=""']))
    fine = load_config(path, ['train.cache=""', 'model.vae_dtype="float32"'])  # the same VAE in fp32 trains
    assert train(fine, overwrite=True).step == 1


def test_another_vae_from_a_folder_or_a_single_file(tmp_path, sd15_base, images8, tiny_t5_dir):
    from safetensors.torch import save_file

    from ella_ext.train.model import load_base

    from .conftest import tiny_vae
    from .ldm_layout import vae_to_ldm

    torch.manual_seed(9)
    other = tiny_vae(layout="sd")
    other.save_pretrained(tmp_path / "folder-vae")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other.state_dict()).items()}, str(tmp_path / "vae.safetensors"))
    other.save_config(tmp_path / "configs" / "vae")
    expected = other.state_dict()
    for vae, extra in ((tmp_path / "folder-vae", {}), (tmp_path / "vae.safetensors",
                                                       {"base_config": str(tmp_path / "configs")})):
        config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, model={"vae": str(vae), **extra})
        base = load_base(config, torch.device("cpu"), torch.float32)
        got = base.vae.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), vae
        assert base.vae_factor == 8
    with pytest.raises(BaseModelError, match=r"\[model\] vae = .*could not be loaded as a VAE"):
        load_base(_config(tmp_path, sd15_base, images8, tiny_t5_dir, model={"vae": str(tmp_path / "configs")}),
                  torch.device("cpu"), torch.float32)


# -- estimate ------------------------------------------------------------------------------------------------------


def test_estimate_works_on_sdxl_and_names_a_missing_base(tmp_path, sdxl_base, images8, tiny_t5_dir, capsys):
    path = write_config(tmp_path / "xl.toml", base=sdxl_base, llm=tiny_t5_dir, images=images8,
                        output=tmp_path / "xl", train={"steps": 10})
    assert main(["estimate", "--config", str(path), "--measure-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "time per optimiser step" in out and "clip_g" in out
    missing = write_config(tmp_path / "missing.toml", base=tmp_path / "no-such.safetensors", llm=tiny_t5_dir,
                           images=images8, output=tmp_path / "m", train={"steps": 10})
    assert main(["estimate", "--config", str(missing)]) == 2
    assert "no-such.safetensors" in capsys.readouterr().err
    folder = write_config(tmp_path / "folder.toml", base=tmp_path / "no-such-folder", llm=tiny_t5_dir,
                          images=images8, output=tmp_path / "f", train={"steps": 10})
    assert main(["estimate", "--config", str(folder), "--no-measure"]) == 2
    assert "is not a diffusers pipeline" in capsys.readouterr().err


def test_noise_offset_adds_one_draw_per_channel_to_the_same_noise():
    from ella_ext.train.feed import sample_noise

    shape = torch.Size([4, 8, 8])
    plain = sample_noise(shape, torch.Generator().manual_seed(1), 0.0)
    offset = sample_noise(shape, torch.Generator().manual_seed(1), 0.1)
    shift = offset - plain
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    per_channel = shift[:, :1, :1]
    assert torch.allclose(shift, per_channel.expand(shape)), "one constant per channel"
    assert 0 < per_channel.abs().max() < 0.5 and len(set(per_channel.flatten().tolist())) == 4



def test_empty_captions_error_and_a_stale_cache_are_refused_before_any_model_loads(tmp_path, sd15_base, tiny_t5_dir,
                                                                                   no_models, monkeypatch):
    from ella_ext.train.cache import CacheError
    from ella_ext.train.data import DataError

    from .conftest import make_caption_folder

    images = make_caption_folder(tmp_path / "images", count=4)
    (images / "img01.txt").write_text("  \n")
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images,
                        output=tmp_path / "out", data={"empty_captions": "error"},
                        train={"steps": 1, "cache": str(tmp_path / "cache")})
    with pytest.raises(DataError, match="img01.txt"):
        train(load_config(path))
    assert main(["cache", "--config", str(path)]) == 2
    # a complete cache whose data changed since: refused before the models load too
    monkeypatch.undo()
    (images / "img01.txt").write_text("a caption")
    assert main(["cache", "--config", str(path)]) == 0
    (images / "img02.txt").write_text("an edited caption")
    import ella_ext.train.model as model

    monkeypatch.setattr(model, "load_base", lambda *a, **k: pytest.fail("the base loaded before the refusal"))
    with pytest.raises(CacheError, match="img02"):
        train(load_config(path))


# -- the holes a review found in the above --------------------------------------------------------------------------


def test_resume_from_another_runs_checkpoint_never_mixes_two_runs(tmp_path, finished, no_models):
    elsewhere = finished.parent / "run" / "checkpoints" / "step-00000002"  # not the folder's newest (step 4)
    with pytest.raises(ConfigError, match="another line of training.*its newest checkpoint is step-00000004"):
        train(load_config(finished, ["train.steps=6"]), resume=str(elsewhere))
    with pytest.raises(ConfigError, match="--resume and --overwrite together"):
        train(load_config(finished, ["train.steps=6"]), resume="latest", overwrite=True)


def test_resume_from_a_copied_checkpoint_into_a_new_folder_finishes_with_its_checkpoint(tmp_path, finished):
    import shutil

    copy = tmp_path / "backup-ckpt"
    shutil.copytree(finished.parent / "run" / "checkpoints" / "step-00000002", copy)
    config = load_config(finished, ["train.steps=3", f"train.output={json.dumps(str(tmp_path / 'branch'))}"])
    result = train(config, resume=str(copy))
    assert result.step == 3 and result.checkpoint.name == "step-00000003" and result.connector.is_file()


def test_a_run_that_saved_no_weights_is_started_over(tmp_path, sd15_base, images8, tiny_t5_dir, caplog):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2})
    config.output.mkdir()
    (config.output / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-line
    (config.output / "skipped.txt").write_text("no caption file (.txt)\tx.png\n")
    (config.output / "logs").mkdir()
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert train(config).step == 2
    assert "holds files of a run that saved no weights" in caplog.text
    assert [json.loads(line)["step"] for line in (config.output / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (config.output / "skipped.txt").exists()


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, sd15_base, images8, tiny_t5_dir):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2})
    train(config)
    with open(config.output / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert train(load_config(config.path, ["train.steps=3"]), resume="latest").step == 3
    steps = [json.loads(line)["step"] for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_the_users_config_in_the_output_folder_is_never_touched(tmp_path, sd15_base, images8, tiny_t5_dir):
    project = tmp_path / "project"
    project.mkdir()
    path = write_config(project / "config.toml", base=sd15_base, llm=tiny_t5_dir, images=images8, output=project,
                        train={"steps": 1})
    path.write_text(path.read_text() + "# my notes\n")
    before = path.read_text()
    train(load_config(path))
    train(load_config(path), overwrite=True)
    assert path.read_text() == before
    assert (project / "ella-run.toml").read_text().startswith("# The config this run used")


def test_an_output_that_is_a_file_is_refused_by_key(tmp_path, sd15_base, images8, tiny_t5_dir, no_models):
    (tmp_path / "taken").write_text("")
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir,
                     train={"steps": 1, "output": str(tmp_path / "taken")})
    with pytest.raises(ConfigError, match=r"\[train\] output = .*taken cannot be used as the run's folder"):
        train(config)


def test_a_tracker_failing_at_the_end_does_not_fail_a_finished_run(tmp_path, sd15_base, images8, tiny_t5_dir,
                                                                    caplog):
    import shutil

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2})

    def delete_logs(step, _model):
        if step == 2:
            shutil.rmtree(config.output / "logs")

    with caplog.at_level(logging.WARNING, logger="ella"):
        result = train(config, on_step=delete_logs)
    assert result.connector.is_file() and result.checkpoint.name == "step-00000002"
    assert not list(tmp_path.glob("ella-rescued-*")) and not list(config.output.glob("ella-rescued-*"))


def test_a_folder_made_again_is_locked_again(tmp_path, sd15_base, images8, tiny_t5_dir):
    import shutil

    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 3})
    seen = {}

    def delete(step, _model):
        if step == 1:
            shutil.rmtree(config.output)
        if step == 2:  # the run made the folder again at step 2's metrics line: a second run must be refused
            try:
                OutputLock(config.output).acquire()
                seen["second run"] = "allowed"
            except ConfigError as exc:
                seen["second run"] = str(exc)
            seen["config"] = (config.output / "ella-run.toml").is_file()

    train(config, on_step=delete)
    assert "in use by another training run" in seen["second run"] and seen["config"]


def test_a_stop_asked_during_the_last_step_still_writes_the_connector(tmp_path, sd15_base, images8, tiny_t5_dir):
    config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"steps": 2})

    def interrupt(step, _model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(config, on_step=interrupt)
    assert not result.interrupted and result.connector.is_file()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, sd15_base, images8, tiny_llama_dir):
    tmp_path = tmp_path_factory.mktemp("llama")
    config = load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_llama_dir, images=images8,
                                      output=tmp_path / "run", model={"llm_layer": -2, "token_length": "flexible"},
                                      train={"steps": 2}))
    train(config)
    return config


def test_resume_or_init_from_at_another_llm_layer_is_refused(tmp_path, llama_run, images8, sd15_base,
                                                               tiny_llama_dir):
    with pytest.raises(ConfigError, match="trained with LLM layer -2, but \\[model\\] llm_layer is -1"):
        train(load_config(llama_run.path, ["model.llm_layer=-1", "train.steps=3"]), resume="latest")
    config = load_config(write_config(tmp_path / "init.toml", base=sd15_base, llm=tiny_llama_dir, images=images8,
                                      output=tmp_path / "init", train={"steps": 1},
                                      connector={"init_from": str(llama_run.output / "connector.safetensors")}))
    with pytest.raises(ConfigError, match="init_from connector.safetensors was trained with LLM layer -2"):
        train(config)


def test_sample_runs_a_connector_at_its_trained_layer(tmp_path, llama_run, monkeypatch, caplog):
    from ella_ext.text_encoders import TextEncoder

    layers = []
    encode = TextEncoder.encode

    def spy(self, texts, max_length):
        layers.append((self.layer, max_length))
        return encode(self, texts, max_length)

    monkeypatch.setattr(TextEncoder, "encode", spy)
    with caplog.at_level(logging.INFO, logger="ella"):
        assert main(["sample", "--config", str(llama_run.path), "--connector",
                     str(llama_run.output / "connector.safetensors"), "--prompt", "a red square", "--out",
                     str(tmp_path / "s"), "--set", "model.llm_layer=-1", "--set", 'model.token_length="fixed"',
                     "--set", "sample.steps=2"]) == 0
    assert layers and set(layers) == {(-2, None)}, layers  # layer -2, flexible: as trained, not as the config said
    assert "was trained with llm_layer = -2; sampling it so" in caplog.text


def test_cache_says_when_a_complete_cache_no_longer_matches_the_data(tmp_path, sd15_base, tiny_t5_dir, capsys):
    from .conftest import make_caption_folder

    images = make_caption_folder(tmp_path / "images", count=4)
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images,
                        output=tmp_path / "out", train={"steps": 1, "cache": str(tmp_path / "cache")})
    assert main(["cache", "--config", str(path)]) == 0
    assert main(["cache", "--config", str(path)]) == 0
    assert "matches the data already" in capsys.readouterr().out
    (images / "img00.txt").write_text("an edited caption")
    assert main(["cache", "--config", str(path)]) == 2
    assert "img00" in capsys.readouterr().err


def test_bf16_on_a_cpu_says_it_may_be_slow(tmp_path, sd15_base, images8, tiny_t5_dir):
    # seen on this project's CPU (no AVX512-BF16): a bf16 SDXL step did not finish in 6 minutes, float32 took 13.5 s
    from ella_ext.train.summary import cpu_bf16_note

    for precision, device, said in (("bf16", "cpu", True), ("no", "cpu", False), ("bf16", "cuda", False)):
        config = _config(tmp_path, sd15_base, images8, tiny_t5_dir, train={"mixed_precision": precision})
        note = cpu_bf16_note(config, torch.device(device))
        assert (note is not None and "bf16 on a CPU is fast only" in note) == said
