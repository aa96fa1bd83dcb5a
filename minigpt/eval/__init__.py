"""Measuring a model: loss and bits per byte, benchmark scoring, tasks, `minigpt inspect`, slow references."""
