"""Token shards: `minigpt prepare` (journal, resume, workers), the held-out split, the loaders of pretraining and fine-
tuning batches.
"""
