"""Host double of Forge new's ``backend`` package (see ../../forge/README.md)."""
