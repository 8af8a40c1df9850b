"""Imitates ``backend/modules/k_prediction.py`` ``Prediction`` of Forge new (epsilon, discrete schedule): ``sigmas``
and ``log_sigmas`` in float32, ``timestep(sigma)`` the nearest training step (see ``forge_common``)."""

from forge_common import DiscreteSchedule as Prediction

__all__ = ["Prediction"]
