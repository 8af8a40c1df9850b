"""Imitates ``modules/ui_components.py`` of Forge new: ``InputAccordion(value=None, **kwargs)`` is a function that
returns ``InputAccordionImpl(value=value, setup=True, **kwargs)`` (the A1111 double's accordion, under gradio 4);
``InputAccordionImpl(value)`` without ``setup`` is a plain checkbox."""

import gradio as gr
from hostlayers import a1111_module

base = a1111_module("ui_components")
ToolButton = base.ToolButton


class InputAccordionImpl(base.InputAccordion):
    def __init__(self, value=None, setup=False, **kwargs):
        if not setup:
            gr.Checkbox.__init__(self, value=value, **kwargs)
            return
        super().__init__(value, **kwargs)


def InputAccordion(value=None, **kwargs):  # noqa: N802 - the host's name
    return InputAccordionImpl(value=value, setup=True, **kwargs)
