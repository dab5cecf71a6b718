"""scripts/average_models.py: the weighted mean of packaged models."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import average_models  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "whisfusion_cli" / "assets" / "default"


def _model(directory: Path, scale: float) -> Path:
    directory.mkdir(parents=True)
    save_file({"a": np.full((2, 3), scale, np.float16), "b": np.arange(4, dtype=np.float32) * scale},
              str(directory / "model.safetensors"))
    shutil.copy(DEFAULT / "config.json", directory / "config.json")
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_weighted_mean_in_the_first_models_dtype(tmp_path):
    a, b = _model(tmp_path / "a", 1.0), _model(tmp_path / "b", 3.0)
    average_models.main([str(tmp_path / "out"), f"{a}:0.25", f"{b}:0.75"])
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["a"].dtype == np.float16 and np.all(out["a"] == 2.5)
    np.testing.assert_allclose(out["b"], np.arange(4) * 2.5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["training"]["average"] == [{"model": "a", "weight": 0.25}, {"model": "b", "weight": 0.75}]
    assert config["decoding"] == json.loads((DEFAULT / "config.json").read_text())["decoding"]


def test_weights_are_normalised():
    parts = [({"x": np.ones(2, np.float32)}, 2.0), ({"x": np.zeros(2, np.float32)}, 2.0)]
    np.testing.assert_allclose(average_models.average(parts)["x"], [0.5, 0.5])


def test_models_of_different_shapes_are_refused(tmp_path, capsys):
    a = _model(tmp_path / "a", 1.0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    save_file({"a": np.ones((3, 3), np.float16), "b": np.ones(4, np.float32)}, str(b / "model.safetensors"))
    with pytest.raises(SystemExit, match="different tensors"):
        average_models.main([str(tmp_path / "out"), f"{a}:1", f"{b}:1"])
    with pytest.raises(SystemExit, match="no model.safetensors"):
        average_models.main([str(tmp_path / "out"), f"{tmp_path}:1"])
    with pytest.raises(SystemExit):
        average_models.main([str(tmp_path / "out"), f"{a}"])  # no weight: argparse's own one-line error
    assert "expected MODEL_DIR:WEIGHT" in capsys.readouterr().err
