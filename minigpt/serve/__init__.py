"""`minigpt serve`: the OpenAI-compatible API, continuous batching, the web page."""
