"""Before a run: `minigpt plan` (a budget to a run) and the dry run."""
