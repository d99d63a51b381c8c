import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rand(shape, dtype=torch.float64, device="cpu", grad=True, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = torch.randn(shape, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
