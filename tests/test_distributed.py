"""Two CPU workers under torchrun (gloo): DDP keeps the replicas identical while they learn,
with one gradient all-reduce per optimizer step under gradient accumulation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffkit import distributed
from diffkit.checkpoint import load_checkpoint

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import diffkit
    from diffkit.trainer import TrainConfig, Trainer
    from _toys import NUM_TIMESTEPS, TinyDenoiser, vectors

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different on each rank: DDP must broadcast rank 0's weights
    model = TinyDenoiser()
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(out / f"init{rank}.safetensors"))

    def sample_fn(trainer, step):
        (out / f"sampled{trainer.rank}-{step}").touch()

    config = TrainConfig(max_steps=3, batch_size=2, grad_accum_steps=2, lr=1e-2, warmup_steps=0, device="cpu",
                         seed=0, output_dir=str(out / "run"), save_every=2, sample_every=2, log_every=1,
                         tensorboard=False, progress=False)
    trainer = Trainer(model, diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS), vectors(16), config,
                      modality="toy", sample_fn=sample_fn)
    assert (trainer.rank, trainer.world_size) == (rank, 2)

    allreduces = []  # the optimizer step during which DDP all-reduced a gradient bucket

    def counting_hook(state, bucket):
        allreduces.append(trainer.step + 1)
        return allreduce_hook(state, bucket)

    trainer._train_model.register_comm_hook(None, counting_hook)
    trainer.train()
    (out / f"allreduces{rank}.txt").write_text(" ".join(map(str, allreduces)))
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(out / f"final{rank}.safetensors"))
    save_file({k: v.clone() for k, v in trainer.ema_model.state_dict().items()}, str(out / f"ema{rank}.safetensors"))
    """
)


def test_two_cpu_workers_stay_in_sync(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two workers on a small machine: avoid thread oversubscription
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    init = [load_file(tmp_path / f"init{r}.safetensors") for r in (0, 1)]
    final = [load_file(tmp_path / f"final{r}.safetensors") for r in (0, 1)]
    ema = [load_file(tmp_path / f"ema{r}.safetensors") for r in (0, 1)]
    assert not torch.equal(init[0]["inp.weight"], init[1]["inp.weight"])  # the ranks started apart
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
        assert torch.equal(ema[0][name], ema[1][name]), name
    assert not torch.equal(final[0]["inp.weight"], init[0]["inp.weight"])  # and they learned
    # Two micro-batches a step, but one all-reduce (of the one bucket of this small model) per
    # step: the first micro-batch's backward ran under no_sync.
    for r in (0, 1):
        assert (tmp_path / f"allreduces{r}.txt").read_text() == "1 2 3"

    # Only rank 0 samples and writes the checkpoint, which matches the in-memory weights.
    assert sorted(p.name for p in tmp_path.glob("sampled*")) == ["sampled0-2"]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint", modality="toy")
    assert ckpt.step == 3 and ckpt.extra["world_size"] == 2 and ckpt.extra["train_seconds"] > 0
    assert all(torch.equal(ckpt.model_state[k], final[0][k]) for k in final[0])


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched_distributed()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.init_distributed(torch.device("cpu")) is False
    distributed.barrier()
    value = torch.tensor([3.0])
    assert distributed.all_reduce_mean(value) is value and value.item() == 3.0


def test_each_worker_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device_for_rank(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.device_for_rank(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert distributed.device_for_rank(torch.device("cpu")) == torch.device("cpu")
