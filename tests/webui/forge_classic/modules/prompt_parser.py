"""Imitates ``modules/prompt_parser.py`` of Forge classic: the shared Forge double's ``DictWithShape``, whose
``__init__(self, x)`` takes no ``shape`` in classic (line 271; A1111 1.10 and Forge new take ``shape=None``)."""

from hostlayers import forge_module

base = forge_module("prompt_parser")


class DictWithShape(base.DictWithShape):
    def __init__(self, x):
        super().__init__(x)
