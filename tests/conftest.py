"""Test wiring: everything under tests/guest is a `guest` test and runs only where KVM can boot Linux."""

import os
from pathlib import Path

import pytest

from pclitelab.detect import host_kvm_status

GUEST_DIR = Path(__file__).parent / "guest"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if GUEST_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.guest)


@pytest.fixture(autouse=True)
def _guest_tests_need_bootable_kvm(request):
    if request.node.get_closest_marker("guest") is None:
        return
    ok, reason = host_kvm_status()
    if not ok:
        # Never a silent skip: a guest test that cannot boot a guest here is a wiring error.
        pytest.fail(f"guest test cannot run on this host ({reason}); run it via `make test` or `pclite-lab test`")


def pytest_runtest_logreport(report):
    """Tell `pclite-lab test` which tests have finished, so a lab whose own kernel panics is followed by one that
    runs only the others."""
    progress = os.environ.get("PCLITE_TEST_PROGRESS")
    if not progress or not (report.when == "call" or report.failed or report.skipped):
        return
    with open(progress, "a") as log:
        log.write(f"{report.outcome} {report.nodeid}\n")
