"""The ELLA connector trainer: ``python -m ella_ext.train train|cache|sample|estimate --config run.toml``.

Host-free and never imported by the WebUI. It needs the training extras (``pip install -e .[train]``: diffusers,
accelerate, tensorboard, webdataset). It trains only the TSC (``ella_ext.connector.Connector``) against a frozen SD 1.5
or SDXL UNet and a frozen LLM read through ``ella_ext.load_text_encoder``, and writes connectors the extension loads.
"""
