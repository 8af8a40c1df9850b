"""Host double: what Forge classic (bfee03d8) and Forge new (dfdcbab6) share in ``modules`` (see ../README.md)."""
