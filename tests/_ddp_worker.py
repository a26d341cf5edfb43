"""One rank of the two-process DDP test (``tests/test_trainer.py``), started by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py PREPROCESSED RESULTS REPORT_DIR

Trains fold 0 of the tiny cache through ``run_training`` (the CLI's entry point) on the CPU with
gloo, and writes ``REPORT_DIR/rank<r>.json`` (outside the results folder) with what the test
checks: a hash of this rank's weights after setup and after training, a hash of the first batch
it trained on, and every file-system write it made under PREPROCESSED or RESULTS, recorded with
an audit hook (``open`` for writing, ``os.rename``/``os.replace``, ``os.mkdir``, ``os.remove``),
which catches every write of ``atomic_path`` whatever the writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from autopetseg.training.run import run_training  # noqa: E402
from autopetseg.training.trainer import Trainer  # noqa: E402

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    preprocessed, results, report_dir = (Path(a).resolve() for a in sys.argv[1:4])
    rank = int(os.environ["RANK"])
    watched = (str(preprocessed), str(results))
    writes: list[str] = []

    def audit(event: str, args) -> None:
        paths = []
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing:
                paths = [path]
        elif event in ("os.rename", "shutil.copyfile"):
            paths = [args[1]]
        elif event in ("os.mkdir", "os.remove", "os.rmdir"):
            paths = [args[0]]
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                text = os.fsdecode(p)
                if text.startswith(watched):
                    writes.append(f"{event} {text}")

    report: dict = {"rank": rank}
    original_setup, original_step = Trainer.setup, Trainer.train_step

    def setup(self, *args, **kwargs):
        original_setup(self, *args, **kwargs)
        report["hash_after_setup"] = state_hash(self.network)
        report["world_size"] = self.dist.world_size
        report["trainer"] = self

    def train_step(self, batch):
        if "first_batch" not in report:
            report["first_batch"] = hashlib.sha256(batch["data"].numpy().tobytes()).hexdigest()
        return original_step(self, batch)

    Trainer.setup, Trainer.train_step = setup, train_step
    sys.addaudithook(audit)
    fold_dir = run_training(
        preprocessed / "Dataset900_TinyTrain",
        0,
        "gdfl",
        preprocessed_root=preprocessed,
        results_root=results,
        device="cpu",
        epochs=2,
        iterations_per_epoch=3,
        num_workers=0,
        seed=3,
    )
    trainer = report.pop("trainer")
    report["hash_final"] = state_hash(trainer.network)
    report["fold_dir"] = str(fold_dir)
    report["writes"] = list(writes)  # copy before our own report write below is audited
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
