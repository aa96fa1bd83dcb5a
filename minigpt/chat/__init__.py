"""The generation engine, and talking to a model: `minigpt chat` and `minigpt sample`."""
