"""The EMA of the trained network: diffusers' `EMAModel` (its decay schedule, state dict and the
checkpoint format), updated in place by one fused `foreach` lerp, in memory or in a file.

diffusers 0.42's update is the memory problem at SD scale, not the arithmetic:

- `foreach=False` loops over ~700 tensors, each `s.sub_((1 - d) * (s - p))`: two temporaries
  and three passes over memory per tensor;
- `foreach=True` computes `torch._foreach_sub(shadows, params)` first: a temporary as large as
  the whole network (2.3 GB for the 579M-parameter `base` student) at the step's peak.

`torch._foreach_lerp_(shadows, params, 1 - d)` is the same update, s + (1 - d)(p - s), with no
temporary and one pass (the kernel torch's own optimizers use).

Where the average lives (`training.ema.storage`, measured in the README's performance section):

    memory   fp32 tensors beside the weights, updated every `every` steps
    disk     one fp32 safetensors file in the run folder, read and rewritten tensor by tensor
             every `every` steps (a few MB of memory at a time): the process does not hold the
             average, the kernel's page cache does while memory is free and drops it when not.

Every `every` steps, the update toward the current weights uses the product of the decays of the
steps since the last one, d_(t-k+1) ... d_t: an average of the weights seen every k-th step.
With k much smaller than the average's horizon 1 / (1 - d) the two differ by about k / horizon
of the average's distance from the weights (measured in tests/distill/test_ema.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

# A disk EMA pays its read and write of the whole network once per update: 1.45 s for SD's base
# student on this project's 2-core CPU (`sd_step.py --ema-storage disk --ema-every 1`), so every
# 10 steps is ~0.15 s a step, about what the in-memory update costs every step (0.14 s).
DISK_EVERY = 10
# "auto" puts the EMA on disk when training on a CPU in one process and the average is at least
# this large: an SD-scale student's (2.3 GB) competes with the optimizer for RAM, a toy's does not.
DISK_MIN_BYTES = 1 << 30


class StudentEMA(EMAModel):
    """diffusers' EMAModel, updated with one foreach lerp every `every` applied steps."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *, every: int = 1, **kwargs: Any):
        super().__init__(parameters, **kwargs)
        self.every = every
        self.pending_decay = 1.0  # product of the decays of the steps since the last update

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One applied optimizer step: its decay d (`EMAModel.get_decay`, warm-up included)
        joins the pending product; every `every` steps the shadows move toward `parameters`
        (in the order the EMA was built with) by 1 - product. Frozen parameters are copied."""
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        self.pending_decay *= decay
        if self.optimization_step % self.every == 0:
            self._move(list(parameters), 1.0 - self.pending_decay)
            self.pending_decay = 1.0

    @torch.no_grad()
    def averaged(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
        """Each shadow with the pending steps applied, one at a time, without changing the EMA:
        the average as of the last step (a snapshot, a grid, the stage's result)."""
        weight = 1.0 - self.pending_decay
        for shadow, param in zip(self.shadow_params, parameters, strict=True):
            if weight and param.requires_grad:
                shadow = torch.lerp(shadow, param.detach().to(shadow.device, shadow.dtype), weight)
            yield shadow

    def _move(self, parameters: list[torch.nn.Parameter], weight: float) -> None:
        pairs = list(zip(self.shadow_params, parameters, strict=True))
        moving = [(s, p.detach()) for s, p in pairs if p.requires_grad]
        if moving:
            shadows, params = map(list, zip(*moving, strict=True))
            torch._foreach_lerp_(shadows, params, weight)
        for shadow, param in pairs:
            if not param.requires_grad:
                shadow.copy_(param)

    def state_dict(self) -> dict:
        return super().state_dict() | {"every": self.every, "pending_decay": self.pending_decay}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.every = state.pop("every", self.every)
        self.pending_decay = state.pop("pending_decay", 1.0)
        super().load_state_dict(state)


class ShadowFile(Sequence[torch.Tensor]):
    """Tensors "0", "1", ... of a safetensors file, each read when indexed and rewritten in place
    (`write`): the file's layout (header, then each tensor's bytes at a fixed offset) never
    changes, so an update is one read and one write per tensor.

    safetensors 0.8 writes whole files only and does not expose a tensor's byte offsets, so the
    header is read here per its format (an 8-byte little-endian length, then JSON with each
    tensor's dtype, shape and data_offsets relative to the end of the header)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        header.pop("__metadata__", None)
        self._start = 8 + header_size
        self._entries = [header[str(i)] for i in range(len(header))]

    def __len__(self) -> int:
        return len(self._entries)

    def _span(self, index: int) -> tuple[int, int, list[int]]:
        entry = self._entries[index]
        if entry["dtype"] != "F32":
            raise ValueError(f"{self.path}: EMA tensor {index} is {entry['dtype']}, not F32")
        begin, end = entry["data_offsets"]
        return self._start + begin, end - begin, entry["shape"]

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        offset, size, shape = self._span(index)
        with self.path.open("rb") as handle:
            handle.seek(offset)
            data = bytearray(handle.read(size))
        if not size:  # an empty tensor: frombuffer refuses an empty buffer
            return torch.zeros(shape, dtype=torch.float32)
        return torch.frombuffer(data, dtype=torch.float32).reshape(shape)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def write(self, index: int, tensor: torch.Tensor) -> None:
        offset, size, shape = self._span(index)
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        if list(data.shape) != list(shape):
            raise ValueError(f"EMA tensor {index}: shape {list(data.shape)}, the file's {shape}")
        with self.path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(data.numpy().tobytes())

    @classmethod
    def create(cls, path: Path, tensors: Iterable[torch.Tensor]) -> ShadowFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{i}": t.detach().to("cpu", torch.float32).contiguous()
                   for i, t in enumerate(tensors)}, str(path))  # fmt: skip
        return cls(path)


class DiskEMA(StudentEMA):
    """A `StudentEMA` whose shadows live in a file (`ShadowFile`), one tensor in memory at a
    time. One process only: under DDP/FSDP keep the EMA in memory (each rank holds its part)."""

    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], *, path: Path, every: int, **kwargs: Any
    ):
        parameters = list(parameters)
        self._file: ShadowFile | None = None
        # EMAModel clones every parameter into `shadow_params` (the setter below writes them to
        # the file instead); the meta device makes those clones free.
        super().__init__([p.to("meta") for p in parameters], every=every, **kwargs)
        self._file = ShadowFile.create(Path(path), parameters)

    @property
    def shadow_params(self) -> Sequence[torch.Tensor]:  # type: ignore[override]
        return self._file if self._file is not None else []

    @shadow_params.setter
    def shadow_params(self, tensors: Sequence[torch.Tensor]) -> None:
        if self._file is None or any(t.is_meta for t in tensors):
            return  # EMAModel.__init__'s meta clones: the file is created next
        for index, tensor in enumerate(tensors):
            self._file.write(index, tensor)

    def to(self, device: Any = None, dtype: Any = None, non_blocking: bool = False) -> None:
        """The file stays a file (fp32, on disk); the update reads each tensor to the CPU."""

    def _move(self, parameters: list[torch.nn.Parameter], weight: float) -> None:
        file = self._file
        assert file is not None
        for index, param in enumerate(parameters):
            if param.requires_grad:
                shadow = file[index]  # (the parameter's shape) fp32, read from the file
                shadow.lerp_(param.detach().to("cpu", torch.float32), weight)
            else:
                shadow = param
            file.write(index, shadow)

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        shadows = state.pop("shadow_params", None)
        super().load_state_dict(state)  # counters; EMAModel.deepcopy of the rest is small
        if shadows is not None:
            self.shadow_params = shadows


def resolve_storage(storage: str, *, device_type: str, processes: int, nbytes: int) -> str:
    """`training.ema.storage` as a decision: "auto" is "disk" for a single CPU process whose
    average is at least `DISK_MIN_BYTES` (an SD-scale student), else "memory"."""
    if storage != "auto":
        return storage
    large = nbytes >= DISK_MIN_BYTES
    return "disk" if device_type == "cpu" and processes == 1 and large else "memory"


def default_every(storage: str, every: int | None) -> int:
    return every if every is not None else (DISK_EVERY if storage == "disk" else 1)
