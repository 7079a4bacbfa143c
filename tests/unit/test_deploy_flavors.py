"""deploy/flavors: the manifests `make run` applies parse with pclitectl and pass pclited's own flavor schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import manifest
from service.schemas import FlavorSpec

FLAVORS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "flavors").glob("*.yaml"))


@pytest.mark.parametrize("path", FLAVORS, ids=lambda p: p.name)
def test_flavor_manifests_are_valid_for_client_and_server(path):
    for item in manifest.parse(path.read_text(), str(path)):
        spec = FlavorSpec.model_validate({"name": item.name, **item.body})  # the server's request schema
        assert spec.pool_min <= spec.pool_target


def test_the_default_flavor_keeps_two_vms_warm():
    (default,) = manifest.parse((FLAVORS[0].parent / "default.yaml").read_text(), "default.yaml")
    assert default.name == "default" and default.body["pool_target"] == 2
