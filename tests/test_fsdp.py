"""FSDP2 on CPUs: i3 sharded layer by layer with `fully_shard` (as configs/accelerate/fsdp2.yaml does on GPUs), two
processes over gloo, against the same training in one process. Accelerate refuses FSDP without GPUs, so this covers
the model, its gathered export and a distributed checkpoint; train.py's launch of it runs on GPU machines."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from i3.train import decayed_parameter_names, parameter_groups

from conftest import tiny_model

WORLD_SIZE = 2
STEPS = 3


def batches(step: int) -> torch.Tensor:
    """The global batch of a step: 4 rows, of which each of the two processes trains on 2."""
    return torch.randint(4, 99, (4, 12), generator=torch.Generator().manual_seed(step))


def model_and_optimizer(mixer: str, sharded: bool):
    model = tiny_model(seed=0, recurrent_mixer=mixer).train()
    decayed = decayed_parameter_names(model)
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, decayed, weight_decay=0.1), lr=1e-2)
    return model, optimizer


def train_step(model, optimizer, ids: torch.Tensor) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def full_state(model, optimizer) -> dict:
    """The whole model's weights, gathered from every shard (what export writes)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)[0]


def sharded_run(rank: int, port: int, mixer: str, checkpoint_dir: str, results: dict):
    """One of the two processes: STEPS steps on its half of each batch, the gathered weights, then a DCP save, a
    reload into a fresh sharded model and optimizer, and one more step."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        model, optimizer = model_and_optimizer(mixer, sharded=True)
        losses = []
        for step in range(STEPS):
            local = batches(step).chunk(WORLD_SIZE)[rank]
            loss = train_step(model, optimizer, local)
            dist.all_reduce(loss)
            losses.append(loss.item() / WORLD_SIZE)
        state = full_state(model, optimizer)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint_dir)

        resumed, resumed_optimizer = model_and_optimizer(mixer, sharded=True)
        model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_state_dict(resumed, resumed_optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
        next_loss = train_step(resumed, resumed_optimizer, batches(STEPS).chunk(WORLD_SIZE)[rank])
        dist.all_reduce(next_loss)
        if rank == 0:
            results.update(losses=losses, state=state, next_loss=next_loss.item() / WORLD_SIZE)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("mixer", ["i3", "rwkv4"])
def test_fsdp2_on_two_cpu_processes_trains_exports_and_resumes_as_one_process(mixer, tmp_path):
    """Losses of 3 steps, the gathered weights after them, and the loss of a 4th step after a DCP save and reload all
    equal one process training on the whole batches."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(sharded_run, args=(free_port(), mixer, str(tmp_path / "dcp"), results), nprocs=WORLD_SIZE)
        sharded = dict(results)

    torch.set_num_threads(1)
    model, optimizer = model_and_optimizer(mixer, sharded=False)
    losses = [train_step(model, optimizer, batches(step)).item() for step in range(STEPS)]
    assert sharded["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    reference = model.state_dict()
    assert sorted(sharded["state"]) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded["state"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert sharded["next_loss"] == pytest.approx(train_step(model, optimizer, batches(STEPS)).item(), rel=1e-5)
