"""Where this process sits in a torchrun job, and the one collective the loop needs.

    setup_dist(cfg) -> (Dist, device)     torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or one process
    all_reduce_mean(tensors, d)           the LoRA gradients (and the logged loss) averaged over the ranks
    install_stop_handlers(), stop_requested(stop, d)   SIGTERM / Ctrl-C: every rank stops after the same step
    stopped_line(stop, step, saved)                    what a stopped run says, with the command that resumes it
"""

import os
import shlex
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import config


@dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_dist(cfg: config.Config) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous); without them: one process.
    NCCL between GPUs, gloo on CPU."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return (Dist(dist.get_rank(), dist.get_world_size(), local_rank),
            torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Averages tensors over the ranks in place, in one collective: the LoRA gradients are small (tens of
    MB at rank 16), so a flat buffer beats DDP's hooks, and the frozen base is never touched."""
    if d.world_size == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def install_stop_handlers() -> dict:
    """SIGTERM / SIGINT (Ctrl-C) ask the loop to stop after the current step and save; a second one kills."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    return stop


def stop_requested(stop: dict, d: Dist) -> bool:
    """Whether any rank got SIGTERM / SIGINT: all ranks must stop at the same step to save together."""
    if d.world_size == 1:
        return stop["signal"] is not None
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stopped_line(stop: dict, step: int, saved) -> str:
    """What a stopped run says: which signal, what it saved, and the command that resumes it."""
    args = [a for a in sys.argv if not a.startswith(("--resume_from_checkpoint", "--overwrite_output_dir"))]
    return (f"\nstopped by {stop['signal'] or 'a signal on another rank'} after step {step}; saved {saved}\n"
            f"resume with: python {' '.join(shlex.quote(a) for a in args)} --resume_from_checkpoint=latest")
