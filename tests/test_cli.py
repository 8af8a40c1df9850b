"""``python -m ella_ext check`` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert "connector b-tiny: OK (with tiny-t5)" in verdicts
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
