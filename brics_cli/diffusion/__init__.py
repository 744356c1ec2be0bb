"""Diffusion on key codes (paper Sec. 4, Suppl. A.5-A.6): schedules, the training loss, samplers, config."""
