"""Shared fixtures."""

import os

import torch

# The Triton noise kernel is tested on CPU by Triton's interpreter (tests/test_noise_kernel.py). The
# switch must be on before anything imports Triton (PEFT does, through its integrations), so it is
# set here, first, and only where no GPU could run the kernel for real.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import flatpeft


@pytest.fixture(params=flatpeft.list_methods())
def method_name(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and least disturbed by other processes) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
