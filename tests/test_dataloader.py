"""TokenLoader: windows across shard ends, epoch coverage, disjoint ranks, exact resume, sequential evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minigpt.common import UserError, write_json
from minigpt.data.loader import TokenLoader
from minigpt.data.prepare import PrepareConfig, prepare
from minigpt.data.shards import FORMAT_VERSION, ShardWriter
from minigpt.text.tokenizer import Tokenizer


def write_split(folder, n_tokens: int, shard_tokens: int, split: str = "train", text_bytes: int | None = None):
    """Shards whose token at stream position p is p itself (n_tokens < 65536), so a window shows where it is from."""
    folder.mkdir(exist_ok=True)
    writer = ShardWriter(folder, split, np.dtype("<u2"), shard_tokens)
    writer.write(np.arange(n_tokens))
    files = writer.close()
    meta = {"format": "minigpt-shards", "format_version": FORMAT_VERSION,
            "tokenizer": {"name": "test", "hash": "0", "n_vocab": 65536, "eot_id": 0}, "dtype": "uint16",
            "splits": {split: {"documents": 1, "tokens": n_tokens, "shards": files,
                               "text_bytes": text_bytes if text_bytes is not None else 4 * n_tokens}}}
    write_json(folder / "meta.json", meta)
    return folder


@pytest.fixture()
def data(tmp_path):
    return write_split(tmp_path / "data", n_tokens=1001, shard_tokens=97)  # windows cross many shard ends


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_batches_are_shifted_windows_across_shard_ends(data):
    loader = TokenLoader(data, "train", batch_size=4, seq_len=16, seed=0)
    assert loader.num_tokens == 1001 and loader.windows_per_epoch == 1000 // 16
    x, y = loader.batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert start % 16 == 0
        assert row_x.tolist() == list(range(start, start + 16))
        assert row_y.tolist() == list(range(start + 1, start + 17))
    assert loader.bytes_per_token == 4.0


def test_shuffled_epochs_visit_every_window_once_in_a_new_order(data):
    loader = TokenLoader(data, "train", batch_size=2, seq_len=10, seed=3)
    n = loader.windows_per_epoch  # 100 windows, 50 steps per epoch
    assert n == 100 and loader.steps_per_epoch == 50
    epoch0 = [s for step in range(50) for s in starts(loader.batch(step)[0])]
    epoch1 = [s for step in range(50, 100) for s in starts(loader.batch(step)[0])]
    assert sorted(epoch0) == sorted(epoch1) == [10 * i for i in range(n)]
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)
    again = TokenLoader(data, "train", batch_size=2, seq_len=10, seed=3)
    assert torch.equal(again.batch(17)[0], loader.batch(17)[0])
    other_seed = TokenLoader(data, "train", batch_size=2, seq_len=10, seed=4)
    assert [s for step in range(50) for s in starts(other_seed.batch(step)[0])] != epoch0


def test_a_batch_may_straddle_two_epochs(data):
    loader = TokenLoader(data, "train", batch_size=3, seq_len=10, seed=0)  # 100 windows: step 33 holds 99, 100, 101
    assert len(set(starts(loader.batch(33)[0]))) == 3
    seen = [s for step in range(66) for s in starts(loader.batch(step)[0])]  # 198 windows
    counts = np.bincount(np.array(seen) // 10, minlength=100)
    assert counts.min() >= 1 and counts.max() == 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_the_global_batch(data, world):
    loaders = [TokenLoader(data, "train", batch_size=4, seq_len=10, seed=5, rank=r, world_size=world)
               for r in range(world)]
    single = TokenLoader(data, "train", batch_size=4 * world, seq_len=10, seed=5)
    for step in range(6):
        per_rank = [starts(loader.batch(step)[0]) for loader in loaders]
        flat = [s for rank in per_rank for s in rank]
        assert len(set(flat)) == len(flat) == 4 * world  # disjoint, full batches
        assert sorted(flat) == sorted(starts(single.batch(step)[0]))  # the same global batch as one big rank
    # Over one epoch every window goes to exactly one rank.
    steps = loaders[0].windows_per_epoch // (4 * world)
    seen = [s for loader in loaders for step in range(steps) for s in starts(loader.batch(step)[0])]
    assert len(seen) == len(set(seen)) == steps * 4 * world


def test_resume_gives_the_same_batches_as_an_uninterrupted_run(data):
    straight = TokenLoader(data, "train", batch_size=3, seq_len=12, seed=11)
    stream = iter(straight)
    expected = [next(stream) for _ in range(40)]  # crosses an epoch (83 windows = 27 steps)
    first = TokenLoader(data, "train", batch_size=3, seq_len=12, seed=11)
    it = iter(first)
    for _ in range(13):
        next(it)
    state = first.state_dict()
    assert state["step"] == 13
    resumed = TokenLoader(data, "train", batch_size=3, seq_len=12, seed=11)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(resumed, expected[13:], strict=False):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    for step in (0, 13, 39):
        assert torch.equal(straight.batch(step)[0], expected[step][0])


def test_resume_across_a_different_world_size(data):
    one = TokenLoader(data, "train", batch_size=4, seq_len=10, seed=1)
    one.step = 6  # 24 windows consumed
    ranks = [TokenLoader(data, "train", batch_size=2, seq_len=10, seed=1, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(one.state_dict())
        assert loader.step == 6
    three = TokenLoader(data, "train", batch_size=5, seq_len=10, seed=1)
    with pytest.raises(UserError, match="24 windows were consumed"):
        three.load_state_dict(one.state_dict())
    with pytest.raises(UserError, match="seq_len was 10, now 20"):
        TokenLoader(data, "train", batch_size=4, seq_len=20, seed=1).load_state_dict(one.state_dict())
    with pytest.raises(UserError, match="seed was 1, now 2"):
        TokenLoader(data, "train", batch_size=4, seq_len=10, seed=2).load_state_dict(one.state_dict())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sequential_pass_reads_every_token_once_with_a_partial_last_window(data, world):
    tokens = []
    for rank in range(world):
        loader = TokenLoader(data, "train", batch_size=4, seq_len=16, shuffle=False, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.step == 0  # a finished pass starts over
        for x, y in batches:
            assert torch.equal(x[:, 1:], y[:, :-1])
            tokens += x.flatten().tolist()
        shapes = [tuple(x.shape) for x, _ in batches]
        assert all(s[1] == 16 for s in shapes[:-1])
        if rank == 62 % world:  # 1000 = 62 * 16 + 8: the partial window (index 62) falls to this rank
            assert shapes[-1] == (1, 8)
        if world == 1:
            assert starts(batches[0][0]) == [0, 16, 32, 48]  # in order
    assert sorted(tokens) == list(range(1000))  # every token but the last is an input exactly once


def test_sequential_split_shorter_than_a_window(tmp_path):
    folder = write_split(tmp_path / "small", n_tokens=5, shard_tokens=100, split="val")
    loader = TokenLoader(folder, "val", batch_size=8, seq_len=64, shuffle=False)
    (x, y), = list(loader)
    assert x.tolist() == [[0, 1, 2, 3]] and y.tolist() == [[1, 2, 3, 4]]
    with pytest.raises(UserError, match="has 5 tokens, fewer than one window of 65"):
        TokenLoader(folder, "val", batch_size=8, seq_len=64)


def test_clear_errors(data, tmp_path):
    with pytest.raises(UserError, match="no 'val' split"):
        TokenLoader(data, "val", batch_size=1, seq_len=8)
    with pytest.raises(UserError, match="rank 2 is outside a world of 2"):
        TokenLoader(data, "train", batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(UserError, match="no prepared shards"):
        TokenLoader(tmp_path, "train", batch_size=1, seq_len=8)
    with pytest.raises(IndexError):
        TokenLoader(data, "train", batch_size=1, seq_len=8, shuffle=False).batch(10_000)
    with pytest.raises(TypeError, match="endless"):
        len(TokenLoader(data, "train", batch_size=1, seq_len=8))
    (data / "train_000003.bin").write_bytes((data / "train_000003.bin").read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        TokenLoader(data, "train", batch_size=1, seq_len=8)


def test_on_prepared_shards_batches_decode_to_corpus_text(tmp_path):
    texts = [f"Story number {i}: the fox ran over the hill and met a bird. " * 3 for i in range(40)]
    src = tmp_path / "stories.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok_path = tmp_path / "tok.json"
    tok = Tokenizer.train(texts, vocab_size=300, progress=False, workers=1)
    tok.save(tok_path)
    out = prepare(PrepareConfig(sources=[str(src)], tokenizer=str(tok_path), out=str(tmp_path / "shards"),
                                workers=1, val_fraction=0.2))
    loader = TokenLoader(out, "train", batch_size=2, seq_len=32, seed=0)
    x, _ = loader.batch(0)
    assert any(piece in tok.decode(x[0].tolist()) for piece in ("fox", "hill", "bird", "Story"))
    val = TokenLoader(out, "val", batch_size=4, seq_len=32, shuffle=False)
    text = "".join(tok.decode(x.flatten().tolist()) for x, _ in val)
    assert "Story number 0:" in text  # the first document is always in validation
    assert 3.0 < val.bytes_per_token < 30.0


def test_token_ids_beyond_the_vocabulary_name_the_shard_and_the_id(data):
    # Token p sits at stream position p; shards hold 97 tokens each, so id 500 is token 15 of train_000005.bin.
    loader = TokenLoader(data, "train", batch_size=4, seq_len=16, shuffle=False, vocab_size=500)
    for step in range(7):  # windows 0-27 end at token 448: all below 500
        loader.batch(step)
    with pytest.raises(UserError, match=r"train_000005.bin holds token id 500 \(token 15 of the file\), beyond the "
                                        r"model's vocabulary of 500"):
        loader.batch(7)
    unchecked = TokenLoader(data, "train", batch_size=4, seq_len=16, shuffle=False)
    assert int(unchecked.batch(7)[0].max()) > 500  # without vocab_size nothing is checked
    shuffled = TokenLoader(data, "train", batch_size=4, seq_len=16, vocab_size=1001)
    assert all(shuffled.batch(step)[0].shape == (4, 16) for step in range(20))  # all ids < 1001: never raises
