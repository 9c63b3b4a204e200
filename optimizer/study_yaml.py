"""A study file from untrusted hands: read within bounds, parsed within bounds.

Reading: a regular file only (a FIFO would block, ``/dev/zero`` never ends) of at most ``MAX_BYTES``.
Parsing: nesting at most ``MAX_DEPTH`` deep and at most ``MAX_NODES`` nodes once every alias is expanded. PyYAML
shares an aliased node instead of copying it, but everything that walks the document afterwards (the line map
for error messages, pydantic) visits it once per reference: nine references per level, nested a few levels
deep, is a file of a few hundred bytes that expands to billions of nodes. The loader counts the expansion as it
composes, so such a file is refused at the alias that crosses the bound, before anything walks it.

Errors are :class:`StudyFileError` (a ``yaml.YAMLError``, so lenient readers that already catch those need no
change), with the 1-based line and a sentence that says the bound.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from servetune.optimizer import safe_read

MAX_BYTES = 1024 * 1024  # a study is a few kB; a megabyte is far beyond any real one
MAX_DEPTH = 64  # a study nests 6 levels deep at most
MAX_NODES = 100_000  # after alias expansion; a large study has a few hundred
MAX_TEXT = 10_000  # characters in one value: paths, flags, names (one argv word may not pass 128 KiB)

# Control characters that may not appear in a value, even escaped inside a double-quoted string ("\0", "\e"):
# they end C strings (argv, environment) and corrupt logs. Tab, newline and carriage return are text.
_CONTROL = {chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"} | {"\x7f"}
_NAMES = {0: "NUL", 0x1B: "ESC", 0x7F: "DEL"}


class StudyFileError(yaml.YAMLError):
    """A study file refused before validation: ``line`` (1-based), ``where`` (a key path or a category in
    parentheses) and ``message``."""

    def __init__(self, line: int, where: str, message: str, node: yaml.Node | None = None):
        super().__init__(f"line {line}: {where}: {message}")
        self.line, self.where, self.message = line, where, message
        self.node = node  # the value it is about, when there is one (its key path is found in the tree)


def char_name(c: str) -> str:
    o = ord(c)
    return f"U+{o:04X}" + (f" ({_NAMES[o]})" if o in _NAMES else "")


def read_text(path: str | os.PathLike, what: str = "study file", max_bytes: int = MAX_BYTES) -> str:
    """The file's text: a regular file of at most ``max_bytes``, UTF-8. Raises :class:`StudyFileError` (line 1,
    where ``(file)``, or the line of a byte that is not UTF-8) for anything else."""
    try:
        data = safe_read.read_bytes(path, max_bytes, what)
    except FileNotFoundError:
        raise StudyFileError(1, "(file)", "no such file") from None
    except IsADirectoryError:
        raise StudyFileError(1, "(file)", f"is a directory; give the {what}") from None
    except safe_read.NotReadable as e:
        raise StudyFileError(1, "(file)", str(e)) from None
    except OSError as e:
        raise StudyFileError(1, "(file)", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StudyFileError(line, "(file)", f"not UTF-8 text ({e.reason} at byte {e.start})") from None


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts, while it composes, how deep the document nests and how many nodes it
    holds with every alias expanded, and refuses a document past ``MAX_DEPTH`` / ``MAX_NODES`` or one with an
    alias to a node that contains it."""

    def __init__(self, stream: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES):
        super().__init__(stream)
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self._depth = 0
        self._total = 0  # nodes of the expanded document so far
        self._shape: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
        self._open: list[list[int]] = []  # for each node being composed: [children's size, children's depth]

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # an unknown alias is PyYAML's own error
                line = event.start_mark.line + 1
                if id(node) not in self._shape:
                    raise StudyFileError(line, "(aliases)", f"the alias *{event.anchor} refers to a node that "
                                                            "contains it; a study cannot hold a structure that "
                                                            "contains itself")
                size, depth = self._shape[id(node)]
                self._total += size
                if self._total > self.max_nodes:
                    raise StudyFileError(line, "(aliases)", f"the alias *{event.anchor} expands the document past "
                                                            f"{self.max_nodes:,} values; a study file holds at most "
                                                            f"{self.max_nodes:,} values once its aliases are "
                                                            "expanded")
                if self._depth + depth > self.max_depth:
                    raise StudyFileError(line, "(aliases)", f"the alias *{event.anchor} nests the document more "
                                                            f"than {self.max_depth} levels deep; a study nests at "
                                                            f"most {self.max_depth}")
                self._add_to_parent(size, depth)
            return super().compose_node(parent, index)
        if self._depth >= self.max_depth:
            mark = self.peek_event().start_mark
            raise StudyFileError(mark.line + 1, "(nesting)", f"the document nests more than {self.max_depth} "
                                                              f"levels deep; a study nests at most {self.max_depth}")
        self._depth += 1
        self._open.append([0, 0])
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            kids_size, kids_depth = self._open.pop()
        shape = (1 + kids_size, 1 + kids_depth)
        self._shape[id(node)] = shape
        self._total += 1
        if self._total > self.max_nodes:
            raise StudyFileError(node.start_mark.line + 1, "(size)", f"the document holds more than "
                                                                     f"{self.max_nodes:,} values")
        self._add_to_parent(*shape)
        return node

    def construct_object(self, node, deep=False):
        # a value the constructor cannot make (`!!int abc`, an integer of 5,000 digits) is an error at its line
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:
            text = node.value if isinstance(node.value, str) else ""
            shown = repr(text if len(text) <= 40 else text[:37] + "...")
            digits = sum(c.isdigit() for c in text)
            why = (f"a number of {digits:,} digits; no number in a study is that large" if digits > 100
                   else str(e)[:200])
            raise StudyFileError(node.start_mark.line + 1, "(syntax)", f"cannot read the value {shown}: "
                                                                       f"{why}", node) from None

    def _add_to_parent(self, size: int, depth: int) -> None:
        if self._open:
            self._open[-1][0] += size
            self._open[-1][1] = max(self._open[-1][1], depth)


def value_errors(root: yaml.Node) -> list[tuple[int, tuple, str]]:
    """(line, key path, message) for each text value or key holding a control character (YAML lets a
    double-quoted string spell them as escapes) or longer than ``MAX_TEXT``."""
    errs: list[tuple[int, tuple, str]] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            bad = next((c for c in node.value if c in _CONTROL), None)
            if bad is not None:
                errs.append((node.start_mark.line + 1, path, f"holds the control character {char_name(bad)}; "
                                                             "a study's values are plain text"))
            elif len(node.value) > MAX_TEXT:
                errs.append((node.start_mark.line + 1, path, f"a value of {len(node.value):,} characters; a "
                                                             f"study's values are at most {MAX_TEXT:,}"))
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                kp = path + (k.value,) if isinstance(k, yaml.ScalarNode) else path
                stack.append((v, kp))
                stack.append((k, path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (i,)) for i, v in enumerate(node.value))
    return errs


def path_of(root: yaml.Node, target: yaml.Node) -> tuple | None:
    """The key path of ``target`` in the document (the first one, when aliases share it)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((v, path + (k.value,)) for k, v in node.value if isinstance(k, yaml.ScalarNode))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (i,)) for i, v in enumerate(node.value))
    return None


def reader_error(e: yaml.reader.ReaderError, text: str) -> StudyFileError:
    """PyYAML's reader refuses control characters in the text itself; say where, as a line and column."""
    pos = max(0, min(int(getattr(e, "position", 0) or 0), len(text)))
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    ch = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
    return StudyFileError(line, "(file)", f"the control character {char_name(chr(ch))} at column {col}; a study "
                                          "file is plain text (binary data or a corrupted file?)")


def load(text: str) -> Any:
    """``yaml.safe_load`` within the bounds (for readers of a study copied into a run directory)."""
    try:
        loader = BoundedLoader(text)
    except yaml.reader.ReaderError as e:
        raise reader_error(e, text) from None
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
