"""What the checkpoint checksums cost: save and verify times for GPT-2 124M with a full AdamW state.

    python bench/checkpoint_checksums.py                  # gpt2 preset (124M), folder under the current directory
    python bench/checkpoint_checksums.py --preset tiny --dir /tmp

Every checkpoint gets a SHA256SUMS file (minigpt/runs/checkpoint.py); loading a model (runs/loading.py) verifies
model.safetensors and model.json, resuming also trainer.pt. This times `save_checkpoint` with the hashing broken
out, then `verify_checkpoint` both ways. The optimizer state is filled with random moments so trainer.pt has its
real size. Files are read back from the page cache, so this is the hashing cost, not the disk's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from minigpt.model.gpt import GPT, ModelConfig
from minigpt.runs import checkpoint as ckptlib
from minigpt.runs.loading import verify_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model preset (default: gpt2)")
    parser.add_argument("--dir", default=".", help="where to write the temporary run folder (default: .)")
    parser.add_argument("--repeats", type=int, default=2, help="saves to time (default: 2)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(args.preset))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                              "exp_avg_sq": torch.rand_like(p)}
    trainer_state = {"optimizer": optimizer.state_dict(), "step": 1}

    hashing: list[float] = []
    write_checksums = ckptlib.write_checksums

    def timed_checksums(folder):
        start = time.perf_counter()
        write_checksums(folder)
        hashing.append(time.perf_counter() - start)

    ckptlib.write_checksums = timed_checksums
    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    try:
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            path = ckptlib.save_checkpoint(root, model, step, {}, trainer_state, keep_last=1)
            total = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
            print(f"save {step}: {total:.2f} s in all, {hashing[-1]:.2f} s of it hashing, {size:,.0f} MB")
        for need_trainer in (False, True):
            start = time.perf_counter()
            verify_checkpoint(path, need_trainer=need_trainer)
            what = "resume (weights, trainer state)" if need_trainer else "load (weights)"
            print(f"verify for {what}: {time.perf_counter() - start:.2f} s")
    finally:
        ckptlib.write_checksums = write_checksums
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
