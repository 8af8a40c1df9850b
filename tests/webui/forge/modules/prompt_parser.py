"""Imitates ``modules/prompt_parser.py`` ``DictWithShape`` of Forge (classic and new): A1111's container plus
``to()`` and ``advanced_indexing(item)`` (a new ``DictWithShape`` with every tensor indexed), which Forge's
conditions use to pick the rows of one AND part."""

import torch
from hostlayers import a1111_module

base = a1111_module("prompt_parser")


class DictWithShape(base.DictWithShape):
    def to(self, *args, **kwargs):
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                self[k] = self[k].to(*args, **kwargs)
        return self

    def advanced_indexing(self, item):
        return DictWithShape({k: v[item] for k, v in self.items() if isinstance(v, torch.Tensor)})
