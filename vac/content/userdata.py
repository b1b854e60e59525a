"""user_data templates: fetching them and filling in ``##user_data_*##`` (REFERENCE.md §8).

* ``fetch_template(machinetype, settings) -> (text, url or None)``: the machinetype's
  ``user_data``, an http(s) URL (fetched at every creation, never cached: TN-2016-04), an
  absolute path, or a name under ``<machinetype_path>/files/``.
* ``build_user_data(template_text, *, settings, machinetype, machine, template_url, proxy_pem,
  files=None) -> str``: every substitution of §8.2. Pure when ``files`` (the contents of the
  ``user_data_file_XXX`` files, from ``read_user_data_files``) is given; reads them otherwise.

Substitution is one pass over the template: each ``##user_data_[a-z0-9_]*##`` is replaced by
its value, or removed when it has none. Inserted values are never scanned again, so the result
does not depend on any order (classic Vac applied options in dictionary order, and patterns
inside inserted values were replaced or removed depending on it) and a value (an option from a
remote vacuum pipe, a file) cannot inject further substitutions. Where two sources give the
same pattern, the earlier one in §8.2 wins, as in the classic sequence: the X.509 proxy over an
option called ``x509_proxy``, an option over a file of the same name for
``##user_data_option_XXX##``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from vac import __version__
from vac.content.fetch import Fetcher, FetchError, is_url
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.core.values import http_base_url

MAX_TEMPLATE_BYTES = 1024 * 1024  # templates and user_data_file_* files; EC2 allows far less
TEMPLATE_TIMEOUT = 30.0  # classic: 30 s for the whole transfer
PATTERN = re.compile(r"##(user_data_[a-z0-9_]*)##")


class UserDataError(Exception):
    """A template or file cannot be had or used; the message says which and why."""


# -- reading ------------------------------------------------------------------------------------


def machinetype_file(machinetype: Machinetype, name: str, what: str) -> Path:
    """``name`` if absolute, else ``<machinetype_path>/files/<name>`` (which it may not leave)."""
    path = Path(name)
    if path.is_absolute():
        return path
    if not name or ".." in path.parts:
        raise UserDataError(f"machinetype {machinetype.name}: {what} {name!r} is not a file name "
                            "inside the files directory")
    return Path(machinetype.machinetype_path) / "files" / path


def _decode(data: bytes, source: str) -> str:
    if len(data) > MAX_TEMPLATE_BYTES:
        raise UserDataError(f"{source} is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserDataError(f"{source} is not UTF-8 text: {error}") from None


def read_machinetype_file(machinetype: Machinetype, name: str, what: str) -> str:
    path = machinetype_file(machinetype, name, what)
    try:
        with open(path, "rb") as text_file:
            data = text_file.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as error:
        raise UserDataError(f"machinetype {machinetype.name}: cannot read {what} {path}: "
                            f"{error.strerror}") from None
    return _decode(data, f"{what} {path}")


def fetch_url(url: str, fetcher: Optional[Fetcher] = None, timeout: float = TEMPLATE_TIMEOUT) -> str:
    """GET a template: redirects followed, TLS verified, size and total time capped."""
    try:
        if fetcher is not None:
            data = fetcher.get_bytes(url, timeout=timeout, max_bytes=MAX_TEMPLATE_BYTES)
        else:
            with Fetcher() as own:
                data = own.get_bytes(url, timeout=timeout, max_bytes=MAX_TEMPLATE_BYTES)
    except FetchError as error:
        raise UserDataError(f"cannot fetch user_data template {url}: {error.reason}") from None
    return _decode(data, f"user_data template {url}")


def fetch_template(machinetype: Machinetype, settings: Settings,
                   fetcher: Optional[Fetcher] = None) -> tuple[str, Optional[str]]:
    """The machinetype's template text, and its URL if it was fetched (for ``##user_data_url##``).

    ``settings`` is accepted for symmetry with ``build_user_data``; nothing in it changes reading.
    """
    source = machinetype.user_data
    if not source:
        raise UserDataError(f"machinetype {machinetype.name} has no user_data")
    if is_url(source):
        return fetch_url(source, fetcher), source
    return read_machinetype_file(machinetype, source, "user_data"), None


def read_user_data_files(machinetype: Machinetype) -> dict[str, str]:
    """The contents of every ``user_data_file_XXX``, by XXX."""
    return {name: read_machinetype_file(machinetype, path, f"user_data_file_{name}")
            for name, path in machinetype.user_data_files}


# -- substituting (pure) ------------------------------------------------------------------------


def substitution_values(*, settings: Settings, machinetype: Machinetype, machine: Machine,
                        template_url: Optional[str], proxy_pem: Optional[str],
                        files: Mapping[str, str]) -> dict[str, str]:
    """Pattern name (``user_data_...``) -> value, in REFERENCE.md §8.2 order; first one wins."""
    manager_version = f"Vac {__version__}"
    mjf = http_base_url("http", settings.mjf_address, settings.http_port)
    root_image = machinetype.root_image or ""
    ordered: list[tuple[str, Optional[str]]] = [
        ("url", template_url),
        ("space", settings.vac_space),
        ("machinetype", machinetype.name),
        ("machine_hostname", machine.name),
        ("manager_version", manager_version),
        ("manager_hostname", settings.factory_name),
        ("machinefeatures_url", f"{mjf}/machinefeatures"),
        ("jobfeatures_url", f"{mjf}/jobfeatures"),
        ("joboutputs_url", f"{mjf}/joboutputs"),
        ("root_image_url", root_image if is_url(root_image) else None),
        ("vmtype", machinetype.name),
        ("vm_hostname", machine.name),
        ("vmlm_version", manager_version),
        ("vmlm_hostname", settings.factory_name),
        ("uuid", machine.uuid),
        ("option_x509_proxy", proxy_pem),
    ]
    ordered += [(f"option_{name}", value) for name, value in machinetype.user_data_options]
    for name, _ in machinetype.user_data_files:
        ordered += [(f"file_{name}", files.get(name)), (f"option_{name}", files.get(name))]
    ordered.append(("site", settings.gocdb_sitename))
    values: dict[str, str] = {}
    for name, value in ordered:
        if value is not None:
            values.setdefault(f"user_data_{name}", value)
    return values


def substitute(template_text: str, values: Mapping[str, str]) -> str:
    """Replace each ``##user_data_...##`` by its value in one pass; unknown ones are removed."""
    return PATTERN.sub(lambda match: values.get(match.group(1), ""), template_text)


def build_user_data(template_text: str, *, settings: Settings, machinetype: Machinetype,
                    machine: Machine, template_url: Optional[str], proxy_pem: Optional[str],
                    files: Optional[Mapping[str, str]] = None,
                    overrides: Optional[Mapping[str, str]] = None) -> str:
    """The machine's user_data. ``proxy_pem`` is required when ``user_data_proxy`` is set.
    ``overrides`` (pattern name -> value) replace values of §8.2: vcycle's MJF URLs and manager
    version."""
    if machinetype.user_data_proxy and not proxy_pem:
        raise UserDataError(f"machinetype {machinetype.name} has user_data_proxy = true but no "
                            "proxy was made")
    if files is None:
        files = read_user_data_files(machinetype)
    values = substitution_values(settings=settings, machinetype=machinetype, machine=machine,
                                 template_url=template_url, proxy_pem=proxy_pem, files=files)
    values.update(overrides or {})
    return substitute(template_text, values)
