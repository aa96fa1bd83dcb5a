"""The training loop for pretraining (`minigpt train`) and fine-tuning (`minigpt sft`), its optimizers."""
