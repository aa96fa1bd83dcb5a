"""Build glue for the one compiled piece, minigpt/text/_bpe_c.c (the BPE merge loop); all metadata is in pyproject.toml.

The extension is optional: where it cannot be compiled the install still succeeds and training uses the
pure-Python merge loop, which gives the same merges, only slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("minigpt.text._bpe_c", sources=["minigpt/text/_bpe_c.c"], optional=True)])
