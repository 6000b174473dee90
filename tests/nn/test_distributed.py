"""DDP on 2 CPU processes (gloo) must follow the one-process loss curve with the same global batch."""

import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from scdca.errors import ScdcaInputError
from scdca.models.scdca.model import ScDCAModel
from scdca.nn import distributed
from scdca.nn.pretrain import PretrainConfig, pretrain

SCDCA = dict(backbone="random:1x16", encoder="morgan", epochs=3, batch_size=7, val_fraction=0.0, lr=3e-3)
PRETRAIN = PretrainConfig(
    layers=1, dim=16, heads=2, steps=4, batch_size=8, seq_len=16, dropout=0.0, eval_every=1, val_cells=8, save_every=2
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, payload, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        if job == "scdca":
            model = ScDCAModel(**SCDCA).fit(payload)
            if rank == 0:
                np.save(out, np.array(model.loss_history_))
        else:
            pretrain(payload, out, PRETRAIN, progress=False)
        # both ranks done before teardown: destroying the group while the peer still talks
        # aborted a rank now and then ("terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _two_processes(job, payload, out):
    mp.spawn(_worker, args=(2, _free_port(), job, payload, str(out)), nprocs=2, join=True)


def test_scdca_on_two_gloo_processes_follows_the_one_process_loss_curve(tiny_data, tmp_path):
    torch.set_num_threads(1)
    alone = ScDCAModel(**SCDCA).fit(tiny_data).loss_history_
    _two_processes("scdca", tiny_data, tmp_path / "ddp.npy")
    ddp = np.load(tmp_path / "ddp.npy")
    assert len(ddp) == len(alone) > 10  # every step, including last batches smaller than the world
    np.testing.assert_allclose(ddp, alone, rtol=1e-4)
    assert alone[-1] < alone[0]  # it learned: the curves compared are not flat


def test_pretraining_on_two_gloo_processes_follows_the_one_process_loss_curve(tiny_sim, tmp_path):
    torch.set_num_threads(1)
    pretrain(tiny_sim, tmp_path / "alone", PRETRAIN, progress=False)
    _two_processes("pretrain", tiny_sim, tmp_path / "ddp")
    a, b = (pd.read_csv(tmp_path / d / "pretrain_log.csv") for d in ("alone", "ddp"))
    assert len(a) == len(b) == PRETRAIN.steps
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=1e-4)


def test_mixed_precision_is_off_on_cpu_unless_asked():
    cpu = torch.device("cpu")
    with distributed.autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with distributed.autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ScdcaInputError, match="precision: 'fp16'"):
        distributed.check_precision("fp16")
