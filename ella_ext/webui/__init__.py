"""The WebUI layer: everything that imports the host (``modules.*``) or gradio. One file per concern.

Imported only inside a WebUI (or a test's host double); the core in ``ella_ext`` never imports this package.
"""
