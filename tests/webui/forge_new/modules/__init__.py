"""Host double of Forge new (lllyasviel/stable-diffusion-webui-forge at dfdcbab6), layered on ../forge and ../a1111
(see ../forge/README.md)."""
