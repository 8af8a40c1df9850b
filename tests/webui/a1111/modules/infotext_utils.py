"""Imitates the settings half of pasting image parameters in ``modules/infotext_utils.py`` (A1111 v1.10.1, also
Forge classic and new): ``get_override_settings(params, skip_fields)`` maps each info-text key that a registered
option names with ``OptionInfo(..., infotext=key)`` to that option, casts the pasted text with ``opts.cast_value``
and keeps it only when it differs from the current value; ``connect_paste`` first runs the ``on_infotext_pasted``
callbacks on ``params`` and passes the keys of the paste fields as ``skip_fields``, then shows the result in the
"Override settings" dropdown as ``"key: value"`` (``create_override_settings_dict`` reads those back into
``p.override_settings`` when the user generates)."""

from modules import shared


def get_override_settings(params, *, skip_fields=None):
    result = []
    mapping = [(info.infotext, key) for key, info in shared.opts.data_labels.items() if info.infotext]
    for param_name, setting_name in mapping:
        if param_name in (skip_fields or {}):
            continue
        value = params.get(param_name, None)
        if value is None:
            continue
        value = shared.opts.cast_value(setting_name, value)
        if value == getattr(shared.opts, setting_name, None):
            continue
        result.append((param_name, setting_name, value))
    return result


def create_override_settings_dict(text_pairs):
    params = {}
    for pair in text_pairs:
        key, value = pair.split(":", maxsplit=1)
        params[key] = value.strip()
    mapping = [(info.infotext, key) for key, info in shared.opts.data_labels.items() if info.infotext]
    return {setting: shared.opts.cast_value(setting, params[name]) for name, setting in mapping if name in params}
