"""bench.core.timing.gpu_state reads nvidia-smi (here a stand-in script on PATH)."""
import os
import stat

import torch

from bench.core.timing import GPU_STATE_FIELDS, gpu_state


def _fake_nvidia_smi(folder, output, code=0):
    path = os.path.join(folder, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_gpu_state_reads_every_field(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "1980, 3201, 412.50, 41, 0x0000000000000004")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = gpu_state("cuda")
    assert state == dict(zip(GPU_STATE_FIELDS,
                             ["1980", "3201", "412.50", "41", "0x0000000000000004"]))


def test_gpu_state_is_none_on_cpu_or_on_failure(tmp_path, monkeypatch):
    assert gpu_state("cpu") is None
    _fake_nvidia_smi(tmp_path, "Field not supported", code=2)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert gpu_state("cuda") is None
