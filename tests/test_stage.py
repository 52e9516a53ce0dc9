"""The frame every stage runs in (cvfp.stage): one-line named errors, exit code 2, nothing written."""

import pytest
import torch

from cvfp.stage import run_stage
from conftest import write_params


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_a_named_error_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_params(tmp_path / "params.yaml", {"device": "cuda"})
    called = []
    with pytest.raises(SystemExit) as done:
        run_stage("phase1", lambda params, run: called.append(True), params_file=str(tmp_path / "params.yaml"))
    assert done.value.code == 2 and not called
    err = capsys.readouterr().err
    assert "error in stage 'phase1'" in err and "device: cuda" in err and "Traceback" not in err
