"""`core.file_backed`: a frozen module's weights as a private file map, resident only when read.

On a real module (CPU, seeded): the same Parameter objects with the same values, dtypes and
outputs; the process's resident set shrinks by the weights' size when they are mapped, grows
when a forward reads them, and shrinks again when they are mapped afresh; a module cast since
is written again, not reverted. Not mapping (writing the file only) fails all but the last;
mapping with `shared=True` still passes (the pages are clean).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.file_backed import file_backed
from core.host_allocator import release_freed_memory
from testkit.memory_maps import in_unlinked_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

MIB = 2**20


def resident_mib() -> float:
    """This process's resident set, after handing freed heap pages back (the CLI keeps them)."""
    release_freed_memory()
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return kib / 1024


def frozen_module() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2048, 4096), nn.BatchNorm1d(4096), nn.Linear(4096, 2048))
    module[2].to(torch.bfloat16)  # 16 MiB in bf16 beside 32 MiB in fp32 and the norm's buffers
    return module.eval().requires_grad_(False)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module[2](module[1](module[0](x)).to(torch.bfloat16))


def test_the_same_parameters_values_and_outputs(tmp_path: Path) -> None:
    module, x = frozen_module(), torch.randn(8, 2048)
    parameters = dict(module.named_parameters())
    before = {name: t.clone() for name, t in module.state_dict().items()}
    expected = forward(module, x)

    assert file_backed(module, tmp_path)
    assert dict(module.named_parameters()) == parameters  # the same objects, in place
    for name, tensor in module.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
        assert in_unlinked_file(tensor, tmp_path), name
    assert torch.equal(forward(module, x), expected)
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind by a crash


def test_mapped_weights_leave_the_resident_set_until_read(tmp_path: Path) -> None:
    module, x = frozen_module(), torch.randn(8, 2048)
    size = sum(t.nbytes for t in module.state_dict().values()) / MIB  # 48 MiB
    loaded = resident_mib()
    file_backed(module, tmp_path)
    mapped = resident_mib()
    forward(module, x)  # reads every weight
    read = resident_mib()
    file_backed(module, tmp_path)  # mapped afresh: the pages read leave again
    remapped = resident_mib()
    assert loaded - mapped > 0.8 * size
    assert read - mapped > 0.8 * size
    assert read - remapped > 0.8 * size


def test_a_module_cast_since_is_written_again(tmp_path: Path) -> None:
    module = frozen_module()
    file_backed(module, tmp_path)
    module.to(torch.float64)  # new tensors in place of the mapped ones
    expected = {name: t.clone() for name, t in module.state_dict().items()}
    file_backed(module, tmp_path)
    for name, tensor in module.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        assert in_unlinked_file(tensor, tmp_path), name


def test_weights_off_the_cpu_or_none_are_left_alone(tmp_path: Path) -> None:
    assert not file_backed(nn.ReLU(), tmp_path)
    assert not file_backed(nn.Linear(2, 2, device="meta"), tmp_path)
