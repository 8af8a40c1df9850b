"""The held-out loss ([validation]): which images are held out and that training never sees them, the loss itself
(deterministic, per timestep, equal after a resume, falling as the connector fits), where it is written, and the
config's and the data's refusals."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from ella_ext import load_connector
from ella_ext.connector_file import META_TRAINING, read_metadata
from ella_ext.train.config import ConfigError, load_config, run_config_text, validate
from ella_ext.train.data import DataError, Skipped, is_held_out, iter_shard, list_sources
from ella_ext.train.loop import train
from ella_ext.train.model import connector_config, init_connector, load_base
from ella_ext.train.runtime import load_encoder, make_accelerator
from ella_ext.train.validation import VALIDATION_FILE, make_validation

from .conftest import make_caption_folder, needs_extras, write_config

needs_extras()

# img00..img07.png (the conftest's images) by the first 8 bytes of their name's SHA-1, as a fraction of 2^64:
# img06.png 0.049, img04.png 0.508, img01.png 0.516, img03.png 0.597, img02.png 0.605, img05.png 0.853,
# img00.png 0.854, img07.png 0.862. A split of 0.1 holds out img06.png alone; 0.04 holds out none.
SPLIT_ONE = 0.1
HELD = "img06.png"


def _config(tmp_path, base, llm, images, name="run", **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp_path / f"{name}.toml", base=base, llm=llm, images=images,
                                    output=tmp_path / name, **sections))


def _metrics(config):
    lines = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m], [m for m in lines if "val_loss" in m]


# -- the config ---------------------------------------------------------------------------------------------------


def _raw(**validation):
    return {"model": {"base": "b", "llm": "l"}, "train": {"steps": 1, "output": "o"}, "validation": validation}


@pytest.mark.parametrize(("validation", "message"), [
    ({"path": "held", "split": 0.1}, r"\[validation\] path and split are both set: give one"),
    ({"every": 10}, r"\[validation\] every = 10 needs held-out images: set \[validation\] path .* or split"),
    ({"split": 0.6}, r"\[validation\] split = 0.6 is too large; it must be at most 0.5"),
    ({"split": -0.1}, r"\[validation\] split = -0.1 is too small"),
    ({"timesteps": []}, r"\[validation\] timesteps = \[\] must be a non-empty list"),
    ({"timesteps": [100, 100]}, r"must be a non-empty list of different training timesteps"),
    ({"timesteps": [-1]}, r"must be a non-empty list of different training timesteps"),
    ({"timesteps": ["100"]}, r"\[validation\] timesteps must be a list of whole numbers"),
    ({"timesteps": [True]}, r"\[validation\] timesteps must be a list of whole numbers"),
    ({"max_items": 0}, r"\[validation\] max_items = 0 is too small"),
    ({"eval_every": 5}, r"eval_every = 5 needs \[validation\] questions .* and \[validation\] judge"),
    ({"eval_images": 0}, r"\[validation\] eval_images = 0 is too small"),
    ({"interval": 5}, r"Unknown key in \[validation\]: interval"),
])
def test_bad_validation_keys_are_refused_by_name(validation, message):
    with pytest.raises(ConfigError, match=message):
        validate(_raw(**validation))


def test_validation_is_off_by_default_and_its_keys_round_trip(tmp_path):
    config = validate(_raw())
    assert config.validation == {"path": "", "split": 0.0, "every": 0, "timesteps": [100, 300, 500, 700, 900],
                                 "max_items": 64, "batch_size": 0, "seed": 0, "eval_every": 0, "questions": "",
                                 "judge": "", "eval_images": 1}
    (tmp_path / "held").mkdir()
    path = tmp_path / "run.toml"
    path.write_text('[model]\nbase = "b"\nllm = "l"\n[train]\nsteps = 1\noutput = "o"\n[validation]\n'
                    'path = "held"\nevery = 5\ntimesteps = [10, 999]\nmax_items = 3\nbatch_size = 2\nseed = 4\n'
                    'eval_every = 7\nquestions = "q.jsonl"\njudge = "judge_module:answer"\neval_images = 2\n')
    config = load_config(path)
    saved = tmp_path / "saved.toml"
    saved.write_text(run_config_text(config))
    again = load_config(saved)
    assert again.validation == {**config.validation, "path": str((tmp_path / "held").resolve())}
    assert again.validation["judge"] == "judge_module:answer" and again.validation["eval_every"] == 7
    assert "[validation]" in saved.read_text()


# -- which images are held out ----------------------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_file_name(tmp_path, sd15_base, tiny_t5_dir, images8):
    assert [is_held_out(f"img{i:02d}.png", SPLIT_ONE) for i in range(8)] == [i == 6 for i in range(8)]
    assert not any(is_held_out(f"img{i:02d}.png", 0.04) for i in range(8))
    assert not is_held_out(HELD, 0.0)
    # the same names wherever the folder lies and whichever place it has among the sources
    copy = shutil.copytree(images8, tmp_path / "elsewhere" / "copy")
    other = make_caption_folder(tmp_path / "other", count=2)
    for sources in ([images8], [other, copy]):
        config = _config(tmp_path, sd15_base, tiny_t5_dir, sources, validation={"split": SPLIT_ONE})
        held = []
        records, _ = list_sources(config, Skipped(), held_out=held)
        assert [r.key.split("/", 1)[1] for r in held] == [HELD]
        assert HELD not in {r.key.split("/", 1)[1] for r in records}
        assert len(records) == 8 * len(sources) - 1 - (len(sources) - 1) * 6  # the second folder: img00, img01
    # a subfolder's path is the name: a/img06.png is another file than img06.png
    assert is_held_out("img06.png", SPLIT_ONE) and not is_held_out("a/img06.png", SPLIT_ONE)


def _shards(folder, keys):
    import io
    import tarfile

    from .conftest import CAPTIONS, make_image

    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard-000.tar", "w") as tar:
        for i, key in enumerate(keys):
            buffer = io.BytesIO()
            make_image(i).save(buffer, format="PNG")
            for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.txt", CAPTIONS[i % 8].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


SHARD_KEYS = [f"k{i}" for i in range(8)]


def test_shard_samples_are_held_out_by_their_key(tmp_path):
    shards = _shards(tmp_path / "shards", SHARD_KEYS)
    url = str(shards / "shard-000.tar")
    held = {k for k in SHARD_KEYS if is_held_out(k, 0.3)}
    assert held and held != set(SHARD_KEYS), "pick keys that split both ways"
    trained = [r.member for r, _ in iter_shard(0, url, Skipped(), split=0.3)]
    scored = [r.member for r, _ in iter_shard(0, url, Skipped(), split=0.3, held_out=True)]
    assert set(trained) == set(SHARD_KEYS) - held and set(scored) == held


def test_held_out_images_never_reach_a_training_batch(tmp_path, sd15_base, tiny_t5_dir, images8, monkeypatch):
    import ella_ext.train.loop as loop

    seen = []
    original = loop.make_inputs

    def spy(items, data, micro, *rest):
        seen.extend(i["record"].key if "record" in i else data.records[i["index"]].key for i in items)
        return original(items, data, micro, *rest)

    monkeypatch.setattr(loop, "make_inputs", spy)
    shards = _shards(tmp_path / "shards", SHARD_KEYS)
    cases = {"listed": (images8, {}), "cached": (images8, {"cache": str(tmp_path / "cache")}),
             "streamed": (shards, {})}
    for name, (images, extra) in cases.items():
        seen.clear()
        config = _config(tmp_path, sd15_base, tiny_t5_dir, images, name, validation={"split": 0.3, "every": 2},
                         train={"steps": 6, "batch_size": 2, **extra})
        train(config)
        names = {key.rsplit("/", 1)[1] for key in seen}
        held = {n for n in (SHARD_KEYS if name == "streamed" else [f"img{i:02d}.png" for i in range(8)])
                if is_held_out(n, 0.3)}
        assert held and not names & held, (name, names, held)
        assert len(names) == 8 - len(held), (name, names)  # everything else was trained on (6 steps x 2 > 8)
        listed = [line.split("\t") for line in (config.output / VALIDATION_FILE).read_text().splitlines()]
        assert sorted(where.rsplit("/", 1)[-1].rsplit(":", 1)[-1] for _, where in listed) == sorted(held)
        assert all(status == "validated" for status, _ in listed)
        assert len(_metrics(config)[1]) == 3  # steps 2, 4, 6
    # the cache holds no held-out item, and knows which split it was made with
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["items"] == 8 - len(held) and manifest["fingerprint"]["validation.split"] == 0.3


def test_a_cache_made_with_another_split_is_refused(tmp_path, sd15_base, tiny_t5_dir, images8):
    from ella_ext.train.cache import CacheError

    cache = {"cache": str(tmp_path / "cache"), "steps": 1}
    train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "plain", train=cache))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert "validation.split" not in manifest["fingerprint"]  # caches made with the split off are as before
    with pytest.raises(CacheError, match=r"other settings \(validation.split differ"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "split", train=cache,
                      validation={"split": SPLIT_ONE}))
    shutil.rmtree(tmp_path / "cache")
    train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "split2", train=cache, validation={"split": SPLIT_ONE}))
    with pytest.raises(CacheError, match=r"validation.split differ"):  # and the other way round
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "plain2", train=cache))


# -- refusals -----------------------------------------------------------------------------------------------------


def test_held_out_sets_that_cannot_work_are_refused_with_what_to_do(tmp_path, sd15_base, tiny_t5_dir, images8,
                                                                    monkeypatch):
    import ella_ext.train.loop as loop

    def no_models(*args, **kwargs):
        raise AssertionError("refused only after the models loaded")

    monkeypatch.setattr(loop._Run, "_load_models", no_models)
    with pytest.raises(DataError, match=r"split = 0.04 holds out none of the 8 images.*Raise it.*\[validation\] "
                                        r"path instead"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "none", validation={"split": 0.04}))
    alone = tmp_path / "alone"
    alone.mkdir()
    for suffix in (".png", ".txt"):
        shutil.copy(images8 / f"img06{suffix}", alone / f"img06{suffix}")
    with pytest.raises(DataError, match=r"holds out every one of the 1 images.*leaves none to train on. Lower it"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, alone, "all", validation={"split": SPLIT_ONE}))
    with pytest.raises(DataError, match=r"\[validation\] path = .*missing.* does not exist"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "missing",
                      validation={"path": str(tmp_path / "missing")}))
    monkeypatch.undo()
    empty = tmp_path / "no-captions"
    empty.mkdir()
    shutil.copy(images8 / "img00.png", empty / "img00.png")  # an image without its caption file
    with pytest.raises(DataError, match=r"\[validation\] path = .*no-captions.* holds no usable image .* Give a "
                                        "folder of captioned images"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "empty", validation={"path": str(empty)}))
    with pytest.raises(ConfigError, match=r"timesteps = \[100, 1000\]: this base's scheduler has 1000 training "
                                          r"timesteps \(0 to 999\)"):
        train(_config(tmp_path, sd15_base, tiny_t5_dir, images8, "late",
                      validation={"path": str(images8), "timesteps": [100, 1000]}))


# -- the loss -----------------------------------------------------------------------------------------------------


def _scorer(config):
    base = load_base(config, torch.device("cpu"), torch.float32)
    return make_validation(config, make_accelerator(None), base, load_encoder(config, torch.device("cpu")), None)


def test_the_same_weights_give_the_same_loss_whatever_the_batching(tmp_path, sd15_base, tiny_t5_dir, images8):
    held = shutil.copytree(images8, tmp_path / "held")
    other = make_caption_folder(tmp_path / "train", count=2)
    config = _config(tmp_path, sd15_base, tiny_t5_dir, other, validation={"path": str(held), "batch_size": 3})
    scorer = _scorer(config)
    connector = init_connector(connector_config(config, "sd15", 20, 768), 7)
    first, second = scorer.loss(connector, 1), scorer.loss(connector, 2)
    assert first["val_loss"] == second["val_loss"] and first["val_images"] == 8
    per_timestep = [first[f"val_loss_t{t}"] for t in (100, 300, 500, 700, 900)]
    assert first["val_loss"] == pytest.approx(sum(per_timestep) / 5, rel=1e-12)
    assert len(set(per_timestep)) == 5
    # other batches (one image per pass) and another seed's scorer object: the same images, noise and number
    one_by_one = _scorer(_config(tmp_path, sd15_base, tiny_t5_dir, other, "again",
                                 validation={"path": str(held), "batch_size": 1}))
    assert one_by_one.loss(connector, 1)["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    reseeded = _scorer(_config(tmp_path, sd15_base, tiny_t5_dir, other, "reseeded",
                               validation={"path": str(held), "seed": 1}))
    assert reseeded.loss(connector, 1)["val_loss"] != first["val_loss"]  # the seed picks the noise
    capped = _scorer(_config(tmp_path, sd15_base, tiny_t5_dir, other, "capped",
                             validation={"path": str(held), "max_items": 3, "timesteps": [500]}))
    assert capped.loss(connector, 1)["val_images"] == 3
    listed = (tmp_path / "capped" / VALIDATION_FILE).read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["validated"] * 3 + ["held out, not scored "
                                                                           "([validation] max_items)"] * 5


def test_val_loss_is_logged_and_equal_after_a_resume(tmp_path, sd15_base, tiny_t5_dir, images8, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = dict(train={"steps": 4, "ema": 0.9, "save_every": 2, "save_precision": "fp32"},
                  validation={"split": SPLIT_ONE, "every": 2, "timesteps": [250, 750]})
    straight = _config(tmp_path, sd15_base, tiny_t5_dir, images8, "straight", **common)
    with caplog.at_level(logging.INFO, logger="ella"):
        train(straight)
    steps, val = _metrics(straight)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["step"] for m in val] == [2, 4]  # step 4 is every's and the end's: scored once
    assert all(set(m) == {"step", "val_loss", "val_loss_t250", "val_loss_t750", "val_images"} for m in val)
    assert all(m["val_images"] == 1 for m in val)
    assert "step 2 val_loss" in caplog.text and "(1 images x 2 timesteps, EMA weights)" in caplog.text
    assert "validation: 1 held-out image(s) ([validation] split 0.1 of the data, never trained on); 1 scored" \
        in caplog.text
    record = json.loads(read_metadata(straight.output / "connector.safetensors")[META_TRAINING])
    assert record["validation"] == {"source": None, "split": SPLIT_ONE, "held_out": 1, "images": 1,
                                    "timesteps": [250, 750], "seed": 0, "ema": True}
    assert record["sources"][0]["images"] == 7
    events = EventAccumulator(str(straight.output / "logs" / "ella"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [
        (m["step"], pytest.approx(m["val_loss"], rel=1e-6)) for m in val]
    assert [e.step for e in events.Scalars("val_loss_t750")] == [2, 4]

    resumed = _config(tmp_path, sd15_base, tiny_t5_dir, images8, "resumed", **common)
    train(load_config(resumed.path, ["train.steps=2"]))
    moved = load_config(resumed.path, ["validation.split=0.3"])  # another held-out set: refused on resume
    with pytest.raises(ConfigError, match="the held-out set changed since that checkpoint .*split 0.1.* then, "
                                          "split 0.3 now"):
        train(moved, resume="latest")
    train(resumed, resume="latest")
    assert _metrics(resumed)[1] == val  # the same weights at each step: the same numbers, bit for bit
    # at the end only when every does not fall on the last step; no validation when it is off
    ended = _config(tmp_path, sd15_base, tiny_t5_dir, images8, "ended", train={"steps": 3},
                    validation={"split": SPLIT_ONE})
    train(ended)
    assert [m["step"] for m in _metrics(ended)[1]] == [3]
    off = _config(tmp_path, sd15_base, tiny_t5_dir, images8, "off", train={"steps": 1})
    train(off)
    assert not _metrics(off)[1] and not (off.output / VALIDATION_FILE).exists()
    assert "validation" not in json.loads(read_metadata(off.output / "connector.safetensors")[META_TRAINING])


# Measured: 1.1062 at step 0 (the fresh connector), 1.0057 at step 15, 1.0028 at step 30 (a frozen random UNet keeps
# it near mean(noise^2) = 1, see test_training.py; what falls is the part the connector's context adds).
FALL = 0.03


def test_val_loss_falls_while_the_connector_fits_its_images(tmp_path, sd15_base, tiny_t5_dir, images8):
    """The held-out folder is a copy of the training images: the connector fits them, so their loss must fall."""
    held = shutil.copytree(images8, tmp_path / "copy")
    config = _config(tmp_path, sd15_base, tiny_t5_dir, images8,
                     train={"steps": 30, "batch_size": 4, "lr": 2e-3, "save_precision": "fp32"},
                     validation={"path": str(held), "every": 15, "batch_size": 4})
    train(config)
    val = _metrics(config)[1]
    assert [m["step"] for m in val] == [15, 30] and val[-1]["val_images"] == 8
    scorer = _scorer(config)
    start = scorer.loss(init_connector(connector_config(config, "sd15", 20, 768), config.train["seed"]), 0)
    print(f"val_loss: step 0 {start['val_loss']:.4f}, "
          + ", ".join(f"step {m['step']} {m['val_loss']:.4f}" for m in val))
    assert val[-1]["val_loss"] < val[0]["val_loss"] < start["val_loss"]
    assert start["val_loss"] - val[-1]["val_loss"] > FALL
    # the saved connector, scored again by a new scorer, gives the run's number exactly
    assert scorer.loss(load_connector(config.output / "connector.safetensors"), 30)["val_loss"] == val[-1]["val_loss"]


def test_sdxl_and_flexible_length_validate(tmp_path, sdxl_base, tiny_t5_dir):
    data = make_caption_folder(tmp_path / "wide", sizes=[(48, 24), (40, 40)])
    held = make_caption_folder(tmp_path / "held", count=3, sizes=[(40, 40), (24, 48)])
    config = _config(tmp_path, sdxl_base, tiny_t5_dir, data, data={"bucketing": True}, train={"steps": 2},
                     model={"token_length": "flexible"}, validation={"path": str(held), "batch_size": 2})
    train(config)
    val = _metrics(config)[1]
    assert [m["step"] for m in val] == [2] and val[0]["val_images"] == 3
    assert torch.isfinite(torch.tensor(val[0]["val_loss"]))


def test_a_held_out_folder_inside_a_training_folder_is_named(tmp_path, sd15_base, tiny_t5_dir, caplog):
    """Caption folders are read with their subfolders: data/val held out beside the source data/ is trained on."""
    from ella_ext.train.data import source_kinds
    from ella_ext.train.validation import preflight_validation

    data = make_caption_folder(tmp_path / "data", count=4)
    make_caption_folder(data / "val", count=2)
    other = make_caption_folder(tmp_path / "elsewhere", count=2)
    for held, warned in ((data / "val", True), (other, False)):
        config = load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=data,
                                          output=tmp_path / "out", validation={"path": str(held)}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ella"):
            preflight_validation(config, source_kinds(config))
        assert ("overlaps the [[data.sources]] path" in caplog.text) == warned, caplog.text
