"""Which reloaded settings wait for a restart (vac.core.reload), and that vac.conf(5) says so."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from vac.core.config import Config, Machinetype, Settings
from vac.core.reload import RESTART_NEEDED, RestartNotices, config_after_reload

RUNNING = Settings(vac_space="space.example.org", factory_name="f1.example.org",
                   state_dir="/var/lib/vac", total_processors=8)


def loaded(**changes) -> Config:
    settings = dataclasses.replace(RUNNING, **changes)
    path = f"{settings.state_dir}/machinetypes/lhcb"
    return Config(settings=settings, machinetypes={"lhcb": Machinetype("lhcb", machinetype_path=path)})


def test_every_restart_needed_option_is_a_setting():
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert RESTART_NEEDED <= fields, RESTART_NEEDED - fields


def test_the_man_page_marks_exactly_the_restart_needed_options():
    page = (Path(__file__).parent.parent / "man" / "vac.conf.5").read_text()
    section = page[page.index('.SH "[settings] SECTION"'):page.index('.SH "[machinetype NAME]')]
    marked = set()
    for entry in section.split("\n.TP\n")[1:]:
        lines = entry.splitlines()
        headings = [lines[0]] + [line for before, line in zip(lines, lines[1:]) if before == ".TQ"]
        names = {match.group(1) for match in (re.match(r'\.BI "?([a-z0-9_]+) = ', heading)
                                              for heading in headings) if match}
        if "Restart needed" in entry:
            marked |= names
    assert marked == RESTART_NEEDED


def test_restart_needed_options_keep_their_running_value_and_live_ones_change():
    config, waiting = config_after_reload(RUNNING, loaded(
        vacquery_port=9995, total_processors=16, draining=True, peer_cache_seconds=5.0))
    assert waiting == {"total_processors": 16, "vacquery_port": 9995}
    assert (config.settings.vacquery_port, config.settings.total_processors) == (995, 8)
    assert config.settings.draining and config.settings.peer_cache_seconds == 5.0


def test_a_waiting_state_dir_keeps_the_machinetype_directories_too():
    config, waiting = config_after_reload(RUNNING, loaded(state_dir="/srv/vac"))
    assert waiting == {"state_dir": "/srv/vac"}
    assert config.settings.state_dir == "/var/lib/vac"
    assert config.machinetypes["lhcb"].machinetype_path == "/var/lib/vac/machinetypes/lhcb"


def test_each_change_is_told_once():
    notices = RestartNotices()
    _, lines = notices.review(RUNNING, loaded(vacquery_address="127.0.0.1"))
    assert lines == ['vacquery_address changed from "" to 127.0.0.1: this needs a restart of '
                     'vacd; keeping "" until then']
    assert notices.review(RUNNING, loaded(vacquery_address="127.0.0.1"))[1] == []
    assert len(notices.review(RUNNING, loaded(vacquery_address="127.0.0.2"))[1]) == 1
    assert notices.review(RUNNING, loaded())[1] == []  # changed back: nothing waits
    assert len(notices.review(RUNNING, loaded(vacquery_address="127.0.0.2"))[1]) == 1
    _, lines = notices.review(RUNNING, loaded(metrics_port=9100, vacquery_address="127.0.0.2"))
    assert lines == ["metrics_port changed from (unset) to 9100: this needs a restart of vacd; "
                     "keeping (unset) until then"]
