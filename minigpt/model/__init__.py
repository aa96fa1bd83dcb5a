"""GPT-2 itself, its shapes, its FLOPs and memory, and CPU inference packing applied from outside."""
