"""Host double of Forge classic's ``ldm_patched.modules``."""
