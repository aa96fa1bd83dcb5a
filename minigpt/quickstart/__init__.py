"""`minigpt quickstart`: the whole pipeline on a CPU in minutes, and its time budget."""
