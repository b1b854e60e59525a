"""Layered INI files with located problems: what vac's configuration (vac.core.config) and
vcycle's (vac.core.vcycleconfig) read the same way.

* ``read_layers(conf_dir, main_conf, run_confs, problems)``: every ``*.conf`` of ``conf_dir`` in
  name order, then ``main_conf``, then ``run_confs`` (missing ones skipped), each parsed into
  ``Block``s; ``sort_problems`` then orders the problems by file in that order and by line.
* ``Problem``: an error or warning with its file, line, section and option; ``ConfigError``
  carries all of them.
* ``merge``: the blocks of all files merged into ``Section``s by the configuration's own
  ``section_of`` and ``OptionRules`` (known, deprecated, ignored options).
* ``Section``: one merged section, its option values (``Value``, each with the file and line
  that set it); ``Builder`` converts a section's values into dataclass fields with the option
  converters, recording problems and each value's source.

Parsing follows the classic Python 2 ``RawConfigParser`` the existing files were written for:
``name = value`` or ``name: value``, names and section names case-insensitive, ``#``/``;``
comment lines, `` ;`` inline comments, indented continuation lines, ``""`` for an empty value.
Which sections and options exist is each configuration's own (its ``section_of`` and rules).

Pure: the standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from vac.core.schema import OPTION_SUFFIX
from vac.core.values import Converter, WithWarning

ERROR = "error"
WARNING = "warning"

MAX_FILE_BYTES = 1024 * 1024  # far above any real configuration file


# --- problems ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One error or warning, located as precisely as possible."""

    level: str  # ERROR or WARNING
    message: str
    file: Optional[str] = None
    line: Optional[int] = None
    section: Optional[str] = None  # "settings", "machinetype lhcb", ...
    option: Optional[str] = None

    @property
    def is_error(self) -> bool:
        return self.level == ERROR

    def __str__(self) -> str:
        text = self.message
        subject = " ".join(part for part in (f"[{self.section}]" if self.section else "", self.option or "") if part)
        if subject:
            text = f"{subject}: {text}"
        if self.file:
            where = f"{self.file}:{self.line}" if self.line else self.file
            text = f"{where}: {text}"
        return text


class ConfigError(Exception):
    """The configuration has errors; ``problems`` lists all of them (and the warnings)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems if problem.is_error))


def sort_problems(problems: list[Problem], files: Sequence[str], conf_dir: str) -> None:
    """Sort in place: ``conf_dir``'s own problems first, then by file in reading order and by
    line; problems of no file last."""
    order = {path: index for index, path in enumerate(files)}
    order[conf_dir] = -1
    problems.sort(key=lambda p: (order.get(p.file, len(order)) if p.file else len(order) + 1, p.line or 0))


# --- reading INI files ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Value:
    """An option's text as written, and where."""

    text: str
    file: str
    line: int  # 0: not from a file with lines (options given as a mapping)
    written_as: str  # the option name in the file (a deprecated name, say)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclasses.dataclass
class Block:
    """One ``[header]`` and its option lines, as written in one file."""

    header: str
    file: str
    line: int
    options: list = dataclasses.field(default_factory=list)  # [name, text, line]


_HEADER = re.compile(r"\[([^\]]*)\]\s*(?:[#;].*)?\Z")
_INLINE_COMMENT = re.compile(r"\s;")


def _strip_inline_comment(text: str) -> str:
    match = _INLINE_COMMENT.search(text)
    return (text[: match.start()] if match else text).strip()


def parse_ini(text: str, file: str, problems: list[Problem]) -> list[Block]:
    """The sections of one file's ``text`` in order (a header may repeat); malformed lines
    become problems."""
    blocks: list[Block] = []
    current: Optional[Block] = None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if line[0].isspace() and current is not None and current.options:
            continuation = _strip_inline_comment(stripped)
            if continuation:
                last = current.options[-1]
                last[1] = f"{last[1]}\n{continuation}" if last[1] else continuation
            continue
        if stripped.startswith("["):
            match = _HEADER.match(stripped)
            if not match or not match.group(1).strip():
                problems.append(Problem(ERROR, f"malformed section header {stripped!r}", file, number))
                current = Block(stripped, file, number)  # its options are read but dropped
                continue
            current = Block(match.group(1).strip(), file, number)
            blocks.append(current)
            continue
        separator = min((i for i in (stripped.find("="), stripped.find(":")) if i >= 0), default=-1)
        name = stripped[:separator].strip().lower() if separator > 0 else ""
        if not name:
            problems.append(Problem(ERROR, f"expected 'option = value' or a [section] header, not {stripped!r}", file, number))
            continue
        if current is None:
            problems.append(Problem(ERROR, "option outside any [section]", file, number, option=name))
            continue
        value = _strip_inline_comment(stripped[separator + 1 :])
        current.options.append([name, "" if value == '""' else value, number])
    return blocks


def _read_file(path: str, problems: list[Problem], *, may_be_missing: bool) -> Optional[str]:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if not may_be_missing:
            problems.append(Problem(ERROR, "cannot read: no such file", path))
        return None
    except OSError as error:
        problems.append(Problem(ERROR, f"cannot read: {error.strerror}", path))
        return None
    if len(data) > MAX_FILE_BYTES:
        problems.append(Problem(ERROR, f"larger than {MAX_FILE_BYTES} bytes: not a configuration file", path))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        problems.append(Problem(ERROR, f"not UTF-8 text (byte 0x{data[error.start]:02x})", path, line))
        return None
    return text.removeprefix("\ufeff")


def _files_to_read(conf_dir: str, main_conf: str, run_confs: Sequence[str],
                   problems: list[Problem]) -> list[tuple[str, bool]]:
    """(path, may_be_missing) in reading order."""
    files: list[tuple[str, bool]] = []
    try:
        entries = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        entries = []
    except OSError as error:
        problems.append(Problem(ERROR, f"cannot list directory: {error.strerror}", conf_dir))
        entries = []
    for entry in entries:
        if entry.endswith(".conf") and not entry.startswith("."):
            path = os.path.join(conf_dir, entry)
            if os.path.isdir(path):
                problems.append(Problem(WARNING, "is a directory; ignored", path))
            elif os.path.exists(path) and not os.path.isfile(path):
                # A FIFO or device would block or never end: every reload would hang.
                problems.append(Problem(WARNING, "is not a regular file; ignored", path))
            else:
                files.append((path, False))
    files.append((main_conf, True))
    seen = set()
    for run_conf in run_confs:
        # /var/run is usually a link to /run: read that file once.
        real = os.path.realpath(run_conf)
        if real not in seen:
            seen.add(real)
            files.append((run_conf, True))
    return files


def read_layers(conf_dir: str, main_conf: str, run_confs: Sequence[str], problems: list[Problem]
                ) -> tuple[list[str], list[tuple[str, list[Block]]]]:
    """(every file in reading order, [(file, its blocks)] of those that could be read)."""
    files = _files_to_read(conf_dir, main_conf, run_confs, problems)
    parsed: list[tuple[str, list[Block]]] = []
    for path, may_be_missing in files:
        text = _read_file(path, problems, may_be_missing=may_be_missing)
        if text is not None:
            parsed.append((path, parse_ini(text, path, problems)))
    return [path for path, _ in files], parsed


# --- merged sections and their typed values ------------------------------------------------------


@dataclasses.dataclass
class Section:
    """One section merged from every file that has it; later values win."""

    kind: str  # "settings", "machinetype" or "vacuum_pipe"
    name: str  # "" for settings
    file: str
    line: int
    values: dict = dataclasses.field(default_factory=dict)  # canonical option -> Value

    @property
    def key(self) -> tuple:
        """What identifies the section across files."""
        return self.kind, self.name

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.name else self.kind


@dataclasses.dataclass(frozen=True)
class OptionRules:
    """The options a kind of section takes, and what is said of the others."""

    known: Mapping[str, Any]  # option -> converter
    prefixes: tuple[str, ...] = ()  # families of options, such as user_data_option_XXX
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # deprecated -> option
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option -> why (a warning)
    elsewhere: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option -> its section

    def unknown(self, option: str) -> str:
        """The warning for an option that is not known: where it belongs, or a near name."""
        if option in self.elsewhere:
            return f"unknown option ignored (it is a {self.elsewhere[option]} option)"
        close = difflib.get_close_matches(option, list(self.known), n=1)
        return "unknown option ignored" + (f" (did you mean {close[0]}?)" if close else "")


def merge(parsed: Sequence[tuple[str, list[Block]]], problems: list[Problem],
          section_of: Callable[[Block, list[Problem]], Optional[Section]],
          rules_of: Callable[[str], OptionRules]) -> dict[tuple, Section]:
    """The sections of all ``parsed`` files by ``Section.key``, same-keyed ones merged (later
    values win). ``section_of`` gives a block's empty section, or None (with a problem) if its
    options are not read; ``rules_of(kind)`` what such a section takes. Deprecated, ignored and
    unknown options are warnings, an option set twice in one file an error."""
    sections: dict[tuple, Section] = {}
    for file, blocks in parsed:
        set_here: dict[tuple, Value] = {}  # duplicates inside one file
        for block in blocks:
            fresh = section_of(block, problems)
            if fresh is None:
                continue
            section = sections.setdefault(fresh.key, fresh)
            rules = rules_of(section.kind)
            for name, text, line in block.options:
                canonical = rules.renamed.get(name, name)
                complaint = None
                if name in rules.renamed:
                    problems.append(Problem(WARNING, f"deprecated: use {canonical}", file, line, section.label, name))
                elif name in rules.ignored:
                    complaint = (WARNING, rules.ignored[name])
                elif name not in rules.known and not name.startswith(rules.prefixes):
                    complaint = (WARNING, rules.unknown(name))
                earlier = set_here.get((section.key, canonical))
                if complaint is None and earlier is not None:
                    also = f" (as {earlier.written_as})" if earlier.written_as != name else ""
                    complaint = (ERROR, f"already set{also} at line {earlier.line} of this file")
                if complaint is not None:
                    problems.append(Problem(*complaint, file, line, section.label, name))
                    continue
                value = Value(text, file, line, name)
                set_here[(section.key, canonical)] = value
                section.values[canonical] = value
    return sections


class Builder:
    """Converts one merged section into dataclass field values, collecting problems and
    recording in ``sources`` where each value came from."""

    def __init__(self, section: Section, problems: list[Problem], sources: dict) -> None:
        self.section = section
        self.problems = problems
        self.sources = sources
        self.failed = False
        self.bad: set[str] = set()  # options whose value was rejected

    def problem(self, level: str, message: str, option: Optional[str] = None, value: Optional[Value] = None) -> None:
        file, line = (value.file, value.line) if value else (self.section.file, self.section.line)
        written = value.written_as if value else option
        self.problems.append(Problem(level, message, file, line, self.section.label, written))
        if level == ERROR:
            self.failed = True
            if option is not None:
                self.bad.add(option)

    def convert(self, table: Mapping[str, Converter], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """Typed values of the options in ``table`` that the section sets."""
        fields: dict[str, Any] = {}
        for option, value in self.section.values.items():
            convert = table.get(option)
            if convert is None:
                continue
            self.sources[(self.section.label, option)] = value.where
            if value.text == "" and defaults.get(option, dataclasses.MISSING) in (None, dataclasses.MISSING):
                continue  # an empty value unsets an option that has no default
            try:
                converted = convert(value.text)
            except ValueError as error:
                self.problem(ERROR, str(error), option, value)
                continue
            if isinstance(converted, WithWarning):
                self.problem(WARNING, converted.warning, option, value)
                converted = converted.value
            fields[option] = converted
        return fields

    def pairs(self, prefixes: Mapping[str, str], inherited: Optional[Mapping[str, tuple]] = None) -> dict[str, tuple]:
        """The (suffix, value) tuples of prefixed options, over ``inherited`` ones."""
        collected: dict[str, dict[str, str]] = {field: dict(inherited.get(field, ())) if inherited else {} for field in prefixes.values()}
        for option, value in self.section.values.items():
            prefix = next((p for p in prefixes if option.startswith(p)), None)
            if prefix is None:
                continue
            suffix = option[len(prefix) :]
            if not OPTION_SUFFIX.match(suffix):
                self.problem(ERROR, f"the part after {prefix} may only contain a-z, 0-9 and _", option, value)
                continue
            self.sources[(self.section.label, option)] = value.where
            collected[prefixes[prefix]][suffix] = value.text
        return {field: tuple(sorted(values.items())) for field, values in collected.items()}

    def required(self, fields: Mapping[str, Any], option: str) -> None:
        if option not in fields and option not in self.bad:
            self.problem(ERROR, "required option not set", option)

    def at(self, option: str) -> Optional[Value]:
        return self.section.values.get(option)


@functools.cache
def field_defaults(cls: type) -> Mapping[str, Any]:
    """Field name -> default (``dataclasses.MISSING`` if none) of a dataclass."""
    return {field.name: field.default for field in dataclasses.fields(cls)}


def record_defaults(cls: type, label: str, sources: dict, skip: tuple = ()) -> None:
    """Every field the files did not set comes from its default (or the host)."""
    for field in dataclasses.fields(cls):
        if field.name not in skip:
            sources.setdefault((label, field.name), "default")
