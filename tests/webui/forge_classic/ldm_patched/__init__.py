"""Host double of Forge classic's ``ldm_patched`` package (see ../../forge/README.md)."""
