"""ptsne.digest and the checks of ``ParametricTSNE.load``: a changed, damaged or inconsistent
model file is refused with an error that names it; a model saved before sums were recorded
loads with a warning."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ptsne import ParametricTSNE, digest
from ptsne.errors import DigestMismatchError, ModelFileError
from ptsne.estimator import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import gaussian_blobs

DIM = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model with a PCA and a reference (every part that ``load`` checks), and its data."""
    X, _ = gaussian_blobs(150, DIM, 3)
    est = ParametricTSNE(n_epochs=1, perplexity=5, hidden_layers=(8,), pca_components=4, reference_size=100,
                         reference_iter=10, random_state=0, device="cpu").fit(X)
    return est.save(tmp_path_factory.mktemp("saved") / "model"), X


@pytest.fixture
def model(saved, tmp_path):
    """A fresh copy of the saved model directory."""
    return shutil.copytree(saved[0], tmp_path / "model")


def test_save_records_the_sha256_of_config_and_weights(model):
    lines = (model / digest.SUMS_FILE).read_text().splitlines()
    expected = [f"{hashlib.sha256((model / n).read_bytes()).hexdigest()}  {n}" for n in sorted([CONFIG_FILE,
                                                                                                 WEIGHTS_FILE])]
    assert lines == expected
    assert digest.read(model) == digest.compute(model, [CONFIG_FILE, WEIGHTS_FILE])
    if shutil.which("sha256sum"):  # the format of coreutils
        subprocess.run(["sha256sum", "--check", "--quiet", digest.SUMS_FILE], cwd=model, check=True)


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_load_refuses_a_file_changed_after_the_save(model, name):
    data = bytearray((model / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: still valid JSON / safetensors, other numbers
    (model / name).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as err:
        ParametricTSNE.load(model)
    assert str(err.value).startswith(f"{model / name}: sha256 ") and "SHA256SUMS" in str(err.value)
    assert err.value.file == str(model / name) and isinstance(err.value, ValueError)


def test_model_without_sums_loads_with_a_warning(saved, model, caplog):
    (model / digest.SUMS_FILE).unlink()  # as saved before sums were recorded
    with caplog.at_level(logging.WARNING, logger="ptsne.digest"):
        loaded = ParametricTSNE.load(model)
    assert any("no SHA256SUMS" in r.getMessage() and str(model) in r.getMessage() for r in caplog.records)
    X = saved[1]
    np.testing.assert_array_equal(loaded.transform(X[:10]), ParametricTSNE.load(saved[0]).transform(X[:10]))


def test_sums_file_that_is_garbled_or_incomplete_is_refused(model):
    sums = (model / digest.SUMS_FILE).read_text()
    (model / digest.SUMS_FILE).write_text("not a sums file\n")
    with pytest.raises(ModelFileError, match=rf"^{model / digest.SUMS_FILE}: line 1 "):
        ParametricTSNE.load(model)
    (model / digest.SUMS_FILE).write_text(sums.splitlines()[0] + "\n")  # the weights' line removed
    with pytest.raises(DigestMismatchError, match=rf"^{model / WEIGHTS_FILE}: no sha256 recorded"):
        ParametricTSNE.load(model)


def test_verify_against_sums_recorded_elsewhere(model):
    sums = digest.read(model)
    assert digest.verify(model, sums, expected=sums, source="the registry")
    wrong = dict(sums, **{WEIGHTS_FILE: "0" * 64})
    with pytest.raises(DigestMismatchError, match=rf"^{model / WEIGHTS_FILE}: .* recorded in the registry"):
        digest.verify(model, [CONFIG_FILE, WEIGHTS_FILE], expected=wrong, source="the registry")


# -- a model whose sums are right but whose files are not: what a buggy writer or a copy by hand leaves


def _config(model, **changes):
    config = json.loads((model / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (model / CONFIG_FILE).write_text(json.dumps(config))


def _tensors(model, change):
    tensors = load_file(str(model / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(model / WEIGHTS_FILE))


def _nan(tensors):
    key = next(k for k in sorted(tensors) if k.startswith("mapper.") and k.endswith("weight"))
    tensors[key][0, 0] = float("nan")


CORRUPTIONS = {
    "config not JSON": (lambda m: (m / CONFIG_FILE).write_text('{"format_version": 1,'), CONFIG_FILE,
                        "not readable JSON"),
    "config a list": (lambda m: (m / CONFIG_FILE).write_text("[]"), CONFIG_FILE, "JSON object"),
    "config key missing": (lambda m: _config(m, n_inputs=None), CONFIG_FILE, "n_inputs must be a positive integer"),
    "unknown format": (lambda m: _config(m, format_version=99), CONFIG_FILE, "format_version 99"),
    "unknown param": (lambda m: _config(m, params={**json.loads((m / CONFIG_FILE).read_text())["params"],
                                                   "bogus": 1}), CONFIG_FILE, "params"),
    "other network": (lambda m: _config(m, params={**json.loads((m / CONFIG_FILE).read_text())["params"],
                                                   "hidden_layers": [9]}), CONFIG_FILE, "shapes differ from the weights"),
    "n_features_in": (lambda m: _config(m, n_features_in=DIM + 1), WEIGHTS_FILE, "n_features_in=7"),
    "weights truncated": (lambda m: (m / WEIGHTS_FILE).write_bytes((m / WEIGHTS_FILE).read_bytes()[:100]),
                          WEIGHTS_FILE, "not a readable safetensors file"),
    "weights NaN": (lambda m: _tensors(m, _nan), WEIGHTS_FILE, "non-finite"),
    "PCA missing": (lambda m: _tensors(m, lambda t: [t.pop(k) for k in list(t) if k.startswith("pca.")]),
                    CONFIG_FILE, "holds no PCA"),
    "reference missing": (lambda m: _tensors(m, lambda t: t.pop("reference.vectors")), WEIGHTS_FILE,
                          "reference.vectors"),
    "reference 3-D": (lambda m: _tensors(m, lambda t: t.update({"reference.embedding": torch.zeros(100, 3)})),
                      WEIGHTS_FILE, "do not fit n_inputs=4 and n_components=2"),
    "reference settings": (lambda m: _config(m, reference={"dof": 1.0, "config": {"size": -1}, "size": 100}),
                           CONFIG_FILE, "reference settings"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_names_the_file_of_an_inconsistent_model(model, case):
    corrupt, name, what = CORRUPTIONS[case]
    corrupt(model)
    digest.write(model, [CONFIG_FILE, WEIGHTS_FILE])  # the sums match: the check under test is the content's
    with pytest.raises(ModelFileError) as err:
        ParametricTSNE.load(model)
    assert not isinstance(err.value, DigestMismatchError)
    message = str(err.value)
    assert message.startswith(f"{model / name}: ") and what in message, message
    assert "\n" not in message


def test_missing_weights_are_named(model):
    (model / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFileError, match=rf"^{model / WEIGHTS_FILE}: missing"):
        ParametricTSNE.load(model)
    (model / digest.SUMS_FILE).unlink()
    with pytest.raises(ModelFileError, match=rf"^{model / WEIGHTS_FILE}: missing"):
        ParametricTSNE.load(model)


def test_model_file_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(DigestMismatchError("/m/model.safetensors", "sha256 differs")))
    assert type(err) is DigestMismatchError and err.file == "/m/model.safetensors"
    assert str(err) == "/m/model.safetensors: sha256 differs"


# -- a config forged to describe a huge network is refused before it is allocated ------------------

#: Loads the model of argv[1] and runs `ptsne embed --model` on it under an address-space limit far
#: below the forged network (3 layers of 100000: 80 GB), printing what each raised or returned.
_LOAD_UNDER_LIMIT = r"""
import json, logging, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from jobs.cli import main
from ptsne import ParametricTSNE
out = {}
try:
    ParametricTSNE.load(sys.argv[1])
    out["load"] = "loaded"
except Exception as exc:
    out["load"] = f"{type(exc).__name__}: {exc}"
records = []
logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
out["embed"] = main(["embed", "--model", sys.argv[1], "--input", sys.argv[2], "--output", sys.argv[3], "--no-progress"])
out["errors"] = records
print(json.dumps(out))
"""


def test_a_config_describing_another_network_is_refused_before_anything_is_allocated(model, tmp_path):
    import os
    import sys
    from pathlib import Path

    config = json.loads((model / CONFIG_FILE).read_text())
    config["params"]["hidden_layers"] = [100_000] * 3
    (model / CONFIG_FILE).write_text(json.dumps(config))
    digest.write(model, [CONFIG_FILE, WEIGHTS_FILE])  # the sums rewritten too: they pass
    (tmp_path / "in").mkdir()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _LOAD_UNDER_LIMIT, str(model), str(tmp_path / "in"),
                           str(tmp_path / "out")], cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["load"].startswith(f"ModelFileError: {model / CONFIG_FILE}: describes a network whose shapes "
                                  "differ from the weights"), out
    assert "(100000, 4)" in out["load"] and "(8, 4)" in out["load"]  # the first layer: config against file
    assert out["embed"] == 4, out  # exit 4, naming the file
    assert len(out["errors"]) == 1 and str(model / CONFIG_FILE) in out["errors"][0], out["errors"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
