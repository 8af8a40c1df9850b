"""Imitates the containers of ``modules/prompt_parser.py`` (A1111 v1.10.1) the extension sees: ``DictWithShape``
(SDXL conditioning, ``.shape`` is the ``crossattn`` shape)."""


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape
