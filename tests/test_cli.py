"""``python -m ella_ext check`` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ella_ext", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_check_runs_both_models(tiny_connector_file, tiny_t5_dir):
    result = run("check", "--connector", str(tiny_connector_file), "--text-encoder", str(tiny_t5_dir),
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "context [1, 8, 32]" in out
    assert "features [1, 128, 20]" in out
    assert "non-finite values: 0" in out and "peak memory" in out
    assert out.strip().endswith("OK")


def test_check_finds_models_in_the_models_folder(tmp_path, tiny_connector_file, tiny_t5_dir):
    (tmp_path / "ELLA" / "text_encoders").mkdir(parents=True)
    (tmp_path / "ELLA" / "tiny.safetensors").symlink_to(tiny_connector_file)
    (tmp_path / "ELLA" / "text_encoders" / "tiny-t5").symlink_to(tiny_t5_dir)
    result = run("check", "--models-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr


def test_check_reports_every_model_of_the_folder_and_goes_on_after_a_bad_one(tmp_path, tiny_connector_file,
                                                                            tiny_t5_dir):
    from ella_ext.connector import Connector, ConnectorConfig
    from ella_ext.connector_file import save_connector

    from .random_weights import init_random

    ella = tmp_path / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    (ella / "a-corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (ella / "b-tiny.safetensors").symlink_to(tiny_connector_file)
    save_connector(init_random(Connector(ConnectorConfig(time_channels=8, time_embed_dim=8, width=8, layers=1,
                                                         heads=2, num_latents=2, input_dim=64))),
                   ella / "c-wide.safetensors")
    (ella / "text_encoders" / "tiny-t5").symlink_to(tiny_t5_dir)
    pickled = ella / "text_encoders" / "pickled"
    pickled.mkdir()
    for name in ("config.json", "spiece.model"):
        (pickled / name).symlink_to(tiny_t5_dir / name)
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    result = run("check", "--models-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = result.stdout.split("peak memory")[1]
    assert "connector a-corrupt: BAD: " in verdicts and "not a readable safetensors file" in verdicts
    assert "connector b-tiny: OK (with tiny-t5 in float32, tokens flexible and fixed 128)" in verdicts
    assert "connector c-wide: OK (alone: no text encoder here gives 64-wide features)" in verdicts
    assert "text encoder tiny-t5: OK" in verdicts
    assert "text encoder pickled: BAD: " in verdicts and "only pickled weights" in verdicts
    assert "text encoder models--google--flan-t5-xl--text_encoder" not in verdicts  # not on disk: nothing to check
    assert result.stdout.strip().endswith("PROBLEM: 2 of 5 models")


def test_check_without_models_says_how_to_get_them(tmp_path):
    result = run("check", "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert "huggingface.co/QQGYLab/ELLA" in result.stderr and str(tmp_path / "ELLA") in result.stderr


def test_check_reports_a_mismatch_clearly(tmp_path, tiny_t5_dir):
    from ella_ext.connector import Connector, ConnectorConfig
    from ella_ext.connector_file import save_connector

    from .random_weights import init_random

    path = tmp_path / "wide.safetensors"
    save_connector(init_random(Connector(ConnectorConfig(time_channels=8, time_embed_dim=8, width=8, layers=1,
                                                         heads=2, num_latents=2, input_dim=64))), path)
    result = run("check", "--connector", str(path), "--text-encoder", str(tiny_t5_dir), "--device", "cpu")
    assert result.returncode == 1
    assert "ERROR: " in result.stderr and "hidden size 20" in result.stderr and "64-wide" in result.stderr


def test_check_refuses_a_bad_connector_before_loading_the_llm(tmp_path, tiny_t5_dir):
    """The LLM is the slow part (flan-T5-XL: gigabytes): a connector that cannot be read fails before it loads."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    result = run("check", "--connector", str(path), "--text-encoder", str(tiny_t5_dir), "--device", "cpu")
    assert result.returncode == 1
    assert "ERROR: " in result.stderr and "broken.safetensors" in result.stderr
    assert result.stdout == "", "nothing was loaded before the connector was read"


# -- a connector checked as it was trained (its file's metadata) ------------------------------------------------------

LLAMA_LAYER_2 = {"ella.llm": "tiny-llama", "ella.llm_layer": "-2", "ella.token_length": "fixed",
                 "ella.max_length": "16"}


def _models_folder(root, llms: dict, connectors: dict):
    """``root/ELLA`` with the LLM folders ``llms`` (name -> folder) and a tiny connector saved under each metadata of
    ``connectors`` (name -> metadata)."""
    from ella_ext.connector_file import save_connector

    from .conftest import make_connector

    ella = root / "ELLA"
    (ella / "text_encoders").mkdir(parents=True)
    for name, folder in llms.items():
        (ella / "text_encoders" / name).symlink_to(folder)
    for name, metadata in connectors.items():
        save_connector(make_connector(), ella / f"{name}.safetensors", metadata=metadata)
    return root


def _check_folder(monkeypatch, root):
    """``check --models-dir`` in this process: (its printed lines, {connector: {label: features}} it was run on)."""
    from ella_ext import cli

    seen: dict[str, dict] = {}
    original = cli.check_connector

    def recording(path, encodings, *args, **kwargs):
        seen[Path(path).stem] = {label: features for label, features, _ in encodings}
        return original(path, encodings, *args, **kwargs)

    monkeypatch.setattr(cli, "check_connector", recording)
    lines: list[str] = []
    code = cli.check_folder(root, "cpu", None, out=lines.append)
    return code, "\n".join(lines), seen


def _llama_hidden(folder, layer: int, fixed: int | None):
    """The sample prompt's hidden state ``layer`` of the tiny Llama, by transformers itself (flexible: the model's
    64-token limit)."""
    from transformers import AutoModel, AutoTokenizer

    from ella_ext.cli import SAMPLE_PROMPT

    # sentencepiece's own ids on every transformers (4.30's fast one gives others)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    length = {"padding": "max_length", "max_length": fixed} if fixed else {"max_length": 64}
    tokens = tokenizer([SAMPLE_PROMPT], return_tensors="pt", truncation=True, **length)
    model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                     output_hidden_states=True).hidden_states[layer]


def test_check_pairs_each_connector_with_the_llm_its_file_names_at_its_layer_and_length(
        tmp_path, monkeypatch, tiny_t5_dir, tiny_llama_dir):
    """Two LLMs of the same width: each connector gets the one its file names (or, that one absent, one of the same
    kind), at the layer and the token length it was trained with."""
    root = _models_folder(tmp_path, {"tiny-t5": tiny_t5_dir, "tiny-llama": tiny_llama_dir}, {
        "t5-named": {"ella.llm": "tiny-t5"},
        "llama-layer-2": LLAMA_LAYER_2,
        "flan-absent": {"ella.llm": "google/flan-t5-xl"},
        "llama-absent": {"ella.llm": "TinyLlama/TinyLlama-1.1B", "ella.llm_layer": "-1",
                         "ella.token_length": "flexible", "ella.max_length": "64"},
    })
    code, out, seen = _check_folder(monkeypatch, root)
    assert code == 0, out
    verdicts = out.split("peak memory")[1]
    assert ("connector t5-named: OK (with tiny-t5 in float32, tokens flexible and fixed 128 (the LLM its file "
            "names))") in verdicts
    assert ("connector llama-layer-2: OK (with tiny-llama at layer -2 in float32, tokens flexible and fixed 16 (the "
            "LLM its file names))") in verdicts
    assert ("connector flan-absent: OK (with tiny-t5 in float32, tokens flexible and fixed 128 (its LLM "
            "google/flan-t5-xl is not here; a T5-family LLM of its width))") in verdicts
    assert ("connector llama-absent: OK (with tiny-llama at layer -1 in float32, tokens flexible (its LLM "
            "TinyLlama/TinyLlama-1.1B is not here; a decoder-only LLM of its width))") in verdicts
    assert "trained    llama-layer-2: LLM tiny-llama, layer -2, tokens fixed 16" in out
    assert set(seen["llama-layer-2"]) == {"flexible", "fixed 16"} and set(seen["llama-absent"]) == {"flexible"}
    for label, fixed in (("flexible", None), ("fixed 16", 16)):
        expected = _llama_hidden(tiny_llama_dir, -2, fixed)
        torch.testing.assert_close(seen["llama-layer-2"][label], expected, atol=1e-5, rtol=1e-5)
        assert (seen["llama-layer-2"][label] - _llama_hidden(tiny_llama_dir, -1, fixed)).abs().max() > 1e-2
    assert seen["t5-named"]["flexible"].shape[-1] == 20


def test_check_never_pairs_a_connector_with_an_llm_of_another_kind(tmp_path, monkeypatch, tiny_t5_dir,
                                                                   tiny_llama_dir):
    """A connector trained with a T5 is not run on a decoder-only LLM of its width (nor the other way round): when
    no LLM of its kind is there, it runs alone on stand-in features, and the check says why."""
    only_llama = _models_folder(tmp_path / "a", {"tiny-llama": tiny_llama_dir},
                                {"flan-absent": {"ella.llm": "google/flan-t5-xl"}})
    code, out, seen = _check_folder(monkeypatch, only_llama)
    assert code == 0, out
    assert ("connector flan-absent: OK (alone: its LLM google/flan-t5-xl is not here, and no T5-family LLM here "
            "gives 20-wide features)") in out
    assert set(seen["flan-absent"]) == {"stand-in features"}
    only_t5 = _models_folder(tmp_path / "b", {"tiny-t5": tiny_t5_dir}, {"llama-layer-2": LLAMA_LAYER_2})
    code, out, seen = _check_folder(monkeypatch, only_t5)
    assert code == 0, out
    assert ("connector llama-layer-2: OK (alone: its LLM tiny-llama is not here, and no decoder-only LLM here gives "
            "20-wide features)") in out


def test_check_of_a_pair_uses_the_connectors_layer_and_token_length(tmp_path, tiny_llama_dir):
    from ella_ext.connector_file import save_connector

    from .conftest import make_connector

    path = tmp_path / "llama-layer-2.safetensors"
    save_connector(make_connector(), path, metadata=LLAMA_LAYER_2)
    result = run("check", "--connector", str(path), "--text-encoder", str(tiny_llama_dir), "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "layer -2 of 3" in out and "encode     fixed 16 at layer -2: features [1, 16, 20]" in out
    assert f"tested with {tiny_llama_dir} at layer -2 in float32, tokens flexible and fixed 16" in out
    assert "fixed 128" not in out
    save_connector(make_connector(), path, metadata={**LLAMA_LAYER_2, "ella.llm_layer": "-4"})
    result = run("check", "--connector", str(path), "--text-encoder", str(tiny_llama_dir), "--device", "cpu")
    assert result.returncode == 1 and "reads hidden state -4 of its LLM" in result.stderr
    assert "has 3 hidden states" in result.stderr
