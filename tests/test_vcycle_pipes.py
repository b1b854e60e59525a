"""Vacuum pipes of a vcycle space: expanded per space as vacd expands its own (vac.content.pipes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vac.core.config import Machinetype, VacuumPipe
from vac.core.vcycleconfig import CloudMachinetype, Space
from vac.daemon.vcycled import expand_space_pipes

URL = "https://pipes.example.org/lhcb.json"


def pipe_document(*entries: dict) -> bytes:
    return json.dumps({"machinetypes": list(entries)}).encode()


def space_with_pipe(**changes) -> Space:
    local = CloudMachinetype(Machinetype(name="local", target_share=1.0, user_data="u", root_image="image:x"))
    values = dict(name="cloud.example.org", api="ec2", url="https://ec2.example.org", flavor_names=("m1.large",),
                  machinetypes={"local": local}, vacuum_pipes={"lhcb": VacuumPipe("lhcb", URL, target_share=4.0)})
    return Space(**{**values, **changes})


def test_pipe_machinetypes_join_the_space_with_its_flavors(tmp_path: Path) -> None:
    fetched = []

    def fetcher(url: str) -> bytes:
        fetched.append(url)
        return pipe_document(
            {"suffix": "prod", "root_image": "https://images.example.org/cernvm4.iso", "user_data": "https://pipes.example.org/ud",
             "target_share": 3},
            {"suffix": "test", "root_image": "https://images.example.org/cernvm4-test.iso", "user_data": "https://pipes.example.org/ud",
             "target_share": 1},
            {"suffix": "box", "machine_model": "docker", "root_image": "docker://x", "user_data": "u",
             "target_share": 1})

    space = expand_space_pipes(space_with_pipe(), str(tmp_path), fetcher)
    assert fetched == [URL]
    assert sorted(space.machinetypes) == ["lhcb-prod", "lhcb-test", "local"]  # docker cannot run on a cloud
    prod = space.machinetypes["lhcb-prod"]
    # the pipe's share 4 split 3:1:1 over its entries, as vacd splits it
    assert prod.flavor_names == ("m1.large",) and prod.machinetype.target_share == pytest.approx(2.4)
    assert (tmp_path / "pipescache" / "lhcb.pipe").is_file()


def test_a_space_without_pipes_is_unchanged(tmp_path: Path) -> None:
    space = space_with_pipe(vacuum_pipes={})
    assert expand_space_pipes(space, str(tmp_path), lambda url: b"never") is space
