"""Shared pytest setup: deterministic CPU torch, the golden-error summary, GPU marker handling."""

import pytest
import torch

from tests import golden


def pytest_configure(config):
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine (see README, 'GPU tests')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not golden.RECORDS:
        return
    terminalreporter.section("golden parity: max abs / max rel error per compared tensor")
    for case, name, max_abs, max_rel, atol, rtol in golden.RECORDS:
        terminalreporter.write_line(
            f"{case:40s} {name:38s} abs {max_abs:9.2e}  rel {max_rel:9.2e}  (atol {atol:g}, rtol {rtol:g})"
        )
