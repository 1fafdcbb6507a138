"""Shared fixtures."""

import pytest

import flatpeft


@pytest.fixture(params=flatpeft.list_methods())
def method_name(request) -> str:
    return request.param
