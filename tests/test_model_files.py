"""Model folders, listing and first-use download (against a local fake hub).

Runs offline: every download goes to ``tests/fakehub.py`` on 127.0.0.1, and the hub client's cache, home and offline
switch are pointed at tmp_path for each test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for fakehub, however pytest is invoked

import huggingface_hub  # noqa: E402
from fakehub import FakeHub, closed_port_url  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402

from ella_ext import model_files  # noqa: E402
from ella_ext.errors import ELLAError, ModelNotFoundError  # noqa: E402
from ella_ext.model_files import (  # noqa: E402
    OFFICIAL_CONNECTOR,
    OFFICIAL_REPO,
    OFFICIAL_TEXT_ENCODER,
    ModelPaths,
    ensure_connector,
    ensure_text_encoder,
    list_connectors,
    list_text_encoders,
)

CONNECTOR_BYTES = bytes(range(256)) * 2  # 512 bytes standing in for the 134 MB connector
ENCODER = {
    "config.json": b'{"model_type": "t5", "d_model": 8}',
    "model.safetensors": b"fake-t5-weights-" * 16,
    "special_tokens_map.json": b"{}",
    "spiece.model": b"fake-sentencepiece",
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b"{}",
}
OFFICIAL_FILES = {
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "README.md": b"# ELLA\n",
    OFFICIAL_CONNECTOR: CONNECTOR_BYTES,
    **{f"{OFFICIAL_TEXT_ENCODER}/{name}": data for name, data in ENCODER.items()},
    f"{OFFICIAL_TEXT_ENCODER}/pytorch_model.bin": b"a pickle that must never be fetched",
}
OTHER_REPO = "someone/tiny-llm"
OTHER_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"llm-weights",
    "tokenizer.json": b"{}",
    "pytorch_model.bin": b"pickle",
    "original/consolidated.safetensors": b"a second copy in a subfolder",
}
HUB_VERSION = huggingface_hub.__version__


@pytest.fixture(autouse=True)
def hub_sandbox(tmp_path, monkeypatch):
    """Point the hub client's home, cache and offline switch at this test (the client reads them at import)."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_ENABLE_HF_TRANSFER", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER", False, raising=False)
    return home


@pytest.fixture
def paths(tmp_path) -> ModelPaths:
    return ModelPaths.from_models_root(tmp_path / "models", hub_cache=tmp_path / "hf-home" / "hub")


@pytest.fixture
def hub():
    with FakeHub({OFFICIAL_REPO: OFFICIAL_FILES, OTHER_REPO: OTHER_FILES}) as fake:
        yield fake
    assert not fake.overflowed, "the hub client looped on the fake hub"


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """The client waits 1-8 s between retries on 5xx and connection errors; tests need not wait."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_encoder(folder: Path) -> Path:
    for name, data in ENCODER.items():
        write(folder / name, data)
    return folder


def incomplete_path(local_dir: Path, filename: str, etag: str) -> Path:
    """Where this hub client keeps a partial download into ``local_dir`` (its own helper, so the name is its own)."""
    from huggingface_hub._local_folder import get_local_download_paths

    return get_local_download_paths(local_dir, filename).incomplete_path(etag)


# --------------------------------------------------------------------------------------------------------------------
# Folders and listing


def test_paths_from_models_root(tmp_path):
    paths = ModelPaths.from_models_root(str(tmp_path))
    assert paths.connectors == tmp_path / "ELLA"
    assert paths.text_encoders == tmp_path / "ELLA" / "text_encoders"
    assert paths.hub_cache is None
    explicit = ModelPaths(str(tmp_path / "c"), str(tmp_path / "t"), str(tmp_path / "h"))
    assert (explicit.connectors, explicit.text_encoders, explicit.hub_cache) == (
        tmp_path / "c",
        tmp_path / "t",
        tmp_path / "h",
    )


def test_list_connectors_sorted_with_official_marked(paths):
    listing = list_connectors(paths)  # nothing on disk: the official one is offered for download
    assert list(listing) == ["ella-sd1.5-tsc-t5xl"]
    assert listing["ella-sd1.5-tsc-t5xl"].official and not listing["ella-sd1.5-tsc-t5xl"].available

    write(paths.connectors / "Zeta.safetensors")
    write(paths.connectors / "alpha.safetensors")
    write(paths.connectors / OFFICIAL_CONNECTOR)
    write(paths.connectors / "notes.txt")
    write(paths.connectors / ".hidden.safetensors")
    write(paths.text_encoders / "enc" / "model.safetensors")  # encoder weights are not connectors
    listing = list_connectors(paths)
    assert list(listing) == ["alpha", "ella-sd1.5-tsc-t5xl", "Zeta"]
    assert [entry.official for entry in listing.values()] == [False, True, False]
    assert all(entry.available for entry in listing.values())
    assert listing["alpha"].path == paths.connectors / "alpha.safetensors"


def test_list_text_encoders_local_folders_and_official(paths):
    listing = list_text_encoders(paths)
    official = listing[OFFICIAL_TEXT_ENCODER]
    assert list(listing) == [OFFICIAL_TEXT_ENCODER]
    assert official.official and not official.available
    assert official.path == paths.text_encoders / OFFICIAL_TEXT_ENCODER

    write_encoder(paths.text_encoders / "TinyLlama")
    write(paths.text_encoders / "no-config" / "model.safetensors")
    write(paths.text_encoders / ".cache" / "huggingface" / "config.json")
    write_encoder(paths.text_encoders / OFFICIAL_TEXT_ENCODER)
    pickled = write_encoder(paths.text_encoders / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    listing = list_text_encoders(paths)
    assert list(listing) == [OFFICIAL_TEXT_ENCODER, "pickled", "TinyLlama"]
    assert listing[OFFICIAL_TEXT_ENCODER].available and listing[OFFICIAL_TEXT_ENCODER].official
    assert listing["TinyLlama"].available and not listing["TinyLlama"].official and not listing["TinyLlama"].problem
    assert not listing["pickled"].available
    assert "only pickled weights (pytorch_model.bin)" in listing["pickled"].problem


def test_official_text_encoder_found_in_hub_cache(paths):
    """A copy fetched by other tools (``from_pretrained("QQGYLab/ELLA", subfolder=...)``) is used as is."""
    commit = "c" * 40
    repo_cache = paths.hub_cache / "models--QQGYLab--ELLA"
    write(repo_cache / "refs" / "main", commit.encode())
    snapshot = write_encoder(repo_cache / "snapshots" / commit / OFFICIAL_TEXT_ENCODER)
    entry = list_text_encoders(paths)[OFFICIAL_TEXT_ENCODER]
    assert entry.available and entry.path == snapshot
    assert ensure_text_encoder(paths, offline=True) == snapshot


def test_incomplete_official_folder_is_not_available(paths):
    folder = write_encoder(paths.text_encoders / OFFICIAL_TEXT_ENCODER)
    (folder / "model.safetensors").unlink()  # e.g. an interrupted download
    assert not list_text_encoders(paths)[OFFICIAL_TEXT_ENCODER].available
    with pytest.raises(ModelNotFoundError):
        ensure_text_encoder(paths, offline=True)


def test_sharded_weights_must_all_be_present(paths):
    folder = write_encoder(paths.text_encoders / OFFICIAL_TEXT_ENCODER)
    (folder / "model.safetensors").unlink()
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    write(folder / "model.safetensors.index.json", index)
    write(folder / "model-00001-of-00002.safetensors")
    assert not list_text_encoders(paths)[OFFICIAL_TEXT_ENCODER].available
    write(folder / "model-00002-of-00002.safetensors")
    assert list_text_encoders(paths)[OFFICIAL_TEXT_ENCODER].available


# --------------------------------------------------------------------------------------------------------------------
# Names that resolve without the hub


def test_local_names_and_paths_resolve_without_network(paths, tmp_path):
    mine = write(paths.connectors / "mine.safetensors")
    assert ensure_connector(paths, "mine", endpoint=closed_port_url()) == mine
    assert ensure_connector(paths, "mine.safetensors", endpoint=closed_port_url()) == mine
    elsewhere = write(tmp_path / "elsewhere" / "x.safetensors")
    assert ensure_connector(paths, str(elsewhere)) == elsewhere
    llm = write(paths.text_encoders / "llm" / "config.json", b"{}").parent
    assert ensure_text_encoder(paths, "llm", endpoint=closed_port_url()) == llm
    assert ensure_text_encoder(paths, str(llm)) == llm


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda p: ensure_connector(p, "missing"), "missing.safetensors"),
        (lambda p: ensure_connector(p, "/nowhere/x.safetensors"), "x.safetensors"),
        (lambda p: ensure_text_encoder(p, "missing"), "missing"),
        (lambda p: ensure_text_encoder(p, "/nowhere/enc"), "enc"),
        (lambda p: ensure_text_encoder(p, "not a/repo id!"), "repo id"),
    ],
)
def test_unknown_names_say_where_to_put_the_model(paths, call, needle):
    with pytest.raises(ModelNotFoundError) as info:
        call(paths)
    assert needle in str(info.value)
    assert isinstance(info.value, ELLAError)


# --------------------------------------------------------------------------------------------------------------------
# First-use download


def test_connector_download_then_no_network(paths, hub):
    path = ensure_connector(paths, endpoint=hub.url)
    assert path == paths.connectors / OFFICIAL_CONNECTOR
    assert path.read_bytes() == CONNECTOR_BYTES
    assert hub.seen("GET", f"/resolve/main/{OFFICIAL_CONNECTOR}")
    assert not hub.seen(contains="text_encoder"), "only the connector is fetched"
    assert list_connectors(paths)["ella-sd1.5-tsc-t5xl"].available

    before = len(hub.requests)
    assert ensure_connector(paths, endpoint=hub.url) == path
    assert ensure_connector(paths, "ella-sd1.5-tsc-t5xl", endpoint=hub.url) == path
    assert len(hub.requests) == before, "a file on disk must not cost a network call"


def test_text_encoder_download_then_no_network(paths, hub):
    folder = ensure_text_encoder(paths, endpoint=hub.url)
    assert folder == paths.text_encoders / OFFICIAL_TEXT_ENCODER
    for name, data in ENCODER.items():
        assert (folder / name).read_bytes() == data
    assert not (folder / "pytorch_model.bin").exists(), "pickles are never downloaded"
    assert not (paths.text_encoders / OFFICIAL_CONNECTOR).exists()
    assert not hub.seen("GET", f"/resolve/main/{OFFICIAL_CONNECTOR}")
    assert not hub.seen(contains="pytorch_model.bin")
    assert list_text_encoders(paths)[OFFICIAL_TEXT_ENCODER].available

    before = len(hub.requests)
    assert ensure_text_encoder(paths, endpoint=hub.url) == folder
    assert ensure_text_encoder(paths, OFFICIAL_TEXT_ENCODER, endpoint=hub.url) == folder
    assert len(hub.requests) == before


def test_hub_repo_id_text_encoder_goes_to_hub_cache(paths, hub):
    folder = ensure_text_encoder(paths, OTHER_REPO, endpoint=hub.url)
    assert paths.hub_cache in folder.parents
    assert (folder / "model.safetensors").read_bytes() == OTHER_FILES["model.safetensors"]
    assert not (folder / "pytorch_model.bin").exists()
    assert not (folder / "original").exists(), "subfolders (other variants) are not fetched"

    before = len(hub.requests)
    assert ensure_text_encoder(paths, OTHER_REPO, endpoint=hub.url) == folder
    assert ensure_text_encoder(paths, OTHER_REPO, offline=True) == folder
    assert len(hub.requests) == before


def test_hub_repo_without_safetensors_is_refused(paths):
    pickled = {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin": b"p"}
    with FakeHub({"someone/pickled": pickled}) as fake, pytest.raises(ModelNotFoundError, match="safetensors"):
        ensure_text_encoder(paths, "someone/pickled", endpoint=fake.url)


# --------------------------------------------------------------------------------------------------------------------
# Offline mode


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_uses_files_on_disk(paths, hub, monkeypatch, how):
    offline = True if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connector = write(paths.connectors / OFFICIAL_CONNECTOR, CONNECTOR_BYTES)
    encoder = write_encoder(paths.text_encoders / OFFICIAL_TEXT_ENCODER)
    assert ensure_connector(paths, offline=offline, endpoint=hub.url) == connector
    assert ensure_text_encoder(paths, offline=offline, endpoint=hub.url) == encoder
    assert hub.requests == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_missing_files_say_what_to_put_where(paths, hub, monkeypatch, how):
    offline = True if how == "argument" else None
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        ensure_connector(paths, offline=offline, endpoint=hub.url)
    message = str(info.value)
    assert str(paths.connectors / OFFICIAL_CONNECTOR) in message
    assert f"{hub.url}/QQGYLab/ELLA/resolve/main/{OFFICIAL_CONNECTOR}" in message

    with pytest.raises(ModelNotFoundError) as info:
        ensure_text_encoder(paths, offline=offline, endpoint=hub.url)
    message = str(info.value)
    assert str(paths.text_encoders / OFFICIAL_TEXT_ENCODER) in message
    assert f"{hub.url}/QQGYLab/ELLA/tree/main/{OFFICIAL_TEXT_ENCODER}" in message
    assert "spiece.model" in message and "model.safetensors" in message

    with pytest.raises(ModelNotFoundError, match=OTHER_REPO):
        ensure_text_encoder(paths, OTHER_REPO, offline=offline, endpoint=hub.url)
    assert hub.requests == [], "offline mode makes no network call"


def test_default_urls_point_at_the_official_repo():
    assert model_files.official_connector_url() == (
        "https://huggingface.co/QQGYLab/ELLA/resolve/main/ella-sd1.5-tsc-t5xl.safetensors"
    )
    assert model_files.official_text_encoder_url("https://mirror.example/") == (
        "https://mirror.example/QQGYLab/ELLA/tree/main/models--google--flan-t5-xl--text_encoder"
    )


# --------------------------------------------------------------------------------------------------------------------
# Network failures


@pytest.mark.usefixtures("no_backoff_sleep")
def test_server_error_becomes_model_not_found(paths, hub):
    hub.fail_status = 500
    with pytest.raises(ModelNotFoundError) as info:
        ensure_connector(paths, endpoint=hub.url)
    message = str(info.value)
    assert hub.url in message and str(paths.connectors / OFFICIAL_CONNECTOR) in message
    with pytest.raises(ModelNotFoundError, match="text encoder"):
        ensure_text_encoder(paths, endpoint=hub.url)
    with pytest.raises(ModelNotFoundError, match=OTHER_REPO):
        ensure_text_encoder(paths, OTHER_REPO, endpoint=hub.url)
    assert 0 < len(hub.requests) < 30, "the client's retries are bounded"
    assert not (paths.connectors / OFFICIAL_CONNECTOR).exists()


@pytest.mark.usefixtures("no_backoff_sleep")
def test_unreachable_hub_becomes_model_not_found(paths):
    endpoint = closed_port_url()
    with pytest.raises(ModelNotFoundError, match="internet connection"):
        ensure_connector(paths, endpoint=endpoint)
    with pytest.raises(ModelNotFoundError, match="text encoder"):
        ensure_text_encoder(paths, endpoint=endpoint)


@pytest.mark.usefixtures("no_backoff_sleep")
def test_unreachable_hub_with_other_encoders_on_disk(paths):
    """The client returns a non-empty local_dir unchecked when the hub is unreachable: we still notice."""
    write(paths.text_encoders / "TinyLlama" / "config.json", b"{}")
    with pytest.raises(ModelNotFoundError, match="flan-T5-XL"):
        ensure_text_encoder(paths, endpoint=closed_port_url())


# --------------------------------------------------------------------------------------------------------------------
# Partial downloads


@pytest.mark.usefixtures("no_backoff_sleep")
def test_cut_download_continues_with_a_range_request(paths, hub, monkeypatch):
    """A connection cut mid-file is continued from where it stopped, not restarted.

    huggingface_hub 0.25 raises on the cut and keeps ``<local_dir>/.cache/huggingface/download/…incomplete``; the next
    call sends ``Range: bytes=N-``.  huggingface_hub 2.x retries inside the same call with the same Range request.
    Both keep whole read chunks only (10 MB by default), so the test reads in 64-byte chunks and cuts on a boundary.
    """
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 64)
    cut = 192
    hub.cut_after[f"{OFFICIAL_REPO}/{OFFICIAL_CONNECTOR}"] = cut
    try:
        path = ensure_connector(paths, endpoint=hub.url)
    except ModelNotFoundError:  # the older client surfaces the cut; the partial file stays for the next call
        path = ensure_connector(paths, endpoint=hub.url)
    assert path.read_bytes() == CONNECTOR_BYTES
    gets = hub.seen("GET", f"/resolve/main/{OFFICIAL_CONNECTOR}")
    assert [get.headers.get("range") for get in gets] == [None, f"bytes={cut}-"]
    assert [get.status for get in gets] == [200, 206]
    assert sum(get.body_bytes for get in gets) == len(CONNECTOR_BYTES), "no byte is downloaded twice"


def test_partial_file_left_by_an_earlier_run(paths, hub):
    """What the client does with a ``.incomplete`` file an earlier process left in the download folder.

    0.25.x continues it with a Range request.  2.x downloads into a fresh per-process temporary file and ignores it
    (huggingface_hub PR #4306: "resuming a failed download is no longer possible"), so the file is fetched whole.
    """
    etag = hub.repo(OFFICIAL_REPO).etag(OFFICIAL_CONNECTOR)
    partial = write(incomplete_path(paths.connectors, OFFICIAL_CONNECTOR, etag), CONNECTOR_BYTES[:100])
    assert partial.name.endswith(".incomplete")

    path = ensure_connector(paths, endpoint=hub.url)
    assert path.read_bytes() == CONNECTOR_BYTES
    [get] = hub.seen("GET", f"/resolve/main/{OFFICIAL_CONNECTOR}")
    resumed = get.headers.get("range") == "bytes=100-"
    if resumed:
        assert get.status == 206 and get.body_bytes == len(CONNECTOR_BYTES) - 100
    else:
        assert "range" not in get.headers and get.body_bytes == len(CONNECTOR_BYTES)
    expected = {"0.25.2": True, "2.4.0": False}.get(HUB_VERSION)
    if expected is not None:
        assert resumed is expected, f"huggingface_hub {HUB_VERSION}"
