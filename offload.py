"""Group offload: the frozen weights of the transformer's blocks live off the accelerator and visit it a group at a time
(and the simple whole-model CPU offload, alone_on, at the end).

    offload_blocks(transformer, device, blocks_per_group, use_stream, disk_path) -> BlockOffload
        moves everything else to `device` (proj_in/out, embeddings, the LoRA weights of every block), keeps each
        block's frozen weights in CPU memory (pinned, for fast copies) or in safetensors files under disk_path
        (memory-mapped: the OS pages them in), and hooks every block so it runs on a device copy of them.
    make_folder(path) -> a folder of this run's own under group_offload_to_disk_path, removed at exit
    alone_on(device, model, other, enabled)  ->  enable_model_cpu_offload: one of two models on the device at a time

How a step runs. Blocks are grouped (blocks_per_group). Just before a block runs, its group's frozen tensors are on
the device (copied now, or earlier by a prefetch) and the block's parameters point at those copies for the duration
of its forward; after it, they point back at the off-device ones. The device copies are ordinary tensors: autograd
keeps the ones a backward needs (the last block's, and a recomputed block's until its backward is done), and the
allocator takes back the rest once at most `in_flight` groups are held here. With gradient checkpointing (which
offload asks for) backward recomputes each block, so the hooks fetch its group again, in reverse order; model.py
runs every recompute to the block's end (checkpoint's early stop off), so the hook after a block always runs.
With use_stream (CUDA): as a block starts, before its kernels are queued, the next group in the direction of
travel (forward: up; backward's recompute: down; at the forward's end, the recompute's first) starts copying on a
side stream, so the copy overlaps the block's compute; the compute stream waits on that copy's event before the
next block reads it, and each copied tensor is marked as used by the compute stream
(record_stream) so its memory is not reused while a kernel may still read it. Without streams every copy is made
when the block needs it. Nothing changes the numbers: the same values, the same kernels (tests: bit for bit).
The LoRA weights, their gradients and the optimizer state never move. Quantized weights (quant.py) move as they are
stored: int8 / fp8 / nf4 bytes, with their scales.
"""

import atexit
import contextlib
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

import data


class BlockOffload:
    def __init__(self, blocks: nn.ModuleList, device: torch.device, blocks_per_group: int, use_stream: bool,
                 disk_path: str = "", in_flight: int = 2):
        self.device, self.in_flight = device, in_flight
        self.group_of = [i // blocks_per_group for i in range(len(blocks))]
        self.groups = max(self.group_of) + 1
        self.stream = torch.cuda.Stream(device) if use_stream and device.type == "cuda" else None
        self.stored: list[dict[str, torch.Tensor]] = [{} for _ in range(self.groups)]  # "block.name" -> off-device
        for i, block in enumerate(blocks):
            for name, tensor in frozen_tensors(block).items():
                self.stored[self.group_of[i]][f"{i}.{name}"] = off_device(tensor, device)
        if disk_path:
            self.stored = [to_disk(stored, Path(disk_path) / f"group-{g}.safetensors")
                           for g, stored in enumerate(self.stored)]
        for i, block in enumerate(blocks):
            for name in frozen_tensors(block):
                point(block, name, self.stored[self.group_of[i]][f"{i}.{name}"])
            for p in block.parameters():  # what is left on the block: its LoRA weights, to the device
                if p.requires_grad:
                    p.data = p.data.to(device)
            block.register_forward_pre_hook(self.before(i, block))
            block.register_forward_hook(self.after(i, block))
        self.on_device: OrderedDict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = OrderedDict()
        self.last = -1  # the group that ran last: which way the next one lies

    def fetch(self, g: int) -> None:
        """Starts (or finds) the copy of group g onto the device; drops the oldest group beyond in_flight."""
        if g in self.on_device:
            self.on_device.move_to_end(g)
            return
        while len(self.on_device) >= self.in_flight:
            self.on_device.popitem(last=False)
        if self.stream is None:
            self.on_device[g] = ({k: t.to(self.device) for k, t in self.stored[g].items()}, None)
            return
        with torch.cuda.stream(self.stream):  # reads pinned CPU memory, writes fresh buffers: waits for nothing
            copies = {k: t.to(self.device, non_blocking=True) for k, t in self.stored[g].items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        self.on_device[g] = (copies, done)

    def before(self, i: int, block: nn.Module):
        def hook(module, args):
            g = self.group_of[i]
            self.fetch(g)
            copies, done = self.on_device[g]
            self.prefetch(g)
            if done is not None:  # first use of this copy: compute waits for it, and keeps it alive while reading
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in copies.values():
                    for part in inner_tensors(t):
                        part.record_stream(torch.cuda.current_stream(self.device))
                self.on_device[g] = (copies, None)
            prefix = f"{i}."
            for key, t in copies.items():
                if key.startswith(prefix):
                    point(block, key[len(prefix):], t)
        return hook

    def prefetch(self, g: int) -> None:
        """With a side stream: starts copying the group that runs after g, in the direction of travel (the forward
        goes up, backward's recompute comes down), before g's kernels are queued, so the copy overlaps them."""
        step = 1 if g >= self.last else -1
        self.last = g
        if self.stream is None:
            return
        if 0 <= g + step < self.groups:
            self.fetch(g + step)
        elif step == 1 and g > 0 and torch.is_grad_enabled():  # the forward's end: the recompute comes down next
            self.fetch(g - 1)
        self.fetch(g)  # g stays the newest: the prefetch never pushes out the group about to run

    def after(self, i: int, block: nn.Module):
        def hook(module, args, output):
            for key, t in self.stored[self.group_of[i]].items():
                if key.startswith(f"{i}."):
                    point(block, key[len(f"{i}."):], t)
        return hook


def frozen_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's weights that do not train (everything but the LoRA's) and its buffers, by name."""
    found = {n: p for n, p in block.named_parameters() if not p.requires_grad}
    return found | dict(block.named_buffers())


def point(block: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Makes the block's parameter (or buffer) `name` this tensor: a plain swap of the module's entry, so the
    forward reads it and autograd saves it like any other tensor."""
    owner_name, _, leaf = name.rpartition(".")
    owner = block.get_submodule(owner_name)
    table = owner._parameters if leaf in owner._parameters else owner._buffers
    table[leaf] = tensor


def off_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU copy a group is fetched from: pinned where the accelerator copies from pinned memory without a
    staging copy (plain tensors; a quantized one stays as its library stores it)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):  # quantized: its own .to keeps its scales with it
        return tensor.to("cpu")
    cpu = tensor.detach().to("cpu")
    if device.type == "cuda":
        cpu = cpu.pin_memory()
    return nn.Parameter(cpu, requires_grad=False) if isinstance(tensor, nn.Parameter) else cpu


def make_folder(path: str) -> str:
    """A fresh folder of this run's own under group_offload_to_disk_path (nothing there is ever overwritten),
    removed when the process ends normally; a killed run leaves it behind (ltx-lora-offload-*: safe to delete)."""
    folder = tempfile.mkdtemp(prefix="ltx-lora-offload-", dir=path)  # (config.check saw `path` exists)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def to_disk(stored: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Writes one group's tensors to a safetensors file and returns them memory-mapped from it: the process then
    holds no copy, the OS reads the pages when a block needs them (and may drop them again)."""
    from safetensors.torch import load_file, save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_atomic(path, lambda tmp: save_file({k: t.detach().contiguous() for k, t in stored.items()}, tmp))
    mapped = load_file(path)
    return {k: nn.Parameter(mapped[k], requires_grad=False) if isinstance(t, nn.Parameter) else mapped[k]
            for k, t in stored.items()}


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly quantized) tensor is made of: torchao's parts, bitsandbytes' codes and
    quantization state, or the tensor itself."""
    if hasattr(t, "__tensor_flatten__"):
        return [p for name in t.__tensor_flatten__()[0] for p in inner_tensors(getattr(t, name))]
    state = getattr(t, "quant_state", None)
    parts = [t.data if isinstance(t, nn.Parameter) else t]
    if state is not None:
        parts += [v for v in state.as_dict().values() if isinstance(v, torch.Tensor)]
    return parts


def offload_blocks(transformer: nn.Module, device: torch.device, blocks_per_group: int = 1, use_stream: bool = True,
                   disk_path: str = "", in_flight: int = 2) -> BlockOffload:
    """Offloads the transformer's blocks (see the top of this file) and moves the rest to `device`."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    for t in list(transformer.parameters(recurse=False)) + list(transformer.buffers(recurse=False)):
        t.data = t.data.to(device)
    return BlockOffload(transformer.transformer_blocks, device, blocks_per_group, use_stream, disk_path, in_flight)


@contextlib.contextmanager
def alone_on(device: torch.device, model, other, enabled: bool):
    """Whole-model CPU offload (enable_model_cpu_offload, for validation): with `enabled`, `model` on `device` and
    `other` on the CPU inside the block, then each back where it was. Otherwise nothing moves."""
    if not enabled:
        yield
        return
    homes = [next(m.parameters()).device for m in (model, other)]
    other.to("cpu")
    model.to(device)
    try:
        yield
    finally:
        for m, home in zip((model, other), homes):
            m.to(home)
