"""Imitates ``modules/ui_common.py`` (A1111 v1.10.1) ``create_refresh_button(refresh_component, refresh_method,
refreshed_args, elem_id)``: a ToolButton whose click calls ``refresh_method()`` then updates the component with
``refreshed_args()``."""

import gradio as gr

from modules.ui_components import ToolButton


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        for k, v in args.items():
            setattr(refresh_component, k, v)
        return gr.update(**(args or {}))

    button = ToolButton(value="\U0001f504", elem_id=elem_id)
    button.click(fn=refresh, inputs=[], outputs=[refresh_component])
    return button
