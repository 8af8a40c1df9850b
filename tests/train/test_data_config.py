"""Data formats, buckets, caption dropout, bad inputs and the config's validation."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest

from ella_ext.train.batches import ListedPlan, make_buckets, pick_bucket, stream_batches
from ella_ext.train.config import ConfigError, load_config
from ella_ext.train.data import DataError, Skipped, list_sources
from ella_ext.train.loop import train

from .conftest import CAPTIONS, make_caption_folder, make_image, needs_extras, write_config

needs_extras()


def _config(tmp_path, images, sd15_base, tiny_t5_dir, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=images,
                                    output=tmp_path / "out", **sections))


# -- formats ------------------------------------------------------------------------------------------------------


def _jsonl_folder(folder, count=6):
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        make_image(i).save(folder / f"p{i}.png")
        lines.append(json.dumps({"file_name": f"p{i}.png", "text": CAPTIONS[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _png_bytes(index, size=(40, 40)):
    buffer = io.BytesIO()
    make_image(index, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(folder, count=2, per_shard=4, broken=False):
    folder.mkdir(parents=True)
    for s in range(count):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}-{i}"
                _add(tar, f"{key}.png", _png_bytes(s * per_shard + i))
                _add(tar, f"{key}.txt", CAPTIONS[(s * per_shard + i) % 8].encode())
            if broken:
                _add(tar, "nocaption.png", _png_bytes(0))
                _add(tar, "badimage.png", b"not an image")
                _add(tar, "badimage.txt", b"a caption")
    return folder


def test_caption_folder_jsonl_folder_and_shards_train(tmp_path, sd15_base, tiny_t5_dir, images8):
    jsonl = _jsonl_folder(tmp_path / "jsonl")
    shards = _shards(tmp_path / "shards", broken=True)
    for name, images in (("txt", images8), ("jsonl", jsonl), ("tar", shards)):
        config = _config(tmp_path / name, images, sd15_base, tiny_t5_dir, train={"steps": 2})
        result = train(config)
        assert result.connector.is_file(), name
    records, _ = list_sources(_config(tmp_path / "l", jsonl, sd15_base, tiny_t5_dir), Skipped())
    assert [r.caption for r in records] == CAPTIONS[:6]


def test_shard_stream_skips_bad_samples_and_splits_shards_by_process(tmp_path):
    shards = _shards(tmp_path / "shards", count=2, per_shard=3, broken=True)
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    skipped = Skipped()
    buckets = make_buckets(32, 8, 2.0, False)
    rank0 = stream_batches([(0, urls)], buckets, 3, 0, 2, seed=0, skipped=skipped)
    rank1 = stream_batches([(0, urls)], buckets, 3, 1, 2, seed=0, skipped=skipped)
    first0, first1 = next(rank0), next(rank1)
    assert {i.record.path for i in first0} == {urls[0]} and {i.record.path for i in first1} == {urls[1]}
    next(rank0)  # the next epoch: shard 0 was read to its end (the bad samples follow the good ones)
    assert skipped.counts["shard sample without a caption (txt, caption, text or json)"] >= 1
    assert skipped.counts["unreadable image"] >= 1
    # resuming the stream at batch 3 gives what the straight stream gives there
    straight = stream_batches([(0, urls)], buckets, 3, 0, 2, seed=0, skipped=Skipped())
    for _ in range(3):
        next(straight)
    resumed = stream_batches([(0, urls)], buckets, 3, 0, 2, seed=0, skipped=Skipped(), start=3)
    assert [i.record.key for i in next(resumed)] == [i.record.key for i in next(straight)]
    with pytest.raises(DataError, match="every process needs a shard"):
        next(stream_batches([(0, urls)], buckets, 3, 2, 3, seed=0, skipped=Skipped()))


def test_buckets_group_by_aspect_ratio(tmp_path):
    buckets = make_buckets(64, 16, 2.0, True)
    assert (64, 64) in buckets and (48, 80) in buckets and (80, 48) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and max(w, h) / min(w, h) <= 2.0 for w, h in buckets)
    assert all(abs(w * h - 64 * 64) <= 64 * 16 for w, h in buckets)
    assert pick_bucket((400, 200), buckets) == (80, 48)
    assert pick_bucket((100, 100), buckets) == (64, 64)
    assert make_buckets(64, 16, 2.0, False) == [(64, 64)]
    # every global batch holds one bucket; ranks take disjoint slices of the same global batch
    buckets_of = [(80, 48)] * 5 + [(64, 64)] * 7
    plans = [ListedPlan(buckets_of, [1] * 12, 2, rank, 2, seed=3) for rank in (0, 1)]
    streams = [p.batches() for p in plans]
    for _ in range(12):
        a, b = next(streams[0]), next(streams[1])
        assert len({buckets_of[i] for i in a + b}) == 1
    one = ListedPlan(buckets_of, [1] * 12, 4, 0, 1, seed=3).batches()
    two = [p.batches() for p in plans]
    for _ in range(6):
        assert next(one) == next(two[0]) + next(two[1])


def test_caption_dropout_rate_and_repeats(tmp_path, sd15_base, tiny_t5_dir, images8, monkeypatch):
    import ella_ext.train.loop as loop

    config = _config(tmp_path, images8, sd15_base, tiny_t5_dir, train={"steps": 10, "batch_size": 4},
                     sources=[{"path": str(images8), "caption_dropout": 0.5, "repeats": 2}])
    captions = []
    original = loop.make_inputs

    def spy(items, data, micro, config, accelerator, base, encoder):
        inputs = original(items, data, micro, config, accelerator, base, encoder)
        captions.extend(inputs.features.shape[0] * [None])
        return inputs

    texts = []
    encode = None

    def record_encode(self, batch_texts, max_length):
        texts.extend(batch_texts)
        return encode(self, batch_texts, max_length)

    from ella_ext.text_encoders import TextEncoder

    encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", record_encode)
    monkeypatch.setattr(loop, "make_inputs", spy)
    train(config)
    assert len(texts) == 40
    dropped = texts.count("")
    assert 10 <= dropped <= 30, dropped  # p = 0.5 over 40 draws (binomial: 40 +- 2 x 3.2 about 20)
    assert set(texts) - {""} <= set(CAPTIONS)


# -- bad inputs ---------------------------------------------------------------------------------------------------


def test_missing_captions_and_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    folder = make_caption_folder(tmp_path / "data", count=4)
    (folder / "img01.txt").unlink()
    (folder / "img02.png").write_bytes(b"broken")
    from ella_ext.train.config import validate

    config = validate({"model": {"base": "x", "llm": "y"}, "train": {"steps": 1, "output": "o"},
                       "data": {"sources": [{"path": str(folder)}]}})
    skipped = Skipped()
    records, _ = list_sources(config, skipped)
    assert [r.key for r in records] == ["000/img00.png", "000/img03.png"]
    with caplog.at_level(logging.WARNING, logger="ella"):
        skipped.report()
    assert "skipped 1 item(s): no caption file (.txt): " in caplog.text and "img01.png" in caplog.text
    assert "skipped 1 item(s): unreadable image: " in caplog.text
    assert "img02.png (UnidentifiedImageError: cannot identify image file 'img02.png')" in caplog.text


def test_nothing_usable_is_refused_before_training(tmp_path, sd15_base, tiny_t5_dir):
    folder = tmp_path / "empty"
    folder.mkdir()
    make_image(0).save(folder / "a.png")  # no caption
    config = _config(tmp_path, folder, sd15_base, tiny_t5_dir)
    with pytest.raises(DataError, match="No usable image"):
        train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()
    missing = _config(tmp_path / "m", tmp_path / "nowhere", sd15_base, tiny_t5_dir)
    with pytest.raises(DataError, match="does not exist"):
        train(missing)


def _raw(**changes):
    raw = {"model": {"base": "b", "llm": "l"}, "train": {"steps": 1, "output": "o"}}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize(("changes", "message"), [
    ({"train": {"stepz": 3}}, r"Unknown key in \[train\]: stepz"),
    ({"model": {"family": "sd3"}}, r"\[model\] family = 'sd3' is not allowed; use one of: 'auto', 'sd15', 'sdxl'"),
    ({"model": {"token_length": "any"}}, r"\[model\] token_length"),
    ({"train": {"lr": 0}}, r"\[train\] lr = 0.0 must be greater than 0"),
    ({"train": {"batch_size": "4"}}, r"\[train\] batch_size must be a whole number"),
    ({"train": {"mixed_precision": "fp8"}}, r"mixed_precision"),
    ({"data": {"resolution": 500}}, r"multiple of \[data\] bucket_step"),
    ({"data": {"sources": [{"path": "x", "caption_dropout": 1.5}]}}, r"caption_dropout = 1.5 is too large"),
    ({"data": {"sources": [{"path": "x", "weight": 2}]}}, r"Unknown key in \[data.sources\]: weight"),
    ({"sampler": {}}, r"Unknown section: \[sampler\]"),
    ({"sample": {"prompts": "one"}}, r"\[sample\] prompts must be a list"),
])
def test_bad_config_values_are_refused_by_name(changes, message):
    from ella_ext.train.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(_raw(**changes))


def test_required_keys_and_set_overrides(tmp_path):
    from ella_ext.train.config import validate

    with pytest.raises(ConfigError, match=r"\[train\] output is required"):
        validate({"model": {"base": "b", "llm": "l"}, "train": {"steps": 1}})
    path = tmp_path / "c.toml"
    path.write_text('[model]\nbase = "b"\nllm = "l"\n[train]\nsteps = 1\noutput = "o"\n')
    config = load_config(path, ["train.steps=20", "train.lr=3e-5", "model.token_length=flexible"])
    assert config.train["steps"] == 20 and config.train["lr"] == 3e-5 and config.model["token_length"] == "flexible"
    assert config.output == tmp_path / "o"
    with pytest.raises(ConfigError, match="Unknown key in \\[train\\]: nope"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(path, ["steps=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_init_from_shape_must_agree(tmp_path, sd15_base, tiny_t5_dir, images8):
    first = train(_config(tmp_path / "a", images8, sd15_base, tiny_t5_dir, train={"steps": 1}))
    config = _config(tmp_path / "b", images8, sd15_base, tiny_t5_dir, train={"steps": 1},
                     connector={"init_from": str(first.connector), "width": 64})
    with pytest.raises(ConfigError, match=r"\[connector\] width = 64 .*disagrees with init_from connector.safetensors"):
        train(config)
    fine = _config(tmp_path / "c", images8, sd15_base, tiny_t5_dir, train={"steps": 1},
                   connector={"init_from": str(first.connector)})
    assert train(fine).connector.is_file()


def test_family_mismatch_is_refused(tmp_path, sd15_base, tiny_t5_dir, images8):
    config = _config(tmp_path, images8, sd15_base, tiny_t5_dir, model={"family": "sdxl"})
    with pytest.raises(ConfigError, match="family = 'sdxl' but .* holds an sd15 UNet"):
        train(config)
