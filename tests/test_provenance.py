"""bissl_det.utils.provenance: every key, checked against independent computations."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
from datetime import datetime

from bissl_det.runtime.records import provenance, write_results
from bissl_det.utils.provenance import git_state, utc_now
from tests.helpers import REPO, TINY_C4, tiny_config

import pytest


def test_provenance_keys_and_values(in_demo_workdir, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really a checkpoint")
    cfg = tiny_config(TINY_C4, tmp_path / "out", "MODEL.WEIGHTS", str(weights), "SEED", "7")
    (tmp_path / "out" / "config.yaml").write_text(cfg.dump())
    start = utc_now()
    prov = provenance(cfg, start_time=start, config_file=str(TINY_C4))
    assert set(prov) == {"git", "command", "config_file", "config", "config_values", "weights",
                         "seed", "data", "versions", "hostname", "start_time",
                         "end_time"}  # fmt: skip
    assert prov["config_values"]["BISSL.STAGES"] == cfg.BISSL.STAGES
    assert "SEED" not in prov["config_values"] and "OUTPUT_DIR" not in prov["config_values"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    if head.returncode == 0:  # a git checkout (an exported tree has no commit to record)
        assert prov["git"]["commit"] == head.stdout.strip()
        assert isinstance(prov["git"]["dirty"], bool)
    else:
        assert prov["git"] == {"commit": None, "dirty": None}
    assert prov["config_file"]["sha256"] == hashlib.sha256(TINY_C4.read_bytes()).hexdigest()
    assert prov["weights"] == {
        "path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()
    }  # fmt: skip
    assert prov["config"]["path"] == str(tmp_path / "out" / "config.yaml")
    assert prov["seed"] == 7
    # The conftest demo set: 24 trainval and 8 test images.
    assert prov["data"]["train"] == {"demo_voc_trainval": 24}
    assert prov["data"]["test"] == {"demo_voc_test": 8}
    assert prov["versions"]["python"] == platform.python_version()
    assert {"torch", "torchvision", "detectron2", "bissl_det"} <= set(prov["versions"])
    assert prov["hostname"] == socket.gethostname()
    assert datetime.fromisoformat(prov["start_time"]) <= datetime.fromisoformat(prov["end_time"])
    assert prov["end_time"].endswith("+00:00")


def test_git_state_outside_a_checkout_is_none(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_missing_weights_and_unloadable_data_do_not_fail(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_C4, tmp_path / "out", "MODEL.WEIGHTS", "detectron2://x.pkl")
    cfg.defrost()
    cfg.DATASETS.TEST = ("no_such_dataset",)
    prov = provenance(cfg)
    assert prov["weights"] == {"path": "detectron2://x.pkl", "sha256": None}
    assert prov["data"]["test"]["no_such_dataset"].startswith("error: KeyError")


def test_write_results_adds_units_and_provenance(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_C4, tmp_path / "out")
    path = tmp_path / "out" / "results.json"
    record = write_results(path, {"voc": {"AP": 1.5}}, cfg, start_time=utc_now())
    assert json.loads(path.read_text()) == record
    assert record["units"] == "percent" and record["voc"] == {"AP": 1.5}
    assert record["provenance"]["seed"] == cfg.SEED
    with pytest.raises(ValueError, match="reserved"):
        write_results(path, {"units": "x"}, cfg)
