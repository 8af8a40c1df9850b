"""Host double of Forge classic (lllyasviel/stable-diffusion-webui-forge at bfee03d8), layered on ../forge and
../a1111 (see ../forge/README.md)."""
