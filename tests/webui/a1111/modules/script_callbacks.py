"""Imitates ``modules/script_callbacks.py`` (A1111 v1.10.1): registration ``on_X(callback, *, name=None)``, the
``CFGDenoiserParams`` fields, and callbacks run inside try/except that only reports (a failing callback never stops
a generation)."""

import traceback
from collections import defaultdict

callback_map = defaultdict(list)
reported = []  # double-only: (category, exception text) for each exception a callback raised (host: printed)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def _add(category, callback, name):
    callback_map[category].append((name, callback))


def clear_callbacks():
    callback_map.clear()


def _run(category, *args):
    for _name, callback in callback_map[category]:
        try:
            callback(*args)
        except Exception:
            reported.append((category, traceback.format_exc()))


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def ui_settings_callback():
    _run("ui_settings")


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def before_ui_callback():
    _run("before_ui")


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def on_app_started(callback, *, name=None):
    _add("app_started", callback, name)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback, name)
