"""The process seam: rank, world size, is-main, and the few collective calls a run makes.

One process reports rank 0 of 1 and every call is a no-op. Several processes are started by `accelerate launch`
(or `sdlora ... --gpus N`, which runs that same launcher): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and the
run's `Accelerator` (or `init()` for generation) joins the process group, nccl on GPUs and gloo on the CPU. The loop
and the writers ask this module, never the environment, how many processes there are.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from sdlora.errors import SdloraError

SECOND_INTERRUPT_EXIT = 130
T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): what data/ shards by."""
        return self.rank, self.world_size

    def init(self, cpu: bool) -> None:
        """Join the process group outside training (generation): accelerate picks nccl on GPUs, gloo on the CPU."""
        if self.world_size > 1:
            from accelerate import PartialState

            PartialState(cpu=cpu)

    def device(self, device: torch.device) -> torch.device:
        """Each process takes the GPU of its local rank; an explicit cuda:N only makes sense for one process."""
        if self.world_size == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise SdloraError(f"--device {device} picks one GPU; with {self.world_size} processes each takes its own: "
                              "pass --device cuda")
        if self.local_rank >= torch.cuda.device_count():
            raise SdloraError(f"process {self.local_rank} has no GPU: {torch.cuda.device_count()} visible for "
                              f"{self.world_size} processes")
        return torch.device("cuda", self.local_rank)

    def main_only(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """Messages are printed once, by the main process."""
        return say if self.is_main else _silent

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a NaN or a Ctrl-C on one rank stops all)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=_collective_device())
        torch.distributed.all_reduce(t)
        return bool(t.item())

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on the main process; its result, or its SdloraError, on every process (one writer, one verdict)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except SdloraError as e:
                error = str(e)
        if self.active:
            box = [result, error]
            torch.distributed.broadcast_object_list(box, src=0, group=_object_group())
            result, error = box
        if error is not None:
            raise SdloraError(error)
        return result

    def gather(self, mine: list) -> list[list]:
        """Every process's list (picklable objects), in rank order, on every process."""
        if not self.active:
            return [mine]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, mine, group=_object_group())
        return out

    def interleave(self, mine: list) -> list:
        """Undo `items[rank::world_size]`: each process prepared its stride of a list; all get the whole list."""
        parts = self.gather(mine)
        return [parts[i % self.world_size][i // self.world_size] for i in range(sum(len(p) for p in parts))]

    def share(self, n: int) -> range:
        """This process's contiguous share of n jobs (the first n % world_size processes take one more)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def map(self, fn: Callable[[int], Any], n: int) -> list:
        """[fn(0), ..., fn(n-1)] on every process, each process computing its share."""
        return [x for part in self.gather([fn(i) for i in self.share(n)]) for x in part]

    def interrupts(self, every: int) -> Interrupts:
        return Interrupts(self, every)


def _silent(msg: str) -> None:
    pass


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@functools.cache
def _object_group():
    """Python objects (latents, images) travel over gloo: nccl would stage their pickles in GPU memory."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")


def current() -> Dist:
    """This process's place, from the launcher's environment variables (one process when none are set)."""
    env = os.environ
    return Dist(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


class GradBucket:
    """Sums the LoRA gradients of every process, and the step's loss, in one all-reduce of one flat buffer.

    Each process weights its samples' losses by 1 / (global batch), so the sum is the one-process gradient of the
    whole global batch; every process then clips and steps identical gradients and the adapters stay identical.
    Parameters no process ever gets a gradient for (SDXL's first text encoder's last layer: its output is not
    used) stay without one, as in one process, so AdamW's weight decay leaves them alone too. Which those are is
    agreed once, in the first (always eager) step. Capturable: inside a CUDA graph the copy in, the all-reduce
    and the copy out are replayed with the step.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.used: list[torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        """False until the first step agreed which parameters get gradients (that step reads a flag back)."""
        return self.used is not None

    def _agree_used(self) -> None:
        has = torch.tensor([float(p.grad is not None) for p in self.params], device=_collective_device())
        torch.distributed.all_reduce(has)
        self.used = [p for p, n in zip(self.params, has.tolist()) if n > 0]
        self.numels = [p.numel() for p in self.used]

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if self.used is None:
            self._agree_used()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.used]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float()])
        torch.distributed.all_reduce(flat)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat[:-1].split(self.numels), grads)])
        for p, g in zip(self.used, grads):
            if p.grad is None:  # a process with no samples in this step still adds (zero) gradients
                p.grad = g
        return flat[-1]


class Interrupts:
    """Ctrl-C under several processes. A signal only sets a flag; every `every` steps the processes agree
    (Dist.any) whether any saw one, so all stop after the same step and the main process writes one checkpoint.
    A second signal exits at once (checkpoints are written atomically, so the last one stays whole). One process
    keeps Python's own KeyboardInterrupt. `every` is 1 on the CPU; on GPUs it is the loss read-back interval, as
    a flag read back every step would stall the queue of steps."""

    def __init__(self, dist: Dist, every: int):
        self.dist, self.every, self.requested, self._previous = dist, every, False, None
        if dist.world_size > 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            os._exit(SECOND_INTERRUPT_EXIT)
        self.requested = True

    def agreed(self, step: int) -> bool:
        """Did any process get Ctrl-C? Asked of all processes at the same steps."""
        if self.dist.world_size == 1 or step % self.every:
            return False
        return self.dist.any(self.requested)

    def simulate(self) -> None:
        """Test hook: Ctrl-C as a terminal sends it. One process: KeyboardInterrupt. Several: the main process
        signals the launcher, which passes SIGINT on to every process, and waits until its own copy arrives."""
        if self.dist.world_size == 1 or self._previous is None:
            raise KeyboardInterrupt
        if self.dist.is_main:
            os.kill(os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 60
            while not self.requested and time.monotonic() < deadline:
                time.sleep(0.01)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# ---- the batch, the learning-rate rule, resuming on another number of processes


@dataclass(frozen=True)
class BatchPlan:
    """The batch size given is per process; the optimizer step sees per_process x processes x grad_accum images."""

    per_process: int
    processes: int
    grad_accum: int
    scale_lr: bool

    @property
    def global_batch(self) -> int:
        """Images in one micro-step across all processes: the size of the batches the data is cut into."""
        return self.per_process * self.processes

    @property
    def total(self) -> int:
        return self.global_batch * self.grad_accum

    @property
    def lr_scale(self) -> float:
        """--scale-lr: the learning rates times the total batch (diffusers' --scale_lr rule); else unscaled."""
        return float(self.total) if self.scale_lr else 1.0

    def describe(self, steps: int, n_images: int, unet_lr: float) -> str:
        """The one line printed at the start: effective batch, learning-rate rule and optimizer steps."""
        batch = f"{self.per_process} per process x {self.processes} process{'es' if self.processes > 1 else ''}"
        batch += f" x {self.grad_accum} accumulation = {self.total} images per optimizer step"
        if self.scale_lr:
            lr = f"learning rate {unet_lr:g} x {self.total} = {unet_lr * self.lr_scale:g} (--scale-lr)"
        else:
            lr = f"learning rate {unet_lr:g} as given (--scale-lr would multiply it by the total batch, {self.total})"
        epochs = steps * self.total / max(n_images, 1)
        return f"batch: {batch}; {lr}; {steps} optimizer steps ({epochs:.3g} epochs of {n_images} images)"


def rebatch(per_process: int, saved_processes: int, processes: int) -> int | None:
    """The per-process batch that keeps a checkpoint's global batch on another number of processes (None: the
    global batch does not divide)."""
    total = per_process * saved_processes
    return total // processes if total % processes == 0 else None


def launcher_mixed_precision() -> str | None:
    """bf16/fp16 asked for by `accelerate launch --mixed_precision` or its config file (used when the run sets
    none). accelerate passes "no" when nothing was asked, which leaves sdlora's own choice."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return value if value in ("bf16", "fp16") else None


# ---- starting the processes


def launched() -> bool:
    """True inside a process a launcher (accelerate / torchrun) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def strip_option(argv: Sequence[str], flag: str) -> list[str]:
    """argv without `flag N` / `flag=N` (the re-launched processes must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def check_processes(n: int, device: str | None) -> None:
    """--gpus N: enough GPUs (or the CPU, where N gloo processes are started, as tests do)."""
    if n < 1:
        raise SdloraError("--gpus must be at least 1")
    if launched():
        if int(os.environ["WORLD_SIZE"]) != n:
            raise SdloraError(f"--gpus {n} inside a launcher that started {os.environ['WORLD_SIZE']} processes; "
                              "drop --gpus")
        return
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if not cpu and n > torch.cuda.device_count():
        raise SdloraError(f"--gpus {n}: only {torch.cuda.device_count()} CUDA GPU(s) visible")


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `sdlora ARGV` in `processes` processes through accelerate's launcher (torchrun underneath), in this
    process, and return the exit code. Running the documented launcher, rather than forking workers here, gives
    one code path for both ways of starting, fresh interpreters (no fork after CUDA or thread start-up), and
    torchrun's supervision: a process that dies takes the others down instead of leaving them blocked in a
    collective, and Ctrl-C here is passed on to every process. Failures the processes already explained (sdlora's
    one-line errors, interrupts) are not reported again as launcher tracebacks."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "sdlora", *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (2, 130):  # an SdloraError (printed by the main process) or an interrupt
            return failure.exitcode
        raise SdloraError(f"process {rank} of {processes} failed (exit code {failure.exitcode}); "
                          "see its output above") from None
    except SystemExit as e:  # the launcher exits 128 + signal after passing a Ctrl-C on
        return e.code if isinstance(e.code, int) else 1
    return 0


def free_port() -> int:
    """A free TCP port for the rendezvous, so two runs on one host do not collide on accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
