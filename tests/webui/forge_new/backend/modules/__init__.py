"""Host double of Forge new's ``backend.modules``."""
