"""`core.file_backed`: a frozen module's weights as a private file map, resident only when read.

On a real module (CPU, seeded): the same Parameter objects with the same values, dtypes and
outputs; the map's resident part (`/proc/self/smaps`) is nothing once mapped, the weights' size
once a forward reads them, and nothing again once mapped afresh; a module cast or written in
place since is written again, not reverted; an unwritable folder leaves the module as it was.
Not mapping (writing the file only) fails the first four; mapping with `shared=True` still
passes (the pages are clean).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.file_backed import file_backed
from testkit.memory_maps import in_unlinked_file, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


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


def test_mapped_weights_are_resident_only_once_read(tmp_path: Path) -> None:
    module, x = frozen_module(), torch.randn(8, 2048)
    size = sum(t.nbytes for t in module.state_dict().values())  # 48 MiB
    file_backed(module, tmp_path)
    weight = module[0].weight  # the map holds every tensor of the module
    assert resident_bytes(weight) < 0.05 * size
    forward(module, x)  # reads every weight
    assert resident_bytes(weight) > 0.95 * size
    file_backed(module, tmp_path)  # mapped afresh: the pages read leave again
    assert resident_bytes(module[0].weight) < 0.05 * size


def test_an_in_place_write_since_is_kept(tmp_path: Path) -> None:
    module = frozen_module()
    file_backed(module, tmp_path)
    with torch.no_grad():
        module[0].weight.fill_(7.0)  # as load_state_dict writes
    file_backed(module, tmp_path)
    assert torch.equal(module[0].weight, torch.full_like(module[0].weight, 7.0))
    assert in_unlinked_file(module[0].weight, tmp_path)


def test_a_module_cast_since_is_written_again(tmp_path: Path) -> None:
    module = frozen_module()
    file_backed(module, tmp_path)
    module.to(torch.float64)  # new tensors in place of the mapped ones
    expected = {name: t.clone() for name, t in module.state_dict().items()}
    file_backed(module, tmp_path)
    for name, tensor in module.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        assert in_unlinked_file(tensor, tmp_path), name


def test_weights_off_the_cpu_none_or_an_unwritable_folder_are_left_alone(tmp_path: Path) -> None:
    assert not file_backed(nn.ReLU(), tmp_path)
    assert not file_backed(nn.Linear(2, 2, device="meta"), tmp_path)
    module = frozen_module()
    addresses = {name: t.data_ptr() for name, t in module.state_dict().items()}
    assert not file_backed(module, tmp_path / "missing")
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == addresses[name], name
