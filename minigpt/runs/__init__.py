"""A run's folder: checkpoints (whole and sharded), metrics logs and trackers, the runtime (device, precision,
processes) and the model's parallel wrappers; `minigpt runs` compares runs.
"""
