"""Imitates ``modules/sd_models.py`` (A1111 v1.10.1) as a refiner switch uses it:

- ``get_closet_checkpoint_match(name)``: the ``CheckpointInfo`` of a checkpoint by name (``p.refiner_checkpoint``);
- ``reload_model_weights(info=...)``: loads that checkpoint as ``shared.sd_model`` (the refiner switch);
  ``reload_model_weights()`` loads the one chosen in the settings again (``process_images_inner`` does it at every
  batch: "model can be changed for example by refiner").
The double's checkpoints are the fake models the tests register; each carries its ``sd_checkpoint_info``.
"""

from modules import shared

checkpoints_list = {}


class CheckpointInfo:
    # double-simplified: made from a name and the fake model it loads, not from a file; short_title has no hash
    def __init__(self, name, model):
        self.name = self.title = self.short_title = name
        self.model = model  # double-only: what loading the checkpoint gives
        model.sd_checkpoint_info = self


def _register(name, model):  # double-only: the tests' way to put a checkpoint in the list
    checkpoints_list[name] = info = CheckpointInfo(name, model)
    return info


def get_closet_checkpoint_match(search_string):
    return checkpoints_list.get(search_string)


_chosen = []  # double-only: the checkpoint the settings name (loaded before the first switch away from it)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    current = shared.sd_model
    if info is None:
        if not _chosen:
            return current
        info = _chosen.pop()
    elif getattr(current, "sd_checkpoint_info", None) is not info:
        _chosen.append(getattr(current, "sd_checkpoint_info", None) or CheckpointInfo("main", current))
    shared.sd_model = info.model
    return shared.sd_model
