"""Shared fixtures."""

import pytest
import torch

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
