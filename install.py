"""Run by the WebUI (A1111 / Forge) when the extension loads: installs only what is missing.

The hosts already bring torch, transformers, safetensors and gradio; this never installs or upgrades those.
sentencepiece (T5's tokenizer) is the one package ELLA adds; huggingface_hub is installed only if a host lacks it, and
then in a version the host's transformers accepts (A1111 1.10's transformers 4.30.2 refuses huggingface_hub 1.x).
"""

import launch


def hub_requirement() -> str:
    """huggingface_hub as the installed transformers itself requires it (its dependency line, without extras)."""
    try:
        from importlib.metadata import requires

        from packaging.requirements import Requirement

        for line in requires("transformers") or []:
            requirement = Requirement(line)
            if requirement.name.lower().replace("_", "-") == "huggingface-hub" and requirement.marker is None:
                return f"huggingface_hub{requirement.specifier}"
    except Exception:  # no transformers metadata, or no packaging: what every transformers 4.x accepts
        pass
    return "huggingface_hub<1"


REQUIREMENTS = {
    # import name: pip requirement
    "sentencepiece": "sentencepiece",
    "huggingface_hub": hub_requirement(),
}

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for the ELLA extension")
