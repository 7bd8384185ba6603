"""Two CPU processes (gloo, loopback) give the single-process loss and gradients on the same global batch.

test_gathered_loss_and_gradients_equal_single_process spawns 2 processes that each encode
half of a global batch, gather the embeddings (vidret_lib.distributed.gather), compute the
loss and average the gradients. A CLIP4Clip-style AllGather (backward returns only the local
slice; re-expressed here from ArrowLuo/CLIP4Clip modules/until_module.py) is run beside it
and gives exactly 1/world_size of the single-process gradients (papers.md §0).
test_torchrun_training_equals_single_process runs the trainer itself under
``torchrun --nproc_per_node 2``.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vidret_lib.distributed import average_gradients, gather, shard
from vidret_lib.losses import infonce_loss, vsepp_loss

WORLD = 2
LOSSES = {"infonce": infonce_loss, "vsepp": lambda s: vsepp_loss(s, 0.2, max_violation=True)}
LOOPBACK_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_and_model():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(8, 6, generator=g, dtype=torch.float64)
    video = torch.randn(8, 6, generator=g, dtype=torch.float64)
    towers = torch.nn.ModuleDict({"t": torch.nn.Linear(6, 6), "v": torch.nn.Linear(6, 6)}).double()
    with torch.no_grad():
        for p in towers.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return text, video, towers


class Clip4ClipAllGather(torch.autograd.Function):
    """CLIP4Clip's AllGather: backward returns only this process' slice of grad_output."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def loss_and_grads(towers, text, video, loss_fn, gather_fn):
    towers.zero_grad()
    t, v = gather_fn(towers["t"](text)), gather_fn(towers["v"](video))
    loss = loss_fn(F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T)
    loss.backward()
    average_gradients(list(towers.parameters()))
    return loss.detach(), {n: p.grad.clone() for n, p in towers.named_parameters()}


def _worker(rank, out_dir):
    # File rendezvous: no TCP port to pick in advance, so no race with other processes for it.
    os.environ.update(LOOPBACK_ENV)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    text, video, towers = batch_and_model()
    idx = shard(torch.arange(len(text)), rank, WORLD)
    results = {}
    for name, fn in LOSSES.items():
        results[name] = {
            "exact": loss_and_grads(towers, text[idx], video[idx], fn, gather),
            "clip4clip": loss_and_grads(towers, text[idx], video[idx], fn, Clip4ClipAllGather.apply),
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    text, video, towers = batch_and_model()
    for name, fn in LOSSES.items():
        loss, grads = loss_and_grads(towers, text, video, fn, lambda x: x)  # one process, full batch
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            exact_loss, exact_grads = got["exact"]
            assert torch.allclose(exact_loss, loss, rtol=0, atol=1e-12), name
            for n, gr in grads.items():
                assert torch.allclose(exact_grads[n], gr, rtol=1e-10, atol=1e-12), (name, n)
                assert torch.allclose(got["clip4clip"][1][n], gr / WORLD, rtol=1e-10, atol=1e-12), (name, n)


def test_shard_needs_an_even_split():
    assert shard(torch.arange(8), 1, 2).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="divisible"):
        shard(torch.arange(7), 0, 2)


SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train import toy_split
from vidret_lib.train import TrainConfig, train
out = {{}}
for key, cfg in {configs}.items():
    res = train(cfg, toy_split(40, 2))
    out[key] = {{"state": res.last_state, "loss": [h["loss"] for h in res.history]}}
if dist.get_rank() == 0:
    torch.save(out, {out!r})
dist.destroy_process_group()
"""

CONFIGS = (
    '{"infonce": TrainConfig(epochs=2, batch_size=8, lr=1e-2, select="last"),'
    ' "vsepp_seq_emcl": TrainConfig(loss="vsepp", head="seqTransf", seq_layers=1, emcl=True, emcl_k=4,'
    ' epochs=1, batch_size=8, lr=1e-2, select="last", sampling="caption")}'
)


@pytest.mark.slow
def test_torchrun_training_equals_single_process(tmp_path):
    from test_train import toy_split
    from vidret_lib.train import TrainConfig, train  # noqa: F401 (TrainConfig is used by eval(CONFIGS))

    out = tmp_path / "dist.pt"
    script = tmp_path / "run.py"
    tests_dir = str(Path(__file__).resolve().parent)
    script.write_text(SCRIPT.format(tests=tests_dir, configs=CONFIGS, out=str(out)))
    env = {**os.environ, **LOOPBACK_ENV, "VIDRET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_out = torch.load(out)
    for key, cfg in eval(CONFIGS).items():
        single = train(cfg, toy_split(40, 2))
        assert dist_out[key]["loss"] == pytest.approx([h["loss"] for h in single.history], rel=1e-5, abs=1e-6)
        for n, p in single.last_state.items():
            assert torch.allclose(dist_out[key]["state"][n], p, rtol=1e-4, atol=1e-5), (key, n)


def _cuda_rules_worker(rank, out_dir):
    """One torchrun-like process of a 2-GPU run, simulated on the CPU by devicecheck.cuda_rules."""
    import functools

    from test_train import toy_split

    from vidret_lib.devicecheck import cuda_rules
    from vidret_lib.train import TrainConfig, train

    os.environ.update(LOOPBACK_ENV, WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    # file rendezvous instead of torchrun's TCP store; the mode then turns nccl into gloo
    dist.init_process_group = functools.partial(
        dist.init_process_group, init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    with cuda_rules(device_count=WORLD):
        result = train(TrainConfig(device="cuda", **CUDA_RULES_CONFIG), toy_split(40, 2))
        devices = {str(p.device) for p in result.model.parameters()}
    torch.save({"state": result.last_state, "loss": [h["loss"] for h in result.history], "devices": devices},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


CUDA_RULES_CONFIG = dict(loss="vsepp", head="seqTransf", seq_layers=1, emcl=True, emcl_k=4, epochs=1,
                         batch_size=8, lr=1e-2, select="last", sampling="caption")


@pytest.mark.slow
def test_two_gpu_training_under_cuda_rules_equals_single_process(tmp_path):
    """The nccl path of init_from_env / gather / average_gradients keeps every tensor on cuda:LOCAL_RANK."""
    from test_train import toy_split
    from vidret_lib.train import TrainConfig, train

    mp.spawn(_cuda_rules_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    single = train(TrainConfig(**CUDA_RULES_CONFIG), toy_split(40, 2))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["devices"] == {f"cuda:{rank}"}
        assert got["loss"] == pytest.approx([h["loss"] for h in single.history], rel=1e-5, abs=1e-6)
        for n, p in single.last_state.items():
            assert torch.allclose(got["state"][n], p, rtol=1e-4, atol=1e-5), n
