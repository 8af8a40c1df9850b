"""tools/check_doubles.py on small host / double source pairs written here (no host tree needed)."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_doubles", ROOT / "tools" / "check_doubles.py")
check_doubles = importlib.util.module_from_spec(_spec)
sys.modules["check_doubles"] = check_doubles  # dataclasses look their module up
_spec.loader.exec_module(check_doubles)

LAYERS = {"a1111": ["a1111"], "forge-classic": ["forge_classic", "forge", "a1111"]}


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))


class Trees:
    """A host tree and a tree of doubles (layered as tests/webui is) under tmp_path."""

    def __init__(self, tmp_path: Path):
        self.host = tmp_path / "host"
        self.webui = tmp_path / "webui"

    def add_host(self, rel: str, text: str):
        _write(self.host / rel, text)
        return self

    def add_double(self, rel: str, text: str, layer="a1111"):
        _write(self.webui / layer / rel, text)
        return self

    def run(self, key="a1111"):
        layers = {k: [self.webui / layer for layer in v] for k, v in LAYERS.items()}
        return check_doubles.run({key: [self.host]}, layers=layers, webui=self.webui)

    def findings(self, key="a1111"):
        results, stale = self.run(key)
        return [f for r in results for f in r.findings] + stale

    def failing(self, key="a1111"):
        return [f for f in self.findings(key) if f.fails]


@pytest.fixture
def trees(tmp_path):
    return Trees(tmp_path)


def pair(trees: Trees, double: str, host: str, rel="modules/thing.py") -> Trees:
    return trees.add_double(rel, double).add_host(rel, host)


def one(findings):
    assert len(findings) == 1, findings
    return findings[0]


def test_matching_signatures_pass(trees):
    pair(trees, '''
        """Imitates ``modules/thing.py``: a subset of it."""
        LIMIT = 3
        thing = None


        def f(a, b=1, /, c=2, *args, d, e=None, **kwargs):
            pass


        class C:
            kind = "x"

            def __init__(self, x, y=None):
                self.x = x

            def m(self, p, steps):
                pass

            @staticmethod
            def s(p, steps):
                pass

            @property
            def shape(self):
                return 1

            def _own_helper(self):
                pass


        def _helper():
            pass
        ''', '''
        import torch
        from modules import shared

        LIMIT = 75
        thing = object()


        def f(a, b=0, /, c=0, *rest, d, e=1, **kw):
            pass


        def g():  # the double need not have everything
            pass


        class Base:
            kind = "y"

            def m(self, p, steps):
                pass


        class C(Base):
            def __init__(self, x, y=None):
                self.x = x

            def s(self, p, steps):
                pass

            @property
            def shape(self):
                return 1
        ''')
    results, stale = trees.run()
    (result,) = results
    assert result.findings == [] and stale == []
    assert result.compared == 9  # LIMIT, thing, f, C, C.kind, C.__init__, C.m, C.s, C.shape
    assert result.host_files == ["modules/thing.py"]


def test_the_brief_example_missing_parameter(trees):
    pair(trees, """
        class Sampler:
            def sample(self, x):
                pass
        """, """
        class Sampler:
            def sample(self, x, y=None):
                pass
        """)
    finding = one(trees.failing())
    assert finding.name == "Sampler.sample" and finding.kind == "signature"
    assert finding.detail == "missing positional-or-keyword parameter `y=None`"
    assert finding.signatures[:2] == ("(x)", "(x, y=None)")  # as called on an instance
    assert finding.where.endswith("modules/thing.py:2")


@pytest.mark.parametrize(("double", "host", "detail"), [
    ("def f(x, y, z=None): pass", "def f(x, y): pass",
     "extra positional-or-keyword parameter `z=None` (the host has none)"),
    ("def f(x, z): pass", "def f(x, y): pass", "parameter 2 is `z` where the host has `y` (renamed)"),
    ("def f(x, *, y): pass", "def f(x, y): pass",
     "`y` is keyword-only in the double, positional-or-keyword in the host"),
    ("def f(x, y): pass", "def f(x, *, y): pass",
     "`y` is positional-or-keyword in the double, keyword-only in the host"),
    ("def f(x, /, y): pass", "def f(x, y): pass",
     "`x` is positional-only in the double, positional-or-keyword in the host"),
    ("def f(x, y): pass", "def f(x, y=None): pass", "`y` has a default in the host (`y=None`), none in the double"),
    ("def f(x, y=1): pass", "def f(x, y): pass", "`y` has a default in the double (`y=1`), none in the host"),
    ("def f(y, x): pass", "def f(x, y): pass", "positional order (y, x) where the host has (x, y)"),
    ("def f(x): pass", "def f(x, *args, **kwargs): pass", "missing `*args`; missing `**kwargs`"),
    ("def f(x, **kw): pass", "def f(x): pass", "extra `**kw` (the host has none)"),
    ("def f(x): pass", "def f(x, *, y, z=2): pass", "missing keyword-only parameters `y`, `z=2`"),
])
def test_each_signature_difference_is_reported(trees, double, host, detail):
    pair(trees, double, host)
    finding = one(trees.failing())
    assert (finding.name, finding.kind, finding.detail) == ("f", "signature", detail)


def test_default_values_are_not_compared(trees):
    pair(trees, "def f(keep_loaded=()): pass", "def f(keep_loaded=[]): pass")
    assert trees.findings() == []


def test_names_the_host_lacks_are_reported(trees):
    pair(trees, """
        recorded = []


        def helper():
            pass


        class C:
            flag = False

            def extra(self):
                pass

            def kept(self):
                pass
        """, """
        class C:
            def __init__(self):
                self.state = 1

            def kept(self):
                pass
        """)
    found = {(f.name, f.kind) for f in trees.failing()}
    assert found == {("recorded", "not-in-host"), ("helper", "not-in-host"), ("C.flag", "not-in-host"),
                     ("C.extra", "not-in-host")}
    detail = {f.name: f.detail for f in trees.failing()}
    assert detail["recorded"] == "modules/thing.py has no `recorded`"
    assert detail["C.extra"] == "the host's class C has no `extra`"


def test_instance_attributes_of_the_host_count_for_class_attributes(trees):
    pair(trees, """
        class C:
            state = 0
        """, """
        class Base:
            def reset(self):
                self.state = 0


        class C(Base):
            pass
        """)
    assert trees.findings() == []


def test_kinds_are_compared(trees):
    pair(trees, """
        class C:
            @property
            def inner(self):
                return 1

            def run(self):
                pass


        class Made:
            def __init__(self, x):
                pass
        """, """
        class C:
            def inner(self):
                return 1

            @property
            def run(self):
                pass


        def Made(x):
            pass
        """)
    found = {f.name: f.detail for f in trees.failing()}
    assert set(found) == {"C.inner", "C.run", "Made"}
    assert found["C.inner"].startswith("property in the double, method in the host")
    assert found["Made"].startswith("class in the double, function in the host")


def test_double_only_marks_a_helper(trees):
    pair(trees, """
        calls = []  # double-only: what the tests read


        # double-only: the stand-in for the text encoder
        def fake_clip(text):
            pass


        class C:
            denoiser_class = None  # double-only: which class the double builds

            def call(self, hook):  # noqa: N802; double-only: one method for all hooks
                pass
        """, """
        class C:
            pass
        """)
    assert trees.findings() == []


def test_double_only_on_a_name_the_host_has_is_reported(trees):
    pair(trees, "def f(x):  # double-only: a helper\n    pass\n", "def f(x):\n    pass\n")
    finding = one(trees.failing())
    assert finding.kind == "double-only-in-host" and "defines it too" in finding.detail


def test_underscore_names_are_not_compared(trees):
    pair(trees, """
        _registry = {}


        def _run(category):
            pass


        class _Recorder:
            def anything(self):
                pass
        """, "x = 1\n")
    assert trees.findings() == []


def test_double_simplified_explains_with_its_reason(trees):
    pair(trees, """
        # double-simplified: the runner is passed in, the host's is p.scripts, and the double needs
        # nothing else
        def process_images(p, runner):
            pass


        class P:
            def __init__(self, prompt):  # double-simplified: only what the tests set
                pass
        """, """
        def process_images(p):
            pass


        class P:
            def __init__(self, prompt="", steps=50):
                pass
        """)
    findings = trees.findings()
    assert [f.fails for f in findings] == [False, False]
    reasons = {f.name: f.explained for f in findings}
    assert reasons == {"process_images": "the runner is passed in, the host's is p.scripts, and the double needs "
                                         "nothing else",
                       "P.__init__": "only what the tests set"}


def test_a_stale_double_simplified_is_reported(trees):
    pair(trees, "def f(x):  # double-simplified: no longer true\n    pass\n", "def f(x):\n    pass\n")
    finding = one(trees.failing())
    assert finding.kind == "marker" and "explains no difference" in finding.detail


def test_a_marker_needs_a_reason(trees):
    pair(trees, "helper = 1  # double-only\n\n\nclass C:\n    def m(self, x):  # double-simplified\n        pass\n",
         "class C:\n    def m(self):\n        pass\n")
    found = {(f.name, f.detail) for f in trees.failing()}
    assert found == {("helper", "`# double-only` without a reason"),
                     ("C.m", "`# double-simplified` without a reason")}


def test_host_comment_names_another_file_and_name(trees):
    pair(trees, """
        re_extra_net = None  # host: modules/extra_networks.py


        def create_sampler(name, sd_model):  # host: modules/sd_samplers.py
            pass


        # host: forge-classic=modules/patcher.py:ModelPatcher
        class Patcher:
            pass
        """, "x = 1\n")
    trees.add_host("modules/extra_networks.py", "re_extra_net = 1\n")
    trees.add_host("modules/sd_samplers.py", "def create_sampler(name, model):\n    pass\n")
    finding = one(trees.failing())  # Patcher names Forge classic only: not checked against A1111
    assert finding.name == "create_sampler" and finding.detail == \
        "parameter 2 is `sd_model` where the host has `model` (renamed)"


def test_host_comment_to_a_missing_file_is_reported(trees):
    pair(trees, "def f():  # host: modules/nowhere.py\n    pass\n", "x = 1\n")
    finding = one(trees.failing())
    assert finding.kind == "host-file" and "modules/nowhere.py" in finding.detail


def test_docstring_citation_adds_files_and_must_name_the_double_path_first(trees):
    trees.add_double("modules/samplers.py", '''
        """Imitates ``modules/samplers.py`` + ``samplers_common.py`` (A1111): ``setup_steps``."""


        def setup_steps(p, steps):
            pass
        ''')
    trees.add_host("modules/samplers.py", "x = 1\n")
    trees.add_host("modules/samplers_common.py", "def setup_steps(p, steps=None):\n    pass\n")
    finding = one(trees.failing())
    assert finding.name == "setup_steps" and "`steps` has a default in the host" in finding.detail
    assert trees.run()[0][0].host_files == ["modules/samplers.py", "modules/samplers_common.py"]

    trees.add_double("modules/other.py", '"""Imitates ``modules/samplers.py``."""\n\ny = 1\n')
    trees.add_host("modules/other.py", "y = 2\n")
    assert {(f.name, f.kind) for f in trees.failing()} >= {("(docstring)", "citation")}


def test_a_missing_host_file_is_reported(trees):
    trees.add_double("modules/gone.py", "def f():\n    pass\n")
    trees.add_host("modules/other.py", "x = 1\n")
    assert {(f.kind, f.detail) for f in trees.failing()} >= {("host-file", "the host has no ``modules/gone.py``")}


def test_host_imports_are_followed_to_the_definition(trees):
    pair(trees, """
        def setup_img2img_steps(p):
            pass


        class KSampler:
            def sample(self, p, x):
                pass
        """, """
        from modules.sd_samplers_common import setup_img2img_steps
        from modules import sd_samplers_common


        class KSampler(sd_samplers_common.Sampler):
            pass
        """)
    trees.add_host("modules/sd_samplers_common.py", """
        def setup_img2img_steps(p, steps=None):
            pass


        class Sampler:
            def sample(self, p, x, conditioning):
                pass
        """)
    found = {f.name: f.detail for f in trees.failing()}
    assert found == {"setup_img2img_steps": "missing positional-or-keyword parameter `steps=None`",
                     "KSampler.sample": "missing positional-or-keyword parameter `conditioning`"}


def test_dataclass_and_namedtuple_constructors(trees):
    pair(trees, """
        from dataclasses import dataclass, field


        @dataclass
        class SamplerData:
            name: str
            family: str
            options: dict = field(default_factory=dict)
        """, """
        from collections import namedtuple

        SamplerDataTuple = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])


        class SamplerData(SamplerDataTuple):
            def total_steps(self, steps):
                return steps
        """)
    found = {f.name: f.detail for f in trees.failing()}
    assert found["SamplerData.__init__"] == (
        "parameter 2 is `family` where the host has `constructor` (renamed); missing positional-or-keyword "
        "parameter `aliases`; `options` has a default in the double (`options=field(default_factory=dict)`), none "
        "in the host")
    assert found["SamplerData.family"] == "the host's class SamplerData has no `family`"


def test_pass_through_init_takes_the_hosts_base(trees):
    pair(trees, """
        class UnetPatcher:
            def __init__(self, model):
                pass
        """, """
        class ModelPatcher:
            def __init__(self, model, load_device, size=0):
                pass


        class UnetPatcher(ModelPatcher):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
        """)
    assert one(trees.failing()).detail == "missing positional-or-keyword parameters `load_device`, `size=0`"


def test_bound_methods_of_a_recorder_stand_for_functions(trees):
    trees.add_double("recorders.py", """
        class Recorder:  # double-only: records the calls
            def free_memory(self, memory_required, device):
                pass

            @staticmethod
            def minimum_inference_memory():
                return 1
        """)
    pair(trees, """
        from recorders import Recorder

        _recorder = Recorder()
        free_memory = _recorder.free_memory
        minimum_inference_memory = _recorder.minimum_inference_memory
        """, """
        def free_memory(memory_required, device, keep_loaded=[]):
            pass


        def minimum_inference_memory():
            pass
        """)
    finding = one(trees.failing())
    assert finding.name == "free_memory" and finding.signatures[0] == "(memory_required, device)"


def test_a_file_at_no_host_path_needs_host_comments(trees):
    trees.add_double("common.py", """
        # host: a1111=modules/patcher.py
        class Patcher:
            def clone(self):
                pass


        class Unmarked:
            pass
        """)
    trees.add_host("modules/patcher.py", "class Patcher:\n    def clone(self, deep):\n        pass\n")
    found = {(f.name, f.kind) for f in trees.failing()}
    assert found == {("Patcher.clone", "signature"), ("Unmarked", "not-in-host")}


def test_forge_layers_follow_the_a1111_double(trees):
    """A Forge double takes names and bases from the A1111 double (``a1111_module``); what it takes is compared
    with the Forge host, and an A1111 double no Forge layer replaces is compared with Forge's file too."""
    trees.add_double("modules/thing.py", """
        def f(x):
            pass


        class C:
            def run(self, x):
                pass
        """)
    trees.add_double("modules/thing.py", """
        from hostlayers import a1111_module

        base = a1111_module("thing")
        f = base.f


        class C(base.C):
            pass
        """, layer="forge_classic")
    trees.add_double("modules/plain.py", "def g(a):\n    pass\n")
    trees.add_host("modules/thing.py", """
        def f(x, y):
            pass


        class C:
            def run(self, x, *, strict=False):
                pass
        """)
    trees.add_host("modules/plain.py", "def g(b):\n    pass\n")
    results, _ = trees.run("forge-classic")
    by_file = {Path(r.double).name + ":" + Path(r.double).parent.parent.name: r for r in results}
    forge = by_file["thing.py:forge_classic"]
    assert {f.name: f.detail for f in forge.findings} == {
        "f": "missing positional-or-keyword parameter `y`",
        "C.run": "missing keyword-only parameter `strict=False`"}
    assert all("a1111/modules/thing.py" in f.where for f in forge.findings)  # where the definitions are written
    assert [f.name for f in by_file["plain.py:a1111"].findings] == ["g"]
    assert "thing.py:a1111" not in by_file  # replaced by the Forge layer's


def test_factory_made_functions_are_compared(trees):
    pair(trees, """
        def _registrar(category):
            def register(callback):
                pass

            return register


        on_cfg_denoiser = _registrar("cfg_denoiser")
        """, "def on_cfg_denoiser(callback, *, name=None):\n    pass\n")
    assert one(trees.failing()).detail == "missing keyword-only parameter `name=None`"


def test_report_json_and_exit_status(trees, monkeypatch, capsys):
    pair(trees, """
        def f(x):  # double-simplified: the tests pass x only
            pass


        def g(x):
            pass
        """, "def f(x, y):\n    pass\n\n\ndef g(x, y):\n    pass\n")
    layers = {k: [trees.webui / layer for layer in v] for k, v in LAYERS.items()}
    monkeypatch.setattr(check_doubles, "run", functools.partial(check_doubles.run, layers=layers, webui=trees.webui))
    (trees.host / "modules").mkdir(exist_ok=True)

    assert check_doubles.main(["--a1111", str(trees.host)]) == 1
    text = capsys.readouterr().out
    assert "1 MISMATCH, 2 compared (1 explained)" in text
    assert "MISMATCH g [" in text and "missing positional-or-keyword parameter `y`" in text
    assert "why: the tests pass x only" in text
    assert text.rstrip().endswith("1 unexplained, 1 explained, 0 unverified")

    assert check_doubles.main(["--a1111", str(trees.host), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["unexplained"] == 1
    (entry,) = data["files"]
    assert entry["ok"] is False and entry["host"] == "a1111"
    assert {f["name"]: f["fails"] for f in entry["findings"]} == {"f": False, "g": True}
    assert entry["findings"][0]["host_signature"] == "(x, y)"

    trees.add_double("modules/thing.py", "def f(x):  # double-simplified: the tests pass x only\n    pass\n")
    assert check_doubles.main(["--a1111", str(trees.host)]) == 0


def test_without_hosts_it_says_what_to_pass(capsys):
    assert check_doubles.main([]) == 2
    assert "--a1111" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_doubles.main(["--a1111", "/nonexistent"])
