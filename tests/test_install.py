"""install.py against a stand-in for the host's ``launch`` module (A1111 modules/launch_utils.py: ``is_installed``
checks an importable package, ``run_pip(command, desc)`` runs pip with the host's Python)."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def run_install(monkeypatch, installed):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL))
    return calls


def test_installs_only_what_is_missing(monkeypatch):
    assert run_install(monkeypatch, {"sentencepiece", "huggingface_hub"}) == []
    assert run_install(monkeypatch, {"huggingface_hub"}) == ["install sentencepiece"]
    assert run_install(monkeypatch, set()) == ["install sentencepiece", "install huggingface_hub"]


def test_never_touches_the_hosts_stack(monkeypatch):
    calls = run_install(monkeypatch, set())
    for package in ("torch", "transformers", "gradio", "safetensors", "--upgrade", "-U"):
        assert not any(package in c.split() for c in calls)
