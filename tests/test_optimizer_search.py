"""bench/optimizer_search.py: a trial's name becomes the `minigpt train` command it claims, and the token-efficiency
figure reads the validation curves as docs/training.md says (interpolated, and below 1 when the new recipe loses)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("bench_optimizer_search", ROOT / "bench" / "optimizer_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def flags(cmd: list[str]) -> dict[str, str]:
    """--flag value pairs and --flag=value of a command line."""
    out, args = {}, cmd[3:]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            out[key] = value or (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "")
    return out


def test_a_trial_name_is_the_command_it_runs(search, tmp_path):
    muon = flags(search.train_command("M_muon_8e-3_wsd_mw_a1e-3_1338", tmp_path))
    steps = search.STEPS["M"]
    assert (muon["--optimizer"], muon["--muon-lr"], muon["--lr"], muon["--schedule"], muon["--seed"]) == (
        "muon", "0.008", "0.001", "wsd", "1338")
    assert muon["--model.n-embd"] == "320" and muon["--max-steps"] == str(steps)
    assert muon["--muon-momentum-warmup"] == str(int(0.3 * steps))
    adamw = flags(search.train_command("S_adamw_4e-3_cosine_1337", tmp_path))
    assert (adamw["--optimizer"], adamw["--lr"], adamw["--schedule"], adamw["--model.n-embd"]) == (
        "adamw", "0.004", "cosine", "128")
    assert "--muon-lr" not in adamw and "--muon-momentum-warmup" not in adamw
    muon_default = flags(search.train_command("S_muon_8e-3_wsd_1337", tmp_path))
    assert muon_default["--lr"] == f"{search.ADAMW_LR['S']:g}" and "--muon-momentum-warmup" not in muon_default
    with pytest.raises(SystemExit):
        search.parse("S_sgd_1e-3_cosine_1337")


def test_token_efficiency_interpolates_and_falls_below_one_when_the_new_recipe_loses(search):
    per_step = search.COMMON["batch_size"] * search.COMMON["block_size"]
    adamw = {"curve": [[10, 6.0], [20, 5.0], [30, 4.0], [40, 3.5]], "val_loss": 3.5, "tokens": 40 * per_step}
    assert search.tokens_to_reach(adamw["curve"], 4.5, per_step) == pytest.approx(25 * per_step)
    assert search.tokens_to_reach(adamw["curve"], 3.0, per_step) is None
    faster = {"curve": [[10, 5.0], [20, 3.7], [30, 3.3], [40, 3.0]], "val_loss": 3.0, "tokens": 40 * per_step}
    # reaches 3.5 halfway from step 20 (3.7) to step 30 (3.3): 25 steps against AdamW's 40
    assert search.token_efficiency(adamw, faster) == pytest.approx(40 / 25)
    slower = {"curve": [[10, 6.5], [20, 5.5], [30, 5.0], [40, 4.5]], "val_loss": 4.5, "tokens": 40 * per_step}
    # never reaches 3.5; AdamW reached the slower recipe's 4.5 at step 25, against its 40 steps
    assert search.token_efficiency(adamw, slower) == pytest.approx(25 / 40)
