"""Imitates ``modules/scripts.py`` (A1111 v1.10.1): the ``Script`` base with its default hooks, ``AlwaysVisible``,
``scripts_data`` (``ScriptClassData(script_class, path, basedir, module)``) and ``ScriptRunner``'s calling
convention: every hook gets ``p`` and the script's slice of ``p.script_args``, inside try/except that only reports."""

import traceback
from collections import namedtuple

AlwaysVisible = object()
scripts_data = []
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
reported = []  # double-only: (hook, exception text) for each exception a script raised (host: printed)


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """One always-on script; ``call("process", p)`` is the host's ``script.process(p, *p.script_args[a:b])``."""

    def __init__(self, script, args_from=1):  # double-simplified: runs one given script (the host's loads them all)
        self.script = script
        script.alwayson = True
        script.args_from = args_from
        self.calls = []

    def call(self, hook, p, *extra, **kwargs):  # double-only: the host has one method per hook (process, ...)
        self.calls.append(hook)
        script = self.script
        args = p.script_args[script.args_from:script.args_to]
        try:
            getattr(script, hook)(p, *extra, *args, **kwargs)
        except Exception:
            reported.append((hook, traceback.format_exc()))
