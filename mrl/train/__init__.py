"""Training backend: optimizer, schedules, train step, checkpoints, trainer."""
