"""Imitates ``modules/paths.py`` (A1111 v1.10.1): ``models_path`` is ``--models-dir`` or ``<data>/models``."""

models_path = ""
