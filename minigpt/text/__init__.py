"""Text in: the byte-level BPE tokenizer, the chat format, and the sources (files, folders, globs, JSONL, Parquet,
bundled corpora, hf:) for pretraining corpora and conversations.
"""
