"""Checkpoints: plain-data round trip, RNG states, legacy files, and no code run from a file."""

from __future__ import annotations

import pathlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from autopetseg.errors import InputError
from autopetseg.models.checkpoints import load_checkpoint, restore_rng_state, rng_state, save_checkpoint

LEGACY = Path(__file__).parent / "data" / "legacy_model" / "gdfl__3d_fullres" / "fold_0" / "checkpoint_best.pt"


def _draws() -> tuple:
    """The next numbers of every generator ``rng_state`` covers (gauss draws exercise the cached value)."""
    return (
        torch.rand(5).tolist(),
        torch.randn(3).tolist(),
        np.random.rand(4).tolist(),
        np.random.standard_normal(3).tolist(),  # odd count: leaves a cached gaussian behind
        np.random.randint(0, 1 << 30, size=3).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
    )


def test_round_trip_of_plain_state_and_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    # Leave cached gaussians in numpy and random, so their saved state is not the trivial one.
    np.random.standard_normal(1)
    random.gauss(0.0, 1.0)
    state = {
        "weights": {"conv.weight": torch.randn(2, 3, 3), "conv.bias": torch.zeros(2, dtype=torch.float64)},
        "epoch": 7,
        "best_score": 0.625,
        "nothing": None,
        "log": [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 0.75, "note": "ok"}],
        "shape": (80, 16, 40),
        "flags": [True, False],
        "rng": rng_state(),
    }
    expected = _draws()
    path = tmp_path / "sub" / "checkpoint.pt"
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary left behind

    _draws()  # move every generator on
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"]["conv.weight"], state["weights"]["conv.weight"])
    assert loaded["weights"]["conv.bias"].dtype == torch.float64
    assert loaded["epoch"] == 7 and loaded["best_score"] == 0.625 and loaded["nothing"] is None
    assert loaded["log"] == state["log"] and loaded["shape"] == (80, 16, 40) and loaded["flags"] == [True, False]
    restore_rng_state(loaded["rng"])
    assert _draws() == expected


def test_rng_state_is_plain_data(tmp_path):
    """Only torch's own types: a bare weights-only load (no numpy globals allowed) reads it."""
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": rng_state()})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)


def test_legacy_checkpoint_loads_and_restores_its_rng():
    state = load_checkpoint(LEGACY)
    assert state["trainer"] == "gdfl"
    assert any(k.endswith(".weight") for k in state["network"])
    kind, key, pos, has_gauss, cached = state["rng"]["numpy"]  # the legacy tuple, with its ndarray key
    assert kind == "MT19937" and isinstance(key, np.ndarray) and key.dtype == np.uint32

    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    expected = _draws()
    _draws()
    restore_rng_state(state["rng"])
    assert _draws() == expected


class Evil:
    """Pickles as a call that creates ``marker``: what an ordinary ``torch.load`` would run."""

    def __init__(self, marker: Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_is_not_run(tmp_path):
    # Control: the payload does run under an unsafe load, so the test below means something.
    control = tmp_path / "control_marker"
    torch.save({"x": Evil(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"network": {"w": torch.zeros(2)}, "x": Evil(marker)}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "not plain data" in message and "\n" not in message


def test_disallowed_global_is_refused(tmp_path):
    """A harmless but unlisted class (fractions.Fraction) is refused as well: only data is read."""
    from fractions import Fraction

    path = tmp_path / "fraction.pt"
    torch.save({"ratio": Fraction(1, 3)}, path)
    with pytest.raises(InputError, match="not plain data"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"w": torch.randn(1000), "rng": rng_state()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        load_checkpoint(path, what="checkpoint")
    message = str(info.value)
    assert str(path) in message and "unreadable" in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})])
def test_foreign_file(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="unreadable"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(InputError, match="not a dict"):
        load_checkpoint(path)
