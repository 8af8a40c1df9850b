"""Imitates ``modules/ui_components.py`` (A1111 v1.10.1): ``InputAccordion`` is a hidden checkbox (the input) that
opens and closes a ``gr.Accordion``; ``with InputAccordion(...) as x`` enters the accordion and gives the checkbox.
``ToolButton`` is a small button. (Forge's gradio 4 version passes ``js=`` where gradio 3 takes ``_js=``.)"""

import gradio as gr

_GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


class ToolButton(gr.Button):
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)


class InputAccordion(gr.Checkbox):
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        js = 'function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }'
        if _GRADIO_4:
            self.change(fn=None, js=js, inputs=[self])
        else:
            self.change(fn=None, _js=js, inputs=[self])
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "elem_classes": ["input-accordion"],
                                        "label": kwargs.get("label", "Accordion"), "open": value})

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)
