"""Data problems named per file (issue 16, item 5): a broken image named once, empty captions under each
``[data] empty_captions``, captions that are not UTF-8, ``skipped.txt``, a cache that notices changed data, and
folders mixed with shards (cached, then trained from the cache)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile

import pytest

from ella_ext.train.cache import CacheError, CacheReader
from ella_ext.train.cli import main
from ella_ext.train.config import validate
from ella_ext.train.data import (
    EMPTY_CAPTION,
    DataError,
    Skipped,
    iter_shard,
    list_sources,
    preflight,
)
from ella_ext.train.feed import BROKEN
from ella_ext.train.loop import train

from .conftest import CAPTIONS, make_caption_folder, make_image, needs_extras, write_config
from .test_data_config import _add, _config, _png_bytes

needs_extras()


def _plain_config(*paths, **data):
    """A config for listing only (no model is loaded)."""
    return validate({"model": {"base": "x", "llm": "y"}, "train": {"steps": 1, "output": "o"},
                     "data": {**data, "sources": [{"path": str(p)} for p in paths]}})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads; the pixels do not


def _skipped_lines(folder):
    return (folder / "skipped.txt").read_text(encoding="utf-8").splitlines()


def _shard(path, samples):
    """A .tar shard of (key, image bytes or None, caption bytes or None) samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            if image is not None:
                _add(tar, f"{key}.png", image)
            if caption is not None:
                _add(tar, f"{key}.txt", caption)
    return path


# -- an image that breaks after listing ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_is_named_once_and_replaced_in_its_batch(tmp_path, sd15_base, tiny_t5_dir, caplog, workers):
    folder = make_caption_folder(tmp_path / "data", count=4)
    _truncate(folder / "img02.png")
    config = _config(tmp_path, folder, sd15_base, tiny_t5_dir, train={"steps": 6, "workers": workers})
    with caplog.at_level(logging.WARNING, logger="ella"):
        result = train(config)  # 4 images, batch 2, 6 steps: 3 epochs meet the broken file
    assert result.connector.is_file()
    named = [r.getMessage() for r in caplog.records if "img02.png" in r.getMessage()]
    assert len(named) == 1, named
    assert BROKEN in named[0] and "OSError: image file is truncated" in named[0]
    reason, where, detail = _skipped_lines(tmp_path / "out")[0].split("\t")
    assert len(_skipped_lines(tmp_path / "out")) == 1
    assert (reason, where) == (BROKEN, str(folder / "img02.png")) and detail.startswith("OSError: image file is trunc")


def test_streamed_shards_name_bad_samples_once_with_shard_and_key(tmp_path, sd15_base, tiny_t5_dir, caplog):
    truncated = _png_bytes(1)
    shard = _shard(tmp_path / "shards" / "shard-000.tar", [
        ("s0", _png_bytes(0), CAPTIONS[0].encode()), ("s1", truncated[: len(truncated) // 2], CAPTIONS[1].encode()),
        ("s2", _png_bytes(2), CAPTIONS[2].encode()), ("s3", _png_bytes(3), CAPTIONS[3].encode()),
        ("nocaption", _png_bytes(4), None)])
    config = _config(tmp_path, tmp_path / "shards", sd15_base, tiny_t5_dir, train={"steps": 6, "workers": 1})
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert train(config).connector.is_file()  # one shard of 4 usable samples, batch 2: 3 epochs
    lines = sorted(_skipped_lines(tmp_path / "out"))
    assert [line.split("\t")[:2] for line in lines] == [
        [BROKEN, f"{shard}:s1"], ["shard sample without a caption (txt, caption, text or json)", f"{shard}:nocaption"]]
    assert sum(f"{shard}:s1" in r.getMessage() for r in caplog.records) == 1
    assert sum(f"{shard}:nocaption" in r.getMessage() for r in caplog.records) == 1


# -- empty captions -----------------------------------------------------------------------------------------------


def _empty_caption_data(tmp_path):
    folder = make_caption_folder(tmp_path / "txt", count=4)
    (folder / "img01.txt").write_text("")
    (folder / "img03.txt").write_text("  \n")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for i in range(3):
        make_image(i).save(jsonl / f"p{i}.png")
    (jsonl / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"p{i}.png", "text": t}) for i, t in
                                                    enumerate([CAPTIONS[0], "", CAPTIONS[2]])) + "\n")
    shard = _shard(tmp_path / "shards" / "shard-000.tar", [
        ("a", _png_bytes(0), CAPTIONS[0].encode()), ("b", _png_bytes(1), b" "), ("c", _png_bytes(2), b"x")])
    empty = [str(folder / "img01.txt"), str(folder / "img03.txt"), f"{jsonl / 'metadata.jsonl'}:2 (p1.png)"]
    return folder, jsonl, shard, empty


@pytest.mark.parametrize("mode", ["skip", "keep", "error"])
def test_empty_captions_skip_keep_or_error(tmp_path, mode):
    folder, jsonl, shard, empty = _empty_caption_data(tmp_path)
    config = _plain_config(folder, jsonl, empty_captions=mode)
    skipped = Skipped()
    if mode == "error":
        for refuse in (lambda: preflight(config), lambda: list_sources(config, skipped)):
            with pytest.raises(DataError, match=r"3 caption\(s\) are empty \(\[data\] empty_captions = 'error'\)") \
                    as refusal:
                refuse()
            assert all(place in str(refusal.value) for place in empty), refusal.value
            assert "empty_captions = 'skip'" in str(refusal.value) and "'keep'" in str(refusal.value)
        with pytest.raises(DataError, match=rf"1 caption\(s\) are empty .*: {shard}:b\."):
            list(iter_shard(0, str(shard), Skipped(), empty_captions=mode))
        return
    records, _ = list_sources(config, skipped)
    shard_records = [r for r, _ in iter_shard(0, str(shard), skipped, empty_captions=mode)]
    captions = {r.key: r.caption for r in records + shard_records}
    dropped = {"000/img01.png", "000/img03.png", "001/p1.png", "000/shard-000.tar/b"}
    if mode == "skip":
        assert not dropped & captions.keys() and len(captions) == 2 + 2 + 2
        assert [(reason, where) for reason, where, _ in skipped.items] == [(EMPTY_CAPTION, p) for p in empty] + [
            (EMPTY_CAPTION, f"{shard}:b")]
        assert skipped.kept_empty == []
    else:
        assert all(captions[key] == "" for key in dropped) and len(captions) == 4 + 3 + 3
        assert skipped.items == [] and skipped.kept_empty == [*empty, f"{shard}:b"]


def test_empty_captions_error_refuses_the_run(tmp_path, sd15_base, tiny_t5_dir):
    folder, _, shard, _ = _empty_caption_data(tmp_path / "data")
    config = _config(tmp_path, folder, sd15_base, tiny_t5_dir, data={"empty_captions": "error"})
    with pytest.raises(DataError, match=r"2 caption\(s\) are empty .*img01\.txt, .*img03\.txt\."):
        train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()
    # shards are known once read: the stream's reader (a spawned worker) refuses at the first empty caption
    streamed = _config(tmp_path / "s", shard, sd15_base, tiny_t5_dir, data={"empty_captions": "error"},
                       train={"workers": 1})
    with pytest.raises(DataError) as refusal:
        train(streamed)
    assert str(refusal.value).startswith(f"1 caption(s) are empty ([data] empty_captions = 'error'): {shard}:b.")
    assert "Traceback" not in str(refusal.value)


# -- captions that are not UTF-8 ----------------------------------------------------------------------------------


def test_a_caption_that_is_not_utf8_is_reported_as_such(tmp_path, caplog):
    folder = make_caption_folder(tmp_path / "txt", count=4)
    (folder / "img01.txt").write_bytes("un café rouge".encode("latin-1"))
    (folder / "img02.txt").write_bytes("a red cup".encode("utf-16"))
    (folder / "img03.txt").write_bytes("\ufeffa blue cup".encode())  # UTF-8 with a byte-order mark: fine
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    make_image(0).save(jsonl / "p0.png")
    (jsonl / "metadata.jsonl").write_bytes('{"file_name": "p0.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    skipped = Skipped()
    records, _ = list_sources(_plain_config(folder, jsonl), skipped)
    assert [r.key for r in records] == ["000/img00.png", "000/img03.png"] and records[1].caption == "a blue cup"
    assert skipped.items == [
        ("caption file not UTF-8", str(folder / "img01.txt"),
         "byte 0xe9 at offset 6 is not UTF-8 (Latin-1 or Windows-1252?); save it as UTF-8"),
        ("caption file not UTF-8", str(folder / "img02.txt"),
         "UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
        ("metadata.jsonl line not UTF-8", f"{jsonl / 'metadata.jsonl'}:1",
         "byte 0xe9 at offset 36 is not UTF-8 (Latin-1 or Windows-1252?); save it as UTF-8")]
    with caplog.at_level(logging.WARNING, logger="ella"):
        skipped.report()
    assert "skipped 2 item(s): caption file not UTF-8: " in caplog.text and "no caption" not in caplog.text


# -- skipped.txt --------------------------------------------------------------------------------------------------


def test_skipped_txt_lists_every_item_once_and_the_log_a_few(tmp_path, sd15_base, tiny_t5_dir, caplog):
    folder = make_caption_folder(tmp_path / "data", count=12)
    for i in range(5):
        (folder / f"img{i:02d}.txt").unlink()
    (folder / "img05.txt").write_bytes(b"\xff caption")
    (folder / "img06.txt").write_text("")
    (folder / "img07.png").write_bytes(b"broken")
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=folder,
                        output=tmp_path / "out", train={"steps": 1, "cache": str(tmp_path / "cache")})
    expected = [f"no caption file (.txt)\t{folder / f'img{i:02d}.png'}" for i in range(5)] + [
        f"caption file not UTF-8\t{folder / 'img05.txt'}\tbyte 0xff at offset 0 is not UTF-8 (Latin-1 or "
        "Windows-1252?); save it as UTF-8",
        f"{EMPTY_CAPTION}\t{folder / 'img06.txt'}",
        f"unreadable image\t{folder / 'img07.png'}\tUnidentifiedImageError: cannot identify image file 'img07.png'"]
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert main(["cache", "--config", str(path)]) == 0
    assert _skipped_lines(tmp_path / "cache") == expected
    assert f"the full list of the 8 skipped item(s) is in {tmp_path / 'cache' / 'skipped.txt'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ella"):
        assert main(["train", "--config", str(path)]) == 0  # from the cache: its list is pointed at
    assert f"the cache left out 8 item(s) when it was made; they are listed in {tmp_path / 'cache'}" in caplog.text
    caplog.clear()
    config = _config(tmp_path / "fly", folder, sd15_base, tiny_t5_dir, train={"steps": 1})
    with caplog.at_level(logging.WARNING, logger="ella"):
        train(config)  # on the fly: the list goes to the run's output folder
    assert _skipped_lines(tmp_path / "fly" / "out") == expected
    no_caption = next(r.getMessage() for r in caplog.records if "no caption file" in r.getMessage())
    assert no_caption.startswith("ELLA train: skipped 5 item(s): no caption file (.txt): ")
    assert no_caption.count(str(folder)) == 3 and no_caption.endswith(" and 2 more")
    assert f"the full list of the 8 skipped item(s) is in {tmp_path / 'fly' / 'out' / 'skipped.txt'}" in caplog.text
    shutil.rmtree(folder)
    make_caption_folder(folder, count=4)
    train(_config(tmp_path / "fly", folder, sd15_base, tiny_t5_dir, train={"steps": 2}), resume="latest")
    assert not (tmp_path / "fly" / "out" / "skipped.txt").exists()  # nothing skipped now: the old list is gone


# -- the cache notices changed data -------------------------------------------------------------------------------


def test_the_cache_notices_added_removed_and_changed_files(tmp_path, sd15_base, tiny_t5_dir):
    folder = make_caption_folder(tmp_path / "txt", count=4)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    rows = [{"file_name": f"p{i}.png", "text": CAPTIONS[i]} for i in range(2)]
    for i in range(2):
        make_image(i).save(jsonl / f"p{i}.png")
    (jsonl / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=[folder, jsonl],
                        output=tmp_path / "out", train={"steps": 1, "cache": str(cache)})
    assert main(["cache", "--config", str(path)]) == 0
    from ella_ext.train.config import load_config

    config = load_config(path)
    dtype = json.loads((cache / "manifest.json").read_text())["fingerprint"]["model.feature_dtype"]
    CacheReader(cache, config, dtype)  # unchanged: accepted

    def refused(*expected):
        with pytest.raises(CacheError) as refusal:
            CacheReader(cache, config, dtype)
        message = str(refusal.value)
        assert "is out of date: the data changed since it was made" in message
        assert f"cache --config {path} --force" in message and "point [train] cache at a new folder" in message
        for text in expected:
            assert text in message, message

    make_image(5).save(folder / "img08.png")
    (folder / "img08.txt").write_text("a new image")
    refused(f"source 1 ({str(folder)!r}): 1 image(s) added: img08.png")
    (folder / "img08.png").unlink()
    (folder / "img08.txt").unlink()
    CacheReader(cache, config, dtype)

    os.rename(folder / "img01.png", tmp_path / "img01.png")
    refused("1 image(s) removed: img01.png")
    os.rename(tmp_path / "img01.png", folder / "img01.png")

    original = (folder / "img02.txt").read_text()
    (folder / "img02.txt").write_text("an edited caption")
    refused("1 caption file(s) edited, added or removed: img02.txt")
    (folder / "img02.txt").write_text(original)

    stat = os.stat(folder / "img03.png")
    os.utime(folder / "img03.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refused("1 image(s) changed (size or modification time): img03.png")
    os.utime(folder / "img03.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    rows[1]["text"] = "an edited line"
    (jsonl / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(f"source 2 ({str(jsonl)!r}): 1 metadata.jsonl caption(s) edited, for: p1.png")
    assert "source 1" not in str(pytest.raises(CacheError, CacheReader, cache, config, dtype).value)

    assert main(["cache", "--config", str(path), "--force"]) == 0  # the advised command makes it again
    assert len(CacheReader(cache, config, dtype).items) == 6


# -- folders mixed with shards ------------------------------------------------------------------------------------


def test_mixed_folders_and_shards_are_cached_then_trained_from_the_cache(tmp_path, sd15_base, tiny_t5_dir):
    folder = make_caption_folder(tmp_path / "txt", count=4)
    for s in range(2):
        _shard(tmp_path / "shards" / f"shard-{s}.tar",
               [(f"k{i}", _png_bytes(4 + 2 * s + i), CAPTIONS[4 + 2 * s + i].encode()) for i in range(2)])
    on_the_fly = _config(tmp_path / "fly", [folder, tmp_path / "shards"], sd15_base, tiny_t5_dir)
    for refuse in (lambda: preflight(on_the_fly), lambda: train(on_the_fly)):
        with pytest.raises(DataError, match=r"mix image folders .* and webdataset shards") as refusal:
            refuse()
        assert "Set [train] cache" in str(refusal.value)
        assert f"python -m ella_ext.train cache --config {on_the_fly.path}`" in str(refusal.value)

    # the advice: run `cache` (it writes one cache), then train from it
    path = write_config(tmp_path / "run.toml", base=sd15_base, llm=tiny_t5_dir, images=[folder, tmp_path / "shards"],
                        output=tmp_path / "out", train={"steps": 2, "cache": str(tmp_path / "cache")})
    assert main(["cache", "--config", str(path)]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["items"] == 8 and [s["kind"] for s in manifest["data"]] == ["captions", "shards"]
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "out" / "connector.safetensors").is_file()
    # the other advice: with [train] cache set, `train` makes the cache at the start
    made_by_train = _config(tmp_path / "set", [folder, tmp_path / "shards"], sd15_base, tiny_t5_dir,
                            train={"steps": 2, "cache": str(tmp_path / "cache2")})
    preflight(made_by_train)
    assert train(made_by_train).connector.is_file()
    keys = [item.record.key for item in CacheReader(tmp_path / "cache2", made_by_train, manifest["fingerprint"][
        "model.feature_dtype"]).items]
    assert keys == [f"000/img{i:02d}.png" for i in range(4)] + [f"001/shard-{s}.tar/k{i}" for s in range(2)
                                                                 for i in range(2)]
