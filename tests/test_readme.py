"""The README tells the truth about the command line: its stage list is `minigpt --help`'s."""

from __future__ import annotations

import re
from pathlib import Path

from minigpt.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_stage_list_is_the_cli_s():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("minigpt --help\n"):]
    block = block[: block.index("```")]
    listed = re.findall(r"^  (\S+)\s+(.+)$", block, flags=re.M)
    assert listed == [(name, help_) for name, help_ in STAGES]


def test_every_module_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:minigpt|docs)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
