"""Judging connectors: ``python -m ella_ext.train eval`` scores images made with connectors (and the base model's own
text encoder) by a visual-question-answering judge on DPG-Bench-style question sets. Host-free; it needs the
trainer's extras (``pip install -e .[train]``) and is never imported by the WebUI extension."""
