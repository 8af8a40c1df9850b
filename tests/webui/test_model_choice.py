"""What the accordion's status line, the model listing and the info text say about the chosen models: what they
still need, a folder the loader refuses, and a connector trained with another LLM than the one chosen."""

from __future__ import annotations

import pytest

from ella_ext import options
from ella_ext.connector_file import META_LLM, load_connector, save_connector

from .conftest import CONNECTOR, ENCODER, ella_args


@pytest.fixture
def folder(host, models_dir, tmp_path):
    """A models folder of its own (Settings > ELLA > models folder): the tiny models, a connector that names the
    LLM it was trained with, one that names another LLM, and an LLM folder holding only a pickle."""
    from modules import shared

    source = models_dir / "ELLA"
    ella = tmp_path / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    (ella / f"{CONNECTOR}.safetensors").symlink_to(source / f"{CONNECTOR}.safetensors")
    (ella / "text_encoders" / ENCODER).symlink_to(source / "text_encoders" / ENCODER)
    tiny = load_connector(source / f"{CONNECTOR}.safetensors")
    save_connector(tiny, ella / "trained-here.safetensors", metadata={META_LLM: ENCODER})
    save_connector(tiny, ella / "trained-elsewhere.safetensors", metadata={META_LLM: "TinyLlama/TinyLlama-1.1B"})
    pickled = ella / "text_encoders" / "pickled"
    pickled.mkdir()
    for name in ("config.json", "spiece.model"):
        (pickled / name).symlink_to(source / "text_encoders" / ENCODER / name)
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    shared.opts.ella_models_dir = str(ella)
    yield ella
    shared.opts.ella_models_dir = ""
    shared.opts.ella_allow_download = True


def status(connector, text_encoder):
    from ella_ext.webui import ui

    return ui._status_html(connector, text_encoder)


def test_status_says_nothing_when_the_chosen_models_are_ready(folder):
    assert status(CONNECTOR, ENCODER) == ""
    assert status("trained-here", ENCODER) == ""


def test_status_says_what_the_official_models_need(folder):
    from modules import shared

    line = status(options.OFFICIAL_CONNECTOR_NAME, options.OFFICIAL_TEXT_ENCODER_NAME)
    assert "ella-sd1.5-tsc-t5xl (134 MB) will be downloaded to" in line and "at the first generation" in line
    assert "flan-T5-XL&#x27;s encoder" in line or "flan-T5-XL's encoder" in line
    assert status(CONNECTOR, options.OFFICIAL_TEXT_ENCODER_NAME).count("will be downloaded") == 1
    shared.opts.ella_allow_download = False
    line = status(options.OFFICIAL_CONNECTOR_NAME, options.OFFICIAL_TEXT_ENCODER_NAME)
    assert "downloads are off" in line and "huggingface.co/QQGYLab/ELLA/resolve/main/ella-sd1.5-tsc-t5xl" in line
    assert "QQGYLab/ELLA/tree/main/models--google--flan-t5-xl--text_encoder" in line
    assert str(folder / "text_encoders" / options.OFFICIAL_TEXT_ENCODER_NAME) in line
    assert "google/flan-t5-xl&#x27;s text_encoder folder" not in line  # the old hint pointed at the wrong repository


def test_status_says_why_a_folder_cannot_be_used(folder):
    assert "The LLM pickled cannot be used" in status(CONNECTOR, "pickled")
    assert "only pickled weights (pytorch_model.bin)" in status(CONNECTOR, "pickled")


def test_status_names_the_llm_a_connector_was_trained_with(folder):
    line = status("trained-elsewhere", ENCODER)
    assert f"was trained with the LLM TinyLlama/TinyLlama-1.1B, not {ENCODER}" in line


def test_the_listing_shows_each_connectors_llm_and_unusable_folders(folder):
    from ella_ext.webui import api

    listing = api.models_listing()
    llms = {c["name"]: c["llm"] for c in listing["connectors"]}
    assert llms == {CONNECTOR: "", options.OFFICIAL_CONNECTOR_NAME: "", "trained-elsewhere": "TinyLlama/TinyLlama-1.1B",
                    "trained-here": ENCODER}
    pickled = next(e for e in listing["text_encoders"] if e["name"] == "pickled")
    assert pickled["available"] is False and "only pickled weights" in pickled["problem"]


@pytest.mark.parametrize(("trained", "chosen", "same"), [
    ("tiny-t5", "tiny-t5", True),
    ("google/flan-t5-xl", "models--google--flan-t5-xl--text_encoder", True),  # hub id vs the official folder
    ("flan-t5-xl", "google/flan-t5-xl", True),
    ("TinyLlama/TinyLlama-1.1B", "tiny-t5", False),
])
def test_llm_names_compare_by_their_last_part(trained, chosen, same):
    from ella_ext.webui import loading

    assert (loading._llm_key(trained) == loading._llm_key(chosen)) is same


def test_a_generation_with_another_llm_warns_and_still_runs(host, folder):
    p, processed = host.run("a cube", steps=2, args=ella_args(connector="trained-elsewhere"))
    info = processed.infotexts[0]
    assert len(host.recorded.calls) == 2 and "ELLA error" not in info
    assert "ELLA warning: the connector trained-elsewhere was trained with the LLM TinyLlama/TinyLlama-1.1B" in info
    _, processed = host.run("a cube", steps=2, args=ella_args(connector="trained-here"))
    assert "ELLA warning" not in processed.infotexts[0]


def test_a_prompt_the_llm_truncates_is_reported_in_the_info_text(host, caplog):
    long_prompt = " ".join(["a red cube on a blue sphere"] * 12)
    _, processed = host.run(long_prompt, steps=1, args=ella_args(token_length="Fixed", max_length=16))
    info = processed.infotexts[0]
    assert "ELLA warning: a prompt has" in info and "more than the fixed token length (16)" in info
    assert "read only its first 16" in caplog.text
    _, processed = host.run("a cube", steps=1, args=ella_args(token_length="Fixed", max_length=16))
    assert "ELLA warning" not in processed.infotexts[0], "the warning belongs to the batch that had the long prompt"


def test_a_prompt_over_the_llms_limit_in_flexible_mode_is_reported(host):
    _, processed = host.run(" ".join(["cube"] * 600), steps=1)  # flexible: the tiny T5 reads 512 tokens at most
    assert f"more than the limit of {ENCODER} (512): the LLM read only its first 512" in processed.infotexts[0]


def test_an_error_in_the_info_text_names_no_server_folder(host, folder):
    """The image's parameters travel with the image: a load error there says which file, not where it lives."""
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    _, processed = host.run("a cube", steps=1, args=ella_args(connector="broken"))
    info = processed.infotexts[0]
    assert "ELLA error:" in info and "ELLA/broken.safetensors" in info
    assert str(folder) not in info and str(folder.parent) not in info


@pytest.mark.parametrize(("message", "shown"), [
    ("cannot read '/srv/webui/models/ELLA/x.safetensors'.", "cannot read 'ELLA/x.safetensors'."),
    (r"C:\webui\models\ELLA\x.safetensors is corrupt", r"ELLA\x.safetensors is corrupt"),
    ("~/webui/models/ELLA/text_encoders/t5: no config", "text_encoders/t5: no config"),
    ("get it from https://huggingface.co/QQGYLab/ELLA into models/ELLA", None),  # a URL, a relative path: kept
    ("one part: /etc", None),
])
def test_without_paths(message, shown):
    from ella_ext.webui.infotext import without_paths

    assert without_paths(message) == (message if shown is None else shown)

