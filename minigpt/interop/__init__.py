"""`minigpt export` and `minigpt import`: the Hugging Face format, weights and tokenizer."""
