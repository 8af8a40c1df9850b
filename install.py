"""Run by the WebUI (A1111 / Forge) when the extension loads: installs only what is missing.

The hosts already bring torch, transformers, safetensors and gradio; this never installs or upgrades those.
sentencepiece (T5's tokenizer) is the one package ELLA adds; huggingface_hub is installed only if a host lacks it.
"""

import launch

REQUIREMENTS = {
    # import name: pip requirement
    "sentencepiece": "sentencepiece",
    "huggingface_hub": "huggingface_hub",
}

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for the ELLA extension")
