"""The training engine: a method-agnostic trainer, checkpoints, schedules, distributed helpers."""
