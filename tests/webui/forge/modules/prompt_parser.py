"""Imitates ``modules/prompt_parser.py`` ``DictWithShape`` of Forge (classic and new): A1111's container plus
``to()`` and ``advanced_indexing(item)`` (a new ``DictWithShape`` with every tensor indexed), which Forge's
conditions use to pick the rows of one AND part."""

import torch


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape

    def to(self, *args, **kwargs):
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                self[k] = self[k].to(*args, **kwargs)
        return self

    def advanced_indexing(self, item):
        return DictWithShape({k: v[item] for k, v in self.items() if isinstance(v, torch.Tensor)})
