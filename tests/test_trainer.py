"""The training engine on the CPU: learning, checkpoints, resuming, AMP options, DDP with gloo.

Everything runs on the tiny cache of ``_cache_helpers`` (32^3 phantoms, a bright sphere as the
lesion). The learning test trains a small GDFL model for 200 iterations and asserts validation
DSC > 0.5; the others train a few iterations and check the machinery.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _cache_helpers import DATASET, write_tiny_cache
from autopetseg.training.config import AugmentationConfig, TrainerConfig
from autopetseg.training.data_loader import load_cached_case, make_train_loader
from autopetseg.training.run import prepare_trainer, run_training
from autopetseg.training.trainer import CHECKPOINT_BEST, CHECKPOINT_FINAL, CHECKPOINT_LATEST, Trainer

TESTS = Path(__file__).resolve().parent
FOLD_SUBDIR = Path(DATASET) / "gdfl__3d_fullres" / "fold_0"


class _Interrupted(Exception):
    """Stands for a job killed after an epoch's checkpoint was written."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preprocessed")
    write_tiny_cache(root, n_cases=10, n_lesion_free=3, seed=0)
    return root


def _train(cache: Path, results: Path, **settings) -> Path:
    settings.setdefault("device", "cpu")
    settings.setdefault("num_workers", 0)
    return run_training(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=results, **settings)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_log(fold_dir: Path) -> list[dict]:
    with open(fold_dir / "training_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _interrupt_after(monkeypatch, last_epoch: int) -> None:
    original = Trainer.end_epoch

    def end_epoch(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == last_epoch:
            raise _Interrupted

    monkeypatch.setattr(Trainer, "end_epoch", end_epoch)


def _assert_same_tensors(a, b, what: str) -> None:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


# --------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """A small GDFL model trained on the CPU: 8 epochs x 25 iterations, the paper's Adam 1e-3 + cosine.

    About 20 s of CPU time with one thread. DSC per epoch (seed 0): 0.06 0.06 0.63 0.74 0.82 0.85
    0.86 0.88; with only 4 x 20 iterations the cosine schedule has decayed before the network has
    left its initial state (DSC ~0.1).
    """
    return _train(cache, tmp_path_factory.mktemp("results"), epochs=8, iterations_per_epoch=25, seed=0)


@pytest.mark.slow
def test_tiny_gdfl_model_learns_to_segment(trained):
    validation = json.loads((trained / "validation.json").read_text())
    assert validation["mean_dsc"] > 0.5, validation
    # The model also finds the lesions: no validation lesion missed completely.
    positive = [c for c in validation["cases"].values() if c["gt_positive"]]
    assert positive and all(c["dsc"] > 0.3 for c in positive), validation


@pytest.mark.slow
def test_results_folder_best_checkpoint_and_validation_json(trained, cache):
    for name in (CHECKPOINT_BEST, CHECKPOINT_LATEST, CHECKPOINT_FINAL, "config.json", "progress.png", "validation.json"):
        assert (trained / name).is_file(), name
    assert (trained / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained.parent / "plans.json").is_file() and (trained.parent / "dataset.json").is_file()

    log = _read_log(trained)
    assert [int(r["epoch"]) for r in log] == list(range(8))
    dscs = [float(r["val_mean_dsc"]) for r in log]
    lrs = [float(r["lr"]) for r in log]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))  # cosine, per iteration
    best_epoch = int(np.argmax(dscs))  # argmax: the first of equal maxima, as the trainer keeps ties

    best, final = _load(trained / CHECKPOINT_BEST), _load(trained / CHECKPOINT_FINAL)
    assert best["epoch"] == best_epoch and best["best_epoch"] == best_epoch
    assert best["best_score"] == pytest.approx(max(dscs))
    assert final["epoch"] == 7 and _load(trained / CHECKPOINT_LATEST)["epoch"] == 7

    validation = json.loads((trained / "validation.json").read_text())
    config = json.loads((trained / "config.json").read_text())
    assert validation["epoch"] == best_epoch and validation["mean_dsc"] == pytest.approx(max(dscs))
    assert set(validation["cases"]) == set(config["val_cases"])
    positive = [c["dsc"] for c in validation["cases"].values() if c["gt_positive"]]
    assert validation["mean_dsc"] == pytest.approx(np.mean(positive))
    for case in validation["cases"].values():
        assert {"dsc", "fpv_ml", "fnv_ml", "gt_positive"} <= set(case)

    # checkpoint_best holds the weights that scored validation.json: validating them again agrees.
    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=trained.parents[2],
                              device="cpu", num_workers=0)
    trainer.network = trainer.build_network()
    trainer.network.load_state_dict(best["network"])
    trainer.val_cases = [load_cached_case(trainer.data_dir, c) for c in trainer.val_case_ids]
    again = trainer.validate()
    assert again["summary"]["mean_dsc"] == pytest.approx(validation["mean_dsc"], abs=1e-6)


def test_best_checkpoint_follows_mean_dsc_and_keeps_earlier_ties(cache, tmp_path):
    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path,
                              device="cpu", epochs=5, iterations_per_epoch=1, num_workers=0)
    trainer.setup()

    def validation(dsc):
        return {"summary": {"mean_dsc": dsc, "mean_fpv_ml": 0.0, "mean_fnv_ml": 0.0, "n_cases": 1, "n_positive": 1},
                "cases": {"case_x": {"dsc": dsc, "fpv_ml": 0.0, "fnv_ml": 0.0, "gt_positive": True}}}

    fold = trainer.output_dir
    for epoch, (dsc, expected_best) in enumerate([(0.2, 0), (0.6, 1), (0.4, 1), (0.6, 1), (0.7, 4)]):
        trainer.end_epoch(epoch, 1.0, 1e-3, validation(dsc), 0.1)
        assert _load(fold / CHECKPOINT_BEST)["epoch"] == expected_best
        assert json.loads((fold / "validation.json").read_text())["epoch"] == expected_best
        assert _load(fold / CHECKPOINT_LATEST)["epoch"] == epoch
    assert trainer.best_epoch == 4 and trainer.best_score == pytest.approx(0.7)

    # No lesion-positive validation case: DSC undefined in every epoch, the latest epoch is kept.
    other = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path / "nan",
                            device="cpu", epochs=3, iterations_per_epoch=1, num_workers=0)
    other.setup()
    for epoch in range(3):
        other.end_epoch(epoch, 1.0, 1e-3, validation(math.nan), 0.1)
        assert _load(other.output_dir / CHECKPOINT_BEST)["epoch"] == epoch
    assert json.loads((other.output_dir / "validation.json").read_text())["mean_dsc"] is None


# --------------------------------------------------------------------------- resuming
def test_continue_resumes_at_the_next_epoch_and_matches_an_uninterrupted_run(cache, tmp_path, monkeypatch):
    settings = dict(epochs=3, iterations_per_epoch=4, seed=5)
    reference = _train(cache, tmp_path / "reference", **settings)

    _interrupt_after(monkeypatch, last_epoch=1)
    with pytest.raises(_Interrupted):
        _train(cache, tmp_path / "resumed", **settings)
    monkeypatch.undo()
    fold = tmp_path / "resumed" / FOLD_SUBDIR
    saved = _load(fold / CHECKPOINT_LATEST)
    assert saved["epoch"] == 1 and not (fold / CHECKPOINT_FINAL).exists()

    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path / "resumed",
                              device="cpu", num_workers=0, **settings)
    trainer.setup(continue_training=True)
    assert trainer.start_epoch == 2
    _assert_same_tensors(trainer.optimizer.state_dict(), saved["optimizer"], "optimizer")
    assert trainer.scheduler.state_dict() == saved["scheduler"]
    assert trainer.scheduler.last_epoch == 2 * 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(saved["optimizer"]["param_groups"][0]["lr"])
    _assert_same_tensors(trainer.network.state_dict(), saved["network"], "network")
    assert [r["epoch"] for r in trainer.log_rows] == [0, 1]
    trainer.fit()

    # Same seed on the CPU: the resumed run ends bit-identical to the uninterrupted one (same
    # batches, thanks to per-batch seeding, and the same optimizer and scheduler state).
    ref_final, final = _load(reference / CHECKPOINT_FINAL), _load(fold / CHECKPOINT_FINAL)
    _assert_same_tensors(final["network"], ref_final["network"], "network")
    _assert_same_tensors(final["optimizer"], ref_final["optimizer"], "optimizer")
    assert final["scheduler"] == ref_final["scheduler"]
    ref_log, log = _read_log(reference), _read_log(fold)
    assert [r["epoch"] for r in log] == ["0", "1", "2"]
    assert [(r["train_loss"], r["lr"], r["val_mean_dsc"]) for r in log] == [
        (r["train_loss"], r["lr"], r["val_mean_dsc"]) for r in ref_log
    ]


def test_continue_with_more_epochs_trains_only_the_new_ones(cache, tmp_path):
    fold = _train(cache, tmp_path, epochs=2, iterations_per_epoch=2, seed=1)
    first = _load(fold / CHECKPOINT_FINAL)
    assert first["scheduler"]["last_epoch"] == 4

    # Asking again for the same number of epochs trains nothing.
    _train(cache, tmp_path, epochs=2, iterations_per_epoch=2, seed=1, continue_training=True)
    _assert_same_tensors(_load(fold / CHECKPOINT_FINAL)["network"], first["network"], "network")
    assert len(_read_log(fold)) == 2

    _train(cache, tmp_path, epochs=3, iterations_per_epoch=2, seed=1, continue_training=True)
    extended = _load(fold / CHECKPOINT_FINAL)
    assert extended["epoch"] == 2 and extended["scheduler"]["last_epoch"] == 6
    log = _read_log(fold)
    assert [int(r["epoch"]) for r in log] == [0, 1, 2]
    # The 2-epoch run ended at lr 0; the extension continues on the 3-epoch cosine from step 4 of 6.
    assert float(log[2]["lr"]) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))
    assert not all(torch.equal(extended["network"][k], first["network"][k]) for k in first["network"])


# --------------------------------------------------------------------------- AMP and memory format
def test_fp16_grad_scaler_state_is_saved_and_restored(cache, tmp_path, monkeypatch):
    settings = dict(epochs=2, iterations_per_epoch=2, amp=True, amp_dtype="fp16", seed=2)
    _interrupt_after(monkeypatch, last_epoch=0)
    with pytest.raises(_Interrupted):
        _train(cache, tmp_path, **settings)
    monkeypatch.undo()
    fold = tmp_path / FOLD_SUBDIR
    assert json.loads((fold / "config.json").read_text())["amp_dtype"] == "float16"
    latest = fold / CHECKPOINT_LATEST
    state = _load(latest)
    assert state["scaler"] and state["scaler"]["scale"] > 0
    # Mark the saved scaler so that restoring it cannot be mistaken for a fresh one.
    state["scaler"].update(scale=1234.0, _growth_tracker=7)
    torch.save(state, latest)

    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path,
                              device="cpu", num_workers=0, **settings)
    trainer.setup(continue_training=True)
    assert trainer.start_epoch == 1
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 1234.0
    assert trainer.scaler.state_dict()["_growth_tracker"] == 7
    trainer.fit()
    final = _load(fold / CHECKPOINT_FINAL)
    assert final["scaler"]["scale"] > 0 and all(math.isfinite(float(r["train_loss"])) for r in _read_log(fold))


def test_bf16_autocast_and_channels_last_3d_train_on_cpu(cache, tmp_path):
    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path, device="cpu",
                              epochs=1, iterations_per_epoch=2, num_workers=0, amp=True, amp_dtype="bf16",
                              channels_last_3d=True)
    fold = trainer.run()
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    conv = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert json.loads((fold / "config.json").read_text())["amp_dtype"] == "bfloat16"
    row = _read_log(fold)[0]
    assert math.isfinite(float(row["train_loss"])) and row["val_mean_dsc"] != ""
    assert all(torch.isfinite(t).all() for t in _load(fold / CHECKPOINT_FINAL)["network"].values() if t.is_floating_point())


def test_output_prior_starts_training_from_background(cache, tmp_path):
    image = torch.from_numpy(np.array(load_cached_case(cache / DATASET / "3d_fullres", "case_005").image))[None]

    def lesion_probability(**settings):
        trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path,
                                  device="cpu", num_workers=0, **settings)
        trainer.setup()
        trainer.network.eval()
        with torch.no_grad():
            return torch.softmax(trainer.network(image), 1)[0, 1], torch.sigmoid(trainer.network(image))[0]

    softmax_plain, _ = lesion_probability()
    softmax_prior, sigmoid_prior = lesion_probability(output_prior=0.01)
    assert 0.1 < float(softmax_plain.mean()) < 0.9  # PyTorch's initialisation: undecided
    # The prior: a softmax lesion probability of 0.01 (not 0.01² = 0.0001), the weights' noise around it.
    assert float(softmax_prior.median()) == pytest.approx(0.01, abs=0.005)
    assert float(softmax_prior.quantile(0.9)) < 0.02
    assert float(sigmoid_prior[1].median()) == pytest.approx(0.01, abs=0.005)  # the lesion channel's sigmoid


@pytest.mark.parametrize("prior", [0.01, 0.001, 0.3])
def test_output_prior_bias_gives_the_softmax_probability_exactly(cache, tmp_path, prior):
    trainer = prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path,
                              device="cpu", num_workers=0, output_prior=prior)
    trainer.setup()
    bias = [m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
            and m.out_channels == 2 and m.bias is not None]
    lesion = torch.softmax(bias[-1].bias.detach(), dim=0)[1]
    assert float(lesion) == pytest.approx(prior, abs=1e-3 * prior)


def test_output_prior_of_a_one_channel_sigmoid_model_is_the_lesion_probability(cache, tmp_path, monkeypatch):
    """A sigmoid stage's single channel is the lesion: the prior sets it to p, not to 1 - p."""
    from autopetseg.models.methods import OutputSpec
    from autopetseg.training import variants

    class SigmoidTrainer(variants.GDFLTrainer):
        name = "sigmoid_test"
        output = OutputSpec(activation="sigmoid", channels=1, lesion_channel=0)

    monkeypatch.setitem(variants.TRAINERS, SigmoidTrainer.name, SigmoidTrainer)
    image = torch.from_numpy(np.array(load_cached_case(cache / DATASET / "3d_fullres", "case_005").image))[None]
    trainer = SigmoidTrainer(prepare_trainer(cache / DATASET, 0, "gdfl", preprocessed_root=cache, results_root=tmp_path,
                                             device="cpu").plans, "3d_fullres", cache / DATASET / "3d_fullres",
                             tmp_path / "sigmoid", ["case_005"], [], config=SigmoidTrainer.default_config().replace(
                                 output_prior=0.01, num_workers=0), device="cpu")
    trainer.setup()
    trainer.network.eval()
    with torch.no_grad():
        lesion = torch.sigmoid(trainer.network(image))[0, 0]
    assert float(lesion.median()) == pytest.approx(0.01, abs=0.005)


# --------------------------------------------------------------------------- data stream
def test_batch_stream_is_independent_of_workers_and_resumable(cache):
    data_dir = cache / DATASET / "3d_fullres"
    cases = [load_cached_case(data_dir, f"case_{i:03d}") for i in range(6)]
    aug = AugmentationConfig()

    def batches(n, **kw):
        loader = make_train_loader(cases, (16, 16, 16), 2, 0.5, aug, seed=4, **kw)
        return [next(loader) for _ in range(n)]

    inline = batches(5)
    workers = batches(5, num_workers=2)
    resumed = batches(2, start_batch=3)
    other_rank = batches(1, rank=1)
    for a, b in zip(inline, workers):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
    for a, b in zip(inline[3:], resumed):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(inline[0]["data"], other_rank[0]["data"])
    # foreground share 0.5 with batch 2: exactly one lesion-centred patch per batch.
    assert all(int(b["foreground"].sum()) == 1 for b in inline)
    assert all(b["data"].shape == (2, 2, 16, 16, 16) and b["target"].shape == (2, 1, 16, 16, 16) for b in inline)


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_on_cpu_agrees_on_weights_and_only_rank0_writes(tmp_path):
    preprocessed = tmp_path / "preprocessed"
    write_tiny_cache(preprocessed, n_cases=6, n_lesion_free=1, seed=1)
    results, report = tmp_path / "results", tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(TESTS / "_ddp_worker.py"), str(preprocessed), str(results), str(report)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # DDP broadcasts rank 0's initial weights; training changes them identically on both ranks.
    assert ranks[0]["hash_after_setup"] == ranks[1]["hash_after_setup"]
    assert ranks[0]["hash_final"] == ranks[1]["hash_final"] != ranks[0]["hash_after_setup"]
    # ... although each rank trained on its own patches.
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]

    fold = Path(ranks[0]["fold_dir"])
    sys.path.insert(0, str(TESTS))
    from _ddp_worker import state_hash

    network = prepare_trainer(preprocessed / DATASET, 0, "gdfl", preprocessed_root=preprocessed, results_root=results,
                              device="cpu").build_network()
    network.load_state_dict(_load(fold / CHECKPOINT_FINAL)["network"])
    assert state_hash(network) == ranks[0]["hash_final"]
    assert json.loads((fold / "config.json").read_text())["world_size"] == 2
    assert len(_read_log(fold)) == 2

    # Only rank 0 touched the results folder and the cache (splits.json).
    assert ranks[1]["writes"] == []
    written = {Path(w.split(" ", 1)[1]).name for w in ranks[0]["writes"] if w.startswith("os.rename")}
    assert {"splits.json", "plans.json", "config.json", CHECKPOINT_LATEST, CHECKPOINT_BEST, CHECKPOINT_FINAL,
            "validation.json", "training_log.csv", "progress.png"} <= written


@pytest.mark.parametrize("cores,device,expected", [(2, "cpu", 0), (4, "cpu", 0), (16, "cpu", 1), (16, "cuda", 12), (4, "cuda", 3)])
def test_default_loader_workers_leave_few_cpu_cores_to_torch(monkeypatch, cores, device, expected):
    trainer = Trainer.__new__(Trainer)  # only the resolution logic, no data or network
    trainer.config = TrainerConfig()
    trainer.device = torch.device(device)
    monkeypatch.setattr(Trainer, "_cores_per_process", lambda self: cores)
    assert trainer._resolve_num_workers() == expected
