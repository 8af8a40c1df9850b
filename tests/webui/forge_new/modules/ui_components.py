"""Imitates ``modules/ui_components.py`` of Forge new: ``InputAccordion(value=None, **kwargs)`` is a function that
returns ``InputAccordionImpl(value=value, setup=True, **kwargs)`` (the A1111 double's accordion, under gradio 4);
``InputAccordionImpl(value)`` without ``setup`` is a plain checkbox. ``ToolButton(value="", *args,
elem_classes=None, **kwargs)`` names its value and classes (A1111's takes ``*args, **kwargs``)."""

import gradio as gr
from hostlayers import a1111_module

base = a1111_module("ui_components")


class ToolButton(gr.Button):
    def __init__(self, value="", *args, elem_classes=None, **kwargs):
        elem_classes = elem_classes or []
        super().__init__(*args, elem_classes=["tool", *elem_classes], value=value, **kwargs)


class InputAccordionImpl(base.InputAccordion):
    def __init__(self, value=None, setup=False, **kwargs):
        if not setup:
            gr.Checkbox.__init__(self, value=value, **kwargs)
            return
        super().__init__(value, **kwargs)


def InputAccordion(value=None, **kwargs):  # noqa: N802 - the host's name
    return InputAccordionImpl(value=value, setup=True, **kwargs)
