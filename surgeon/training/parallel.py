"""How a run spreads over processes: replicated (one process, or DDP through Accelerate) or
sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Both give the loop the same few operations, in this order::

    model = engine.shard(model)                  # FSDP2: units, dtypes, shards; replicated: as is
    optimizer = AdamW(trainable(model).values())
    model, optimizer = engine.wrap(model, optimizer)   # DDP wrapping; sharded: as is
    for each micro-batch:  with engine.sync(model, last), engine.autocast(): … engine.backward(loss * engine.loss_scale)
    engine.finish_grads()                        # sharded: sum the replicated gradients over ranks

Sharded layout (surgeon's policy): one FSDP unit per decoder layer of the language model, one for
the input embeddings when they are not tied to the output head, and the root (final norm, head,
head). The vision tower and projector are left out of FSDP (``ignored_params``): replicated on
every rank, so that a rank whose micro-batch has no image runs no collective for them; frozen
they cost their weights only (in the frozen dtype, no gradient, no optimiser state); with
``--train-vision`` their gradients are summed over ranks once per step and their optimiser state
is replicated. The surgeon modules (IADA, Image-LoRA: well under a million parameters) are
replicated the same way, since a text-only micro-batch leaves Image-LoRA unused on its rank. The
input embeddings' output always requires grad, so that every rank runs the backward pass through
every unit (and its collectives) even when no parameter of the language model trains. Gradients are reduce-scattered with a plain sum after every micro-batch
(memory stays 1/world; losses are normalised by the global token counts, so a sum is the right
reduction), in fp32 under mixed precision; the all-gathered copies are in the compute dtype while
the sharded parameters stay in the master dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from surgeon.training.config import Precision


def return_freed_memory() -> None:
    """On the CPU (glibc): serve allocations of 1 MiB and more from mmap, so that buffers freed every
    step (FSDP's gathered layers and their gradients, activations) go back to the system instead of
    staying in the heap, where glibc's growing mmap threshold would otherwise keep them and the
    process's memory would only ever grow. A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed value also stops glibc from raising it)
    except (OSError, AttributeError):
        pass


def default_threads(environ: dict[str, str] | None = None) -> int:
    """Intra-op CPU threads for one training process: ``OMP_NUM_THREADS`` when it is set (torchrun
    sets 1 for several processes unless told otherwise), else the cores this process may run on
    shared by the processes on this node (``LOCAL_WORLD_SIZE``), at least 1."""
    env = os.environ if environ is None else environ
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = env.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // max(1, int(local) if local.isdigit() else 1))


def fsdp_requested(flag: bool) -> bool:
    """``--fsdp``, or a launch through ``accelerate launch --use_fsdp`` (its environment)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


class Replicated:
    """One process, or DDP across several (through Accelerate): every rank holds the whole model."""

    sharded = False

    def __init__(self, precision: Precision, find_unused: bool, cpu: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from accelerate.state import AcceleratorState

        ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
        # Each run sets its own precision: an Accelerator made earlier in this process (a Trainer, an
        # earlier run) must not pin it. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=precision.mixed, kwargs_handlers=[ddp], cpu=cpu)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.loss_scale = float(self.world)  # DDP averages gradients over ranks; losses are already global means

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: Any) -> Any:
        """The model inside its DDP wrapper."""
        return self.accelerator.unwrap_model(model)

    def keep_head_gathered(self, root: Any) -> None:
        pass

    def release(self) -> None:
        pass

    def sync(self, model: Any, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def finish_grads(self) -> None:
        pass

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients(optimizer)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


class Sharded:
    """FSDP2 over all processes (one data-parallel mesh dimension)."""

    sharded = True

    def __init__(self, precision: Precision, state: Any) -> None:
        import warnings

        from torch.distributed.device_mesh import init_device_mesh

        # the loop never changes a model output in place, which is what this warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.precision = precision
        self.world = state.num_processes
        self.rank = state.process_index
        device = state.device  # "cpu:0" under a CPU launch: the plain "cpu" that loaded tensors report
        self.device = torch.device("cpu") if device.type == "cpu" else device
        self.is_main = state.is_main_process
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.loss_scale = 1.0  # gradients are summed over ranks
        self.replicated: list[torch.nn.Parameter] = []

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard ``model`` in place (see the module docstring) and return it. Each unit is moved to
        the device and cast to the precision policy just before it is sharded, so no process ever
        holds more than one unit of the model unsharded in the master dtype."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        from surgeon.anatomy.decoder import language_model, vision_modules

        p = self.precision
        mixed = p.mixed != "no"
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, p.compute) if mixed else None,
            reduce_dtype=torch.float32 if mixed or p.master != "float32" else None,
        )
        from surgeon.modules.folders import module_parameters

        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        vision = {id(q): q for path in vision_modules(model) for q in model.get_submodule(path).parameters()}
        vision.update({id(q): q for q in module_parameters(root).values()})
        self.replicated = [q for q in vision.values() if q.requires_grad]
        _prepare(vision.values(), p, self.device, copy=True)
        root.enable_input_require_grads()
        decoder = language_model(model)
        units: list[torch.nn.Module] = list(decoder.layers)
        embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if embed is not None and (head is None or head.weight is not embed.weight):
            units.append(embed)
        for unit in units:
            _prepare(unit.parameters(), p, self.device)
            fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        rest = [q for q in root.parameters() if id(q) not in vision and not hasattr(q, "placements")]
        _prepare(rest, p, self.device)
        for name, buf in root.named_buffers():
            if buf.device != self.device:
                owner, _, leaf = name.rpartition(".")
                root.get_submodule(owner)._buffers[leaf] = buf.to(self.device)
        fully_shard(root, mesh=self.mesh, mp_policy=policy, ignored_params=set(vision.values()))
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
                module.set_gradient_divide_factor(1.0)
        return model

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return model, optimizer

    def unwrap(self, model: Any) -> Any:
        """The model (FSDP2 shards it in place: there is no wrapper)."""
        return model

    def keep_head_gathered(self, root: Any) -> None:
        """Keep the root unit (which holds the LM head) gathered from its forward to the end of the
        step's backward passes: the chunked loss uses the head outside the model's forward, where
        no hook would gather it again for a second pass. Its gradients are still reduce-scattered
        after every pass; ``release`` reshards it once the step's gradients are finished."""
        root.set_reshard_after_backward(False, recurse=False)
        self._held = root

    def release(self) -> None:
        held = getattr(self, "_held", None)
        if held is not None:
            held.reshard()

    def sync(self, model: Any, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision.mixed == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision.compute))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_grads(self) -> None:
        """Sum the replicated (vision, surgeon module) gradients over ranks, in one collective per
        dtype; a rank whose micro-batches never used a parameter contributes zeros."""
        for group in _by_dtype(self.replicated):
            for q in group:
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
            flat = torch.cat([q.grad.reshape(-1) for q in group])  # type: ignore[union-attr]
            torch.distributed.all_reduce(flat)
            offset = 0
            for q in group:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q))  # type: ignore[union-attr]
                offset += q.numel()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        torch.distributed.barrier()


def _prepare(params: Any, precision: Precision, device: torch.device, copy: bool = False) -> None:
    """Move parameters to ``device`` and cast them to the policy (trained: master, frozen: frozen).
    ``copy``: always into memory of their own, so that none keeps the checkpoint's memory-mapped
    file alive once FSDP has copied every process's rows out of it."""
    for q in params:
        want = getattr(torch, precision.master if q.requires_grad else precision.frozen)
        if copy or q.device != device or (q.is_floating_point() and q.dtype != want):
            q.data = q.data.to(device=device, dtype=want if q.is_floating_point() else q.dtype, copy=copy)


def _by_dtype(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for q in params:
        groups.setdefault(q.dtype, []).append(q)
    yield from groups.values()
