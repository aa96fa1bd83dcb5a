"""minigpt: GPT-2 from scratch, from a byte-pair-encoding vocabulary to a served chatbot.

Importing the package does nothing but define names; see `minigpt --help` for the stages.
"""

__version__ = "0.1.0"
