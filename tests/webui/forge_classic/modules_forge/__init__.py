"""Host double of Forge classic's ``modules_forge`` package."""
