"""Imitates ``modules/script_callbacks.py`` of Forge classic: the A1111 double's callbacks, but registration is
``on_X(callback)`` with no ``name`` keyword (``add_callback(callbacks, fun)``)."""

from hostlayers import a1111_module

base = a1111_module("script_callbacks")
callback_map, reported, CFGDenoiserParams = base.callback_map, base.reported, base.CFGDenoiserParams
clear_callbacks, cfg_denoiser_callback, ui_settings_callback = (base.clear_callbacks, base.cfg_denoiser_callback,
                                                                base.ui_settings_callback)
app_started_callback, before_ui_callback, infotext_pasted_callback = (base.app_started_callback,
                                                                      base.before_ui_callback,
                                                                      base.infotext_pasted_callback)


def _registrar(category):
    def register(callback):
        base._add(category, callback, None)

    return register


on_cfg_denoiser = _registrar("cfg_denoiser")
on_ui_settings = _registrar("ui_settings")
on_app_started = _registrar("app_started")
on_before_ui = _registrar("before_ui")
on_infotext_pasted = _registrar("infotext_pasted")
on_script_unloaded = _registrar("script_unloaded")
