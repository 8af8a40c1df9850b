"""Compare the host doubles under ``tests/webui`` with the pinned host sources they imitate (issue 12, house-keeping).

    python tools/check_doubles.py --a1111 DIR --forge-classic DIR --forge-new DIR [--k-diffusion DIR] [--json]

Each DIR is a WebUI checkout at the pinned commit (A1111 82a973c0, Forge bfee03d8, Forge dfdcbab6); a host left out
is not checked. Not run in CI: it needs the host trees. It only reads sources (``ast``), imports nothing from the
doubles or the hosts, and writes nothing.

Which host file a double imitates
  * A double sits at its host's import path: ``tests/webui/<layer>/<path>`` imitates ``<path>`` of its layer's hosts
    (``a1111``: A1111; ``forge``: both Forge generations; ``forge_classic``, ``forge_new``: one). The Forge doubles
    are layered (``tests/webui/forge/hostlayers.py``): for a Forge host the double of a path is the first layer that
    has it, so an A1111 double that no Forge layer replaces is compared with Forge's file too.
  * The docstring's citation (``Imitates ``modules/a.py`` + ``modules/b.py`` ...``, up to its first colon) must name
    that path first; the further files it names are searched too, in order (a bare name is in the first one's folder).
  * ``# host: PATH[:NAME]`` on a definition names the host file (and name) it imitates instead; per host:
    ``# host: forge-classic=PATH[:NAME], forge-new=PATH[:NAME]`` (a host not named there does not check it). Files
    at a layer's top (``forge/forge_common.py``) are at no host path: only such comments say what their names are.
  * A host path is looked up in the WebUI folder, then in its k-diffusion (``repositories/k-diffusion``; for A1111
    ``--k-diffusion``). A name the host file imports from its own tree is followed to its definition.

What is compared (only what the double defines)
  * module-level functions, classes and bound names (constants, instances); names in ``__all__`` a double imports
    from ``forge_common``; ``x = base.x`` taken from the A1111 double (followed to the definition); ``x = obj.method``
    of an instance ``obj = Class()`` (a bound method, compared without ``self``);
  * a class's methods and class attributes, with those it inherits from a double class, and the ``__init__`` a
    ``@dataclass`` writes (on the host side also the one a ``namedtuple`` base gives);
  * parameters: names, order, positional-only / keyword-only, ``*args`` / ``**kwargs``, which have defaults (not the
    values). Methods are compared as called on an instance (without ``self``), so a staticmethod matches a method
    with the same parameters, and a double's bound method standing for a host function compares the same way;
  * kinds: a class against a function, a method against a property;
  * attributes and module-level values only by presence: anything the host binds at module level (imports
    included), or in its class body, or assigns to ``self.`` in a method of the class or its bases, counts.

Conventions in the doubles (a marker sits on the definition's first line(s) or on comment lines right above it; its
reason may go on over the comment lines below it)
  * ``_name``: the double's own helper, not compared; ``base = a1111_module("x")`` / ``forge_module("x")`` (the
    layering) neither, but ``base.y`` is followed to that layer's definition.
  * ``# double-only: REASON``: a test helper the host lacks (a recorder, a stand-in); not compared, but reported if
    the host does define that name.
  * ``# double-simplified: REASON``: the double deliberately differs from the host's signature or kind; the
    differences are listed as explained. One that explains nothing on any host is reported as stale.
  A marker without a reason is a finding.

Exit status: 0 when every compared name matches or is explained, 1 otherwise, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBUI_DOUBLES = ROOT / "tests" / "webui"
HOST_NAMES = {"a1111": "A1111 1.10.1 (82a973c0)", "forge-classic": "Forge classic (bfee03d8)",
              "forge-new": "Forge new (dfdcbab6)"}
NOT_DOUBLES = {"forge/hostlayers.py"}  # the layering machinery: no host counterpart
MARKER_RE = re.compile(r"(double-only|double-simplified)\b:?\s*(.*?)\s*$")
HOST_RE = re.compile(r"^host:\s*(.*?)\s*$")
CITATION_RE = re.compile(r"``([\w./-]+\.py)``")


def _load_layers() -> dict[str, list[Path]]:
    spec = importlib.util.spec_from_file_location("_hostlayers", WEBUI_DOUBLES / "forge" / "hostlayers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LAYERS


# ---------------------------------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "positional-only", "positional", "*", "keyword-only", "**"
    default: str | None = None  # the default's source text; None: no default

    def __str__(self):
        prefix = {"*": "*", "**": "**"}.get(self.kind, "")
        return f"{prefix}{self.name}" + ("" if self.default is None else f"={self.default}")


@dataclass(frozen=True)
class Sig:
    params: tuple[Param, ...]

    @classmethod
    def of(cls, args: ast.arguments) -> Sig:
        positional = [*args.posonlyargs, *args.args]
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        params = [Param(a.arg, "positional-only" if i < len(args.posonlyargs) else "positional",
                        None if d is None else ast.unparse(d)) for i, (a, d) in enumerate(zip(positional, defaults))]
        if args.vararg:
            params.append(Param(args.vararg.arg, "*"))
        params += [Param(a.arg, "keyword-only", None if d is None else ast.unparse(d))
                   for a, d in zip(args.kwonlyargs, args.kw_defaults)]
        if args.kwarg:
            params.append(Param(args.kwarg.arg, "**"))
        return cls(tuple(params))

    def bound(self) -> Sig:
        """As called on an instance: without the first positional parameter."""
        for i, p in enumerate(self.params):
            if p.kind in ("positional-only", "positional"):
                return Sig(self.params[:i] + self.params[i + 1:])
            break
        return self

    def __str__(self):
        out, slash, star = [], False, False
        for p in self.params:
            if p.kind != "positional-only" and any(q.kind == "positional-only" for q in self.params) and not slash:
                out.append("/")
                slash = True
            if p.kind == "keyword-only" and not star and not any(q.kind == "*" for q in self.params):
                out.append("*")
                star = True
            out.append(str(p))
        if not slash and any(q.kind == "positional-only" for q in self.params):
            out.append("/")
        return "(" + ", ".join(out) + ")"


KIND_WORDS = {"positional-only": "positional-only", "positional": "positional-or-keyword",
              "keyword-only": "keyword-only"}


def diff_signatures(double: Sig, host: Sig) -> list[str]:
    """What differs between a double's parameters and the host's, one sentence each (empty: they match)."""
    problems = []
    named = ("positional-only", "positional", "keyword-only")
    d_pos = [p for p in double.params if p.kind in named[:2]]
    h_pos = [p for p in host.params if p.kind in named[:2]]
    d_names = {p.name: p for p in double.params if p.kind in named}
    h_names = {p.name: p for p in host.params if p.kind in named}
    renamed = set()
    for i, (d, h) in enumerate(zip(d_pos, h_pos)):
        if d.name != h.name and d.name not in h_names and h.name not in d_names:
            problems.append(f"parameter {i + 1} is `{d}` where the host has `{h}` (renamed)")
            renamed |= {d.name, h.name}
            if (d.default is None) != (h.default is None):
                problems.append(f"`{d.name}` / `{h.name}`: " + ("no default in the double" if d.default is None
                                                                else "a default in the double only"))
    for word, ours, theirs in (("missing", host.params, d_names), ("extra", double.params, h_names)):
        for kind in named:
            lost = [f"`{p}`" for p in ours if p.kind == kind and p.name not in theirs and p.name not in renamed]
            if lost:
                problems.append(f"{word} {KIND_WORDS[kind]} parameter{'s' * (len(lost) > 1)} {', '.join(lost)}"
                                + (" (the host has none)" if word == "extra" and len(lost) == 1 else ""))
    kinds: dict[tuple[str, str], list[str]] = {}
    for name, d in d_names.items():
        h = h_names.get(name)
        if h is None:
            continue
        if d.kind != h.kind:
            kinds.setdefault((d.kind, h.kind), []).append(f"`{name}`")
        if (d.default is None) != (h.default is None):
            problems.append(f"`{name}` has a default in the host (`{h}`), none in the double" if d.default is None
                            else f"`{name}` has a default in the double (`{d}`), none in the host")
    for (d_kind, h_kind), names in kinds.items():
        problems.append(f"{', '.join(names)} {'are' if len(names) > 1 else 'is'} {KIND_WORDS[d_kind]} in the double, "
                        f"{KIND_WORDS[h_kind]} in the host")
    common_d = [p.name for p in d_pos if p.name in h_names and h_names[p.name].kind in named[:2]]
    common_h = [p.name for p in h_pos if p.name in d_names and d_names[p.name].kind in named[:2]]
    if common_d != common_h:
        problems.append(f"positional order ({', '.join(common_d)}) where the host has ({', '.join(common_h)})")
    for kind in ("*", "**"):
        d = next((p for p in double.params if p.kind == kind), None)
        h = next((p for p in host.params if p.kind == kind), None)
        if h and not d:
            problems.append(f"missing `{h}`")
        elif d and not h:
            problems.append(f"extra `{d}` (the host has none)")
    return problems


# ---------------------------------------------------------------------------------------------------- sources


@dataclass
class Marker:
    kind: str  # "double-only", "double-simplified", "host"
    text: str
    file: Path
    line: int


class Source:
    """One parsed file: its module-level bindings and the comments on each line."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.text, str(path))
        self.lines = self.text.splitlines()
        self.comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(self.text).readline):
            if tok.type == tokenize.COMMENT:
                self.comments[tok.start[0]] = tok.string.lstrip("#").strip()
        self.bindings: dict[str, ast.AST] = {}
        self.import_names: dict[str, tuple[str | None, int, str | None]] = {}  # name -> (module, level, attr)
        self._collect(self.tree.body)

    def _collect(self, body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.bindings[node.name] = node
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    for name, value in _targets(target, node.value):
                        self.bindings[name] = _Bound(node, value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.bindings[node.target.id] = _Bound(node, node.value)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.asname or alias.name.split(".")[0]
                    self.bindings[name] = node
                    self.import_names[name] = (alias.name if alias.asname else name, 0, None)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    name = alias.asname or alias.name
                    self.bindings[name] = node
                    self.import_names[name] = (node.module, node.level, alias.name)
            elif isinstance(node, ast.If):
                self._collect(node.body)
                self._collect(node.orelse)
            elif isinstance(node, ast.Try):
                self._collect(node.body)
                for handler in node.handlers:
                    self._collect(handler.body)
                self._collect(node.orelse)
                self._collect(node.finalbody)
            elif isinstance(node, ast.With):
                self._collect(node.body)

    def docstring(self) -> str:
        return ast.get_docstring(self.tree) or ""

    def markers(self, node: ast.AST) -> list[Marker]:
        """The markers on a statement's header lines and on the comment-only lines right above it."""
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            last = node.lineno
            for line in range(node.lineno, node.body[0].lineno):
                if not self._comment_only(line):
                    last = line
        else:
            last = getattr(node, "end_lineno", node.lineno)
        lines = list(range(first, last + 1))
        above = first - 1
        while above >= 1 and self._comment_only(above):
            lines.insert(0, above)
            above -= 1
        found: list[Marker] = []
        continues = False  # a marker's reason goes on over the comment-only lines right below it
        for line in lines:
            markers = self.line_markers(line)
            if not markers and continues and self._comment_only(line):
                found[-1].text += " " + self.comments[line]
                continue
            found += markers
            continues = bool(markers) and self._comment_only(line)
        return found

    def line_markers(self, line: int) -> list[Marker]:
        comment = self.comments.get(line)
        if comment is None:
            return []
        host = HOST_RE.match(comment)
        if host:
            return [Marker("host", host.group(1), self.path, line)]
        found = MARKER_RE.search(comment)
        return [Marker(found.group(1), found.group(2), self.path, line)] if found else []

    def _comment_only(self, line: int) -> bool:
        return 1 <= line <= len(self.lines) and self.lines[line - 1].strip().startswith("#")


@dataclass
class _Bound:
    """A name bound by an assignment: the statement and the expression bound to this name (None: unknown)."""

    stmt: ast.stmt
    value: ast.expr | None


def _targets(target, value):
    if isinstance(target, ast.Name):
        yield target.id, value
    elif isinstance(target, (ast.Tuple, ast.List)):
        values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) \
            else [None] * len(target.elts)
        for t, v in zip(target.elts, values):
            yield from _targets(t, v)


# ---------------------------------------------------------------------------------------------------- definitions


@dataclass
class Defn:
    """What a name stands for, on either side. ``kind``: function, class, method, staticmethod, classmethod,
    property, value (an assignment, an instance attribute), module, external (imported from outside the tree)."""

    name: str
    kind: str
    source: Source | None
    node: ast.AST | None = None
    sig: Sig | None = None  # callables: the full signature (methods include self)
    fields: list[Param] | None = None  # namedtuple classes
    markers: list[Marker] = field(default_factory=list)
    line: int = 0
    bound: bool = False  # a bound method standing for a function: ``sig`` is already without self

    @property
    def where(self) -> str:
        return f"{_rel(self.source.path)}:{self.line}" if self.source else "?"

    def marker(self, kind: str) -> Marker | None:
        return next((m for m in reversed(self.markers) if m.kind == kind), None)


CALLABLE = ("function", "method", "staticmethod", "classmethod")


def _decorators(node) -> set[str]:
    names = set()
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return names


def _function(node, source: Source, in_class: bool) -> Defn:
    decorators = _decorators(node)
    kind = "function"
    if in_class:
        kind = "method"
        if decorators & {"property", "cached_property"}:
            kind = "property"
        elif "staticmethod" in decorators:
            kind = "staticmethod"
        elif "classmethod" in decorators:
            kind = "classmethod"
    return Defn(node.name, kind, source, node, Sig.of(node.args), markers=source.markers(node), line=node.lineno)


def _namedtuple_fields(call: ast.expr) -> list[Param] | None:
    if not (isinstance(call, ast.Call) and len(call.args) >= 2):
        return None
    func = call.func
    if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) != "namedtuple":
        return None
    spec = call.args[1]
    if isinstance(spec, ast.Constant) and isinstance(spec.value, str):
        names = spec.value.replace(",", " ").split()
    elif isinstance(spec, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) for e in spec.elts):
        names = [e.value for e in spec.elts]
    else:
        return None
    defaults = next((k.value for k in call.keywords if k.arg == "defaults"), None)
    n_defaults = len(defaults.elts) if isinstance(defaults, (ast.List, ast.Tuple)) else 0
    return [Param(n, "positional", "..." if i >= len(names) - n_defaults else None) for i, n in enumerate(names)]


def _is_dataclass(node: ast.ClassDef) -> bool:
    return "dataclass" in _decorators(node)


def _dataclass_fields(node: ast.ClassDef) -> list[Param]:
    fields = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(stmt.annotation):
            continue
        default = None if stmt.value is None else ast.unparse(stmt.value)
        if isinstance(stmt.value, ast.Call) and getattr(stmt.value.func, "id", getattr(stmt.value.func, "attr", "")) \
                == "field":
            keywords = {k.arg: k.value for k in stmt.value.keywords}
            if isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False:
                continue
            default = ast.unparse(stmt.value) if {"default", "default_factory"} & set(keywords) else None
        fields.append(Param(stmt.target.id, "positional", default))
    return fields


def _self_attributes(node: ast.ClassDef) -> set[str]:
    names = set()
    for stmt in ast.walk(node):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] \
            if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for e in ast.walk(t):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    names.add(e.attr)
    return names


class Side:
    """Resolves names to definitions on one side (a host tree, or the doubles as one host's layers see them)."""

    follow_pass_through = False  # take a base's __init__ for an __init__(self, *args, **kwargs)

    def __init__(self):
        self._sources: dict[Path, Source] = {}

    def source(self, path: Path) -> Source:
        if path not in self._sources:
            self._sources[path] = Source(path)
        return self._sources[path]

    def module_file(self, module: str | None, level: int, importer: Path) -> Path | None:
        raise NotImplementedError

    # -- names

    def lookup(self, source: Source, name: str, depth: int = 0) -> Defn | None:
        """What ``name`` is at module level in ``source`` (None: not bound there)."""
        binding = source.bindings.get(name)
        if binding is None:
            return None
        if isinstance(binding, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return _function(binding, source, False)
        if isinstance(binding, ast.ClassDef):
            return Defn(name, "class", source, binding, markers=source.markers(binding), line=binding.lineno)
        if isinstance(binding, (ast.Import, ast.ImportFrom)):
            return self._imported(source, name, binding, depth)
        return self.value(source, name, binding, depth)

    def _imported(self, source: Source, name: str, node, depth: int) -> Defn:
        module, level, attr = source.import_names[name]
        found = None
        if depth < 8:
            if attr is None:
                path = self.module_file(module, level, source.path)
                if path:
                    found = Defn(name, "module", self.source(path), line=1)
            else:
                sub = self.module_file(f"{module}.{attr}" if module else attr, level, source.path)
                if sub:
                    found = Defn(name, "module", self.source(sub), line=1)
                else:
                    path = self.module_file(module, level, source.path)
                    if path:
                        found = self.lookup(self.source(path), attr, depth + 1)
        if found is None:
            return Defn(name, "external", source, node, markers=source.markers(node), line=node.lineno)
        return _alias(found, name, source.markers(node))

    def value(self, source: Source, name: str, bound: _Bound, depth: int) -> Defn:
        stmt_markers = source.markers(bound.stmt)
        expr = bound.value
        here = Defn(name, "value", source, bound.stmt, markers=stmt_markers, line=bound.stmt.lineno)
        if expr is None or depth >= 8:
            return here
        fields = _namedtuple_fields(expr)
        if fields is not None:
            here.kind, here.fields = "class", fields
            return here
        if isinstance(expr, ast.Lambda):
            here.kind, here.sig = "function", Sig.of(expr.args)
            return here
        target = self.expression(source, expr, depth + 1)
        if target is not None and target.kind != "value":
            return _alias(target, name, stmt_markers)
        if target is not None:  # a value taken from another module keeps the markers written there
            here.markers = target.markers + stmt_markers
        return here

    def expression(self, source: Source, expr: ast.expr, depth: int) -> Defn | None:
        """A name or ``module.name`` followed to what it is (None: something else)."""
        if isinstance(expr, ast.Name):
            return self.lookup(source, expr.id, depth)
        if isinstance(expr, ast.Attribute):
            binding = source.bindings.get(expr.value.id) if isinstance(expr.value, ast.Name) else None
            if isinstance(binding, _Bound) and isinstance(binding.value, ast.Call):  # x = Class(); x.name
                cls = self.expression(source, binding.value.func, depth + 1)
                if cls is None or cls.kind != "class":
                    return None
                member = self.members(cls)[0].get(expr.attr)
                if member is None or member.kind not in CALLABLE:
                    return member
                sig = member.sig if member.kind == "staticmethod" else member.sig.bound()
                return Defn(expr.attr, "function", member.source, member.node, sig, markers=member.markers,
                            line=member.line, bound=True)
            owner = self.expression(source, expr.value, depth)
            if owner is not None and owner.kind == "module":
                return self.lookup(owner.source, expr.attr, depth + 1)
        return None

    # -- classes

    def members(self, cls: Defn, depth: int = 0) -> tuple[dict[str, Defn], list[str]]:
        """A class's members, inherited ones included, and the bases outside the tree (which may add more)."""
        if cls.fields is not None:  # namedtuple
            members = {p.name: Defn(p.name, "value", cls.source, line=cls.line) for p in cls.fields}
            members["__init__"] = Defn("__init__", "method", cls.source, sig=Sig((Param("self", "positional"),
                                                                                   *cls.fields)), line=cls.line)
            return members, []
        node = cls.node
        members: dict[str, Defn] = {}
        external: list[str] = []
        bases = [self.base(cls, b, depth) for b in node.bases]
        for expr, base in reversed(list(zip(node.bases, bases))):
            if base is None:
                external.append(ast.unparse(expr))
                continue
            inherited, more = self.members(base, depth + 1) if depth < 8 else ({}, [])
            members.update(inherited)
            external += more
        inherited = dict(members)
        members.update(self.own_members(cls))
        init = members.get("__init__")
        if self.follow_pass_through and "__init__" in inherited and init is not None and init.sig is not None \
                and [p.kind for p in init.sig.params] == ["positional", "*", "**"]:
            members["__init__"] = inherited["__init__"]  # __init__(self, *args, **kwargs): the base's
        if _is_dataclass(node) and not any(isinstance(s, ast.FunctionDef) and s.name == "__init__" for s in node.body):
            fields = [p for b in bases if b is not None and b.node is not None and _is_dataclass(b.node)
                      for p in self.dataclass_fields(b, depth + 1)] + _dataclass_fields(node)
            members["__init__"] = Defn("__init__", "method", cls.source, node,
                                       Sig((Param("self", "positional"), *fields)), markers=cls.markers,
                                       line=node.lineno)
        return members, external

    def dataclass_fields(self, cls: Defn, depth: int) -> list[Param]:
        members = self.members(cls, depth)[0] if depth < 8 else {}
        return list(members["__init__"].sig.params[1:]) if "__init__" in members else []

    def own_members(self, cls: Defn) -> dict[str, Defn]:
        members = {}
        for stmt in cls.node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in stmt.decorator_list):
                    continue
                members[stmt.name] = _function(stmt, cls.source, True)
            elif isinstance(stmt, ast.ClassDef):
                members[stmt.name] = Defn(stmt.name, "class", cls.source, stmt, markers=cls.source.markers(stmt),
                                          line=stmt.lineno)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for target in targets:
                    for name, _ in _targets(target, None):
                        members[name] = Defn(name, "value", cls.source, stmt, markers=cls.source.markers(stmt),
                                             line=stmt.lineno)
        return members

    def base(self, cls: Defn, expr: ast.expr, depth: int) -> Defn | None:
        found = self.expression(cls.source, expr, depth + 1)
        return found if found is not None and found.kind == "class" else None


def _alias(target: Defn, name: str, markers: list[Marker]) -> Defn:
    """``target`` bound under ``name``, with the markers of the binding statement added to its own."""
    return Defn(name, target.kind, target.source, target.node, target.sig, target.fields,
                target.markers + markers, target.line, target.bound)


class HostSide(Side):
    follow_pass_through = True

    def __init__(self, key: str, roots: list[Path]):
        super().__init__()
        self.key = key
        self.roots = roots

    def file(self, rel: str) -> Path | None:
        for root in self.roots:
            if (root / rel).is_file():
                return root / rel
        return None

    def module_file(self, module, level, importer):
        if level:
            base = importer.parent
            for _ in range(level - 1):
                base = base.parent
            candidates = [base]
        else:
            candidates = self.roots
        parts = module.split(".") if module else []
        for root in candidates:
            path = root.joinpath(*parts) if parts else root
            if path.with_suffix(".py").is_file() and parts:
                return path.with_suffix(".py")
            if (path / "__init__.py").is_file():
                return path / "__init__.py"
        return None

    def members(self, cls, depth=0):
        members, external = super().members(cls, depth)
        if cls.node is not None:
            for name in _self_attributes(cls.node):
                members.setdefault(name, Defn(name, "value", cls.source, line=cls.line))
        return members, external


class DoubleSide(Side):
    """The doubles as the layers of one host see them: ``modules.x`` is the first layer's ``modules/x.py``."""

    def __init__(self, layers: list[Path], webui: Path = WEBUI_DOUBLES):
        super().__init__()
        self.layers = layers
        self.webui = webui  # where a1111_module / forge_module find their layers

    def module_file(self, module, level, importer):
        if level or not module:
            return None
        parts = module.split(".")
        for layer in self.layers:
            path = layer.joinpath(*parts)
            if path.with_suffix(".py").is_file():
                return path.with_suffix(".py")
            if (path / "__init__.py").is_file():
                return path / "__init__.py"
        return None

    def expression(self, source, expr, depth):
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            path = _layer_module_path(source.bindings.get(expr.value.id), self.webui)
            if path is not None:  # base = a1111_module("x"): base.y is the A1111 double's
                return self.lookup(self.source(path), expr.attr, depth + 1) if path.is_file() else None
        return super().expression(source, expr, depth)

    def value(self, source, name, bound, depth):
        expr = bound.value
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and depth < 8:
            factory = self.lookup(source, expr.func.id, depth + 1)
            inner = _returned_function(factory)
            if inner is not None:  # x = factory(...) where factory returns a function it defines
                return Defn(name, "function", factory.source, inner, Sig.of(inner.args),
                            markers=factory.markers + source.markers(bound.stmt), line=bound.stmt.lineno)
        return super().value(source, name, bound, depth)

    def exposed(self, source: Source) -> dict[str, Defn]:
        """What a double module defines at module level, followed to the definitions."""
        names = {}
        exported = _dunder_all(source)
        for name, binding in source.bindings.items():
            if name.startswith("_"):
                continue
            if isinstance(binding, (ast.Import, ast.ImportFrom)):
                if name in exported:
                    names[name] = self.lookup(source, name)
                continue
            if _layer_module_path(binding, self.webui) is not None:
                continue
            names[name] = self.lookup(source, name)
        return names


def _layer_module_path(binding, webui: Path) -> Path | None:
    """``base = a1111_module("x")`` / ``forge_module("x")`` (``hostlayers``): that layer's ``modules/x.py``."""
    loaders = {"a1111_module": "a1111", "forge_module": "forge"}
    if isinstance(binding, _Bound) and isinstance(binding.value, ast.Call) \
            and getattr(binding.value.func, "id", None) in loaders and binding.value.args \
            and isinstance(binding.value.args[0], ast.Constant):
        return webui / loaders[binding.value.func.id] / "modules" / f"{binding.value.args[0].value}.py"
    return None


def _returned_function(factory: Defn | None):
    if factory is None or factory.kind != "function" or not isinstance(factory.node, ast.FunctionDef):
        return None
    last = factory.node.body[-1]
    if isinstance(last, ast.Return) and isinstance(last.value, ast.Name):
        return next((s for s in factory.node.body if isinstance(s, ast.FunctionDef) and s.name == last.value.id), None)
    return None


def _dunder_all(source: Source) -> set[str]:
    binding = source.bindings.get("__all__")
    if isinstance(binding, _Bound) and isinstance(binding.value, (ast.List, ast.Tuple)):
        return {e.value for e in binding.value.elts if isinstance(e, ast.Constant)}
    return set()


# ---------------------------------------------------------------------------------------------------- comparison


@dataclass
class Finding:
    name: str
    kind: str  # not-in-host, signature, kind, double-only-in-host, marker, citation, host-file, unverified
    detail: str
    where: str
    explained: str | None = None  # the marker's reason, when a marker explains it
    warning: bool = False  # reported, but does not fail the check
    signatures: tuple[str, str, str] | None = None  # (double, host, host's file:line) for signature findings

    @property
    def fails(self) -> bool:
        return self.explained is None and not self.warning


@dataclass
class FileResult:
    double: str
    host: str
    host_files: list[str]
    compared: int = 0
    elsewhere: int = 0  # definitions already compared with the same host definition from another file or class
    findings: list[Finding] = field(default_factory=list)
    note: str = ""


class Checker:
    def __init__(self, host: HostSide, doubles: DoubleSide):
        self.host = host
        self.doubles = doubles
        self.used_markers: set[tuple[Path, int]] = set()
        self.compared: set[tuple] = set()  # (double's file:line, name, host's file:line): each compared once
        self.seen_markers: dict[tuple[Path, int], Marker] = {}

    def _note_markers(self, d: Defn):
        for m in d.markers:
            if m.kind == "double-simplified":
                self.seen_markers.setdefault((m.file, m.line), m)

    def check_file(self, double: Path, layer: Path) -> FileResult:
        rel = double.relative_to(layer).as_posix()
        source = self.doubles.source(double)
        exposed = self.doubles.exposed(source)
        at_host_path = "/" in rel
        result = FileResult(_rel(double), self.host.key, [])
        files: list[Source] = []
        if at_host_path:
            cited = _citation(source.docstring())
            if cited and cited[0] != rel:
                result.findings.append(Finding("(docstring)", "citation",
                                               f"cites ``{cited[0]}`` first, but the double sits at ``{rel}``",
                                               f"{_rel(double)}:1"))
            folder = rel.rsplit("/", 1)[0]
            wanted = [rel] + [c if "/" in c else f"{folder}/{c}" for c in cited[1:]]
            for path in dict.fromkeys(wanted):
                found = self.host.file(path)
                result.host_files.append(path)
                if found:
                    files.append(self.host.source(found))
                elif exposed:
                    result.findings.append(Finding("(file)", "host-file", f"the host has no ``{path}``",
                                                   f"{_rel(double)}:1"))
        if not exposed:
            result.note = "nothing to compare"
            return result
        for name, d in exposed.items():
            self._check_top(result, name, d, files, at_host_path)
        return result

    def _check_top(self, result: FileResult, name: str, d: Defn, files: list[Source], at_host_path: bool):
        host_text = ", ".join(m.text for m in d.markers if m.kind == "host")  # one or more `# host:` lines
        h, where_host = None, " / ".join(result.host_files) or "(no host file)"
        if host_text:
            spec = _host_spec(host_text, self.host.key)
            if spec is False:
                return  # the comment names other hosts only
            if spec is None:
                result.findings.append(Finding(name, "marker", f"unreadable `# host: {host_text}`", d.where))
                return
            path, host_name = spec[0], spec[1] or name
            where_host = f"{path}:{host_name}" if host_name != name else path
            found = self.host.file(path)
            if found is None:
                result.findings.append(Finding(name, "host-file", f"the host has no ``{path}``", d.where))
                return
            h = self.host.lookup(self.host.source(found), host_name)
            if h is None:
                h = self._dotted(self.host.source(found), host_name)
        elif d.marker("double-only") is None and not at_host_path:
            result.findings.append(Finding(name, "not-in-host", "no `# host:` comment says what it imitates (or mark "
                                           "it `# double-only: why`)", d.where))
            return
        else:
            for source in files:
                h = self.host.lookup(source, name)
                if h is not None:
                    break
        self.compare(result, name, d, h, where_host)

    def _dotted(self, source: Source, dotted: str) -> Defn | None:
        owner, _, member = dotted.rpartition(".")
        if not owner:
            return None
        cls = self.host.lookup(source, owner)
        if cls is None or cls.kind != "class":
            return None
        return self.host.members(cls)[0].get(member)

    def compare(self, result: FileResult, qual: str, d: Defn, h: Defn | None, where_host: str,
                host_class: tuple[str, list[str]] | None = None):
        self._note_markers(d)
        key = (d.where, d.name, h.where if h is not None else host_class and host_class[0])
        if key in self.compared:
            result.elsewhere += 1
            return
        self.compared.add(key)
        result.compared += 1
        for m in d.markers:
            if m.kind in ("double-only", "double-simplified") and not m.text:
                result.findings.append(Finding(qual, "marker", f"`# {m.kind}` without a reason",
                                               f"{_rel(m.file)}:{m.line}"))
        if d.marker("double-only") is not None:
            if h is not None and h.kind != "external":
                result.findings.append(Finding(qual, "double-only-in-host", f"marked double-only, but {where_host} "
                                               f"defines it too ({h.kind} at {h.where})", d.where))
            return
        simplified = d.marker("double-simplified")
        findings = []
        if h is None:
            if host_class is not None and host_class[1]:
                result.findings.append(Finding(qual, "unverified", f"not in the host's class {host_class[0]} (which "
                                               f"also inherits from {', '.join(host_class[1])}, not read)", d.where,
                                               warning=True))
                return
            owner = f"the host's class {host_class[0]}" if host_class else where_host
            findings.append(Finding(qual, "not-in-host", f"{owner} has no `{qual.rsplit('.', 1)[-1]}`", d.where))
        elif d.kind == "class" and h.kind == "class":
            self._compare_classes(result, qual, d, h, where_host)
        elif {d.kind, h.kind} & {"value", "external", "module"}:
            pass  # presence only
        elif d.kind == "property" or h.kind == "property":
            if d.kind != h.kind:
                findings.append(Finding(qual, "kind", f"{d.kind} in the double, {h.kind} in the host ({h.where})",
                                        d.where))
        else:
            if (d.kind == "class") != (h.kind == "class"):
                findings.append(Finding(qual, "kind", f"{d.kind} in the double, {h.kind} in the host ({h.where})",
                                        d.where))
            d_sig, h_sig = self._call_sig(d, self.doubles), self._call_sig(h, self.host)
            if d_sig is not None and h_sig is not None:
                problems = diff_signatures(d_sig, h_sig)
                if problems:
                    findings.append(Finding(qual, "signature", "; ".join(problems), d.where,
                                            signatures=(str(d_sig), str(h_sig), h.where)))
        for finding in findings:
            if simplified is not None and finding.kind in ("signature", "kind", "not-in-host"):
                finding.explained = simplified.text or "(no reason given)"
                self.used_markers.add((simplified.file, simplified.line))
            result.findings.append(finding)

    def _compare_classes(self, result: FileResult, qual: str, d: Defn, h: Defn, where_host: str):
        d_members, _ = self.doubles.members(d)
        h_members, external = self.host.members(h)
        local_bases = [b for b in (self.doubles.base(d, e, 0) for e in getattr(d.node, "bases", []))
                       if b is not None and b.source is d.source and not b.name.startswith("_")]
        via_local = {id(m.node) for b in local_bases for m in self.doubles.members(b)[0].values()}
        for name, dm in d_members.items():
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                continue
            if dm.kind == "value" and name.startswith("__"):
                continue
            if id(dm.node) in via_local:
                continue  # inherited through a class of the same file: compared there
            self.compare(result, f"{qual}.{name}", dm, h_members.get(name), where_host, (h.name, external))

    @staticmethod
    def _call_sig(defn: Defn, side: Side) -> Sig | None:
        if defn.kind == "class":
            init = side.members(defn)[0].get("__init__")
            return init.sig.bound() if init is not None and init.sig is not None else None
        if defn.sig is None:
            return None
        if defn.kind in ("method", "classmethod") and not defn.bound:
            return defn.sig.bound()
        return defn.sig


def _host_spec(text: str, host_key: str):
    """``PATH[:NAME]`` or ``key=PATH[:NAME], ...`` -> (path, name) for this host; False: not for this host;
    None: unreadable."""
    parts = [p.strip() for p in re.split(r"[,;]", text) if p.strip()]
    if not parts:
        return None
    chosen = None
    for part in parts:
        key, eq, spec = part.partition("=")
        if not eq:
            if len(parts) != 1:
                return None
            chosen = part
        elif key.strip() == host_key:
            chosen = spec.strip()
        elif key.strip() not in HOST_NAMES:
            return None
    if chosen is None:
        return False
    path, _, name = chosen.partition(":")
    return (path, name) if name else (path, None)


def _citation(docstring: str) -> list[str]:
    """The host files a docstring's "Imitates ..." clause names (up to its first colon)."""
    match = re.search(r"Imitates\b(.*?)(?::\s|:$|$)", docstring, re.S)
    return CITATION_RE.findall(match.group(1)) if match else []


def _rel(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- running


def double_files(layers: list[Path]) -> list[tuple[Path, Path]]:
    """(file, its layer) for each path the layers give, the first layer having it winning."""
    chosen: dict[str, tuple[Path, Path]] = {}
    for layer in layers:
        for path in sorted(layer.rglob("*.py")):
            rel = path.relative_to(layer).as_posix()
            if f"{layer.name}/{rel}" in NOT_DOUBLES or "__pycache__" in path.parts:
                continue
            chosen.setdefault(rel, (path, layer))
    return [chosen[rel] for rel in sorted(chosen)]


def run(host_roots: dict[str, list[Path]], layers: dict[str, list[Path]] | None = None, webui: Path = WEBUI_DOUBLES):
    """Check every double against each given host: (results, stale-marker findings). ``layers`` (default: the
    doubles' ``hostlayers.LAYERS``) and ``webui`` (their folder) let the tests check doubles of their own."""
    layers = layers or _load_layers()
    results: list[FileResult] = []
    stale: dict[tuple[Path, int], Marker] = {}
    used: set[tuple[Path, int]] = set()
    for key, roots in host_roots.items():
        checker = Checker(HostSide(key, roots), DoubleSide(layers[key], webui))
        for path, layer in double_files(layers[key]):
            results.append(checker.check_file(path, layer))
        stale.update(checker.seen_markers)
        used |= checker.used_markers
    stale_findings = [Finding("(marker)", "marker", f"`# double-simplified: {m.text}` explains no difference on any "
                              "host: remove it", f"{_rel(m.file)}:{m.line}")
                      for key, m in stale.items() if key not in used]
    return results, stale_findings


def report(results: list[FileResult], stale: list[Finding], host_roots: dict[str, list[Path]]) -> str:
    lines = ["Host doubles (tests/webui) compared with the pinned host sources"]
    for key, roots in host_roots.items():
        lines.append(f"  {key:14} {HOST_NAMES[key]}: {', '.join(map(str, roots))}")
    lines.append("")
    by_file: dict[str, list[FileResult]] = {}
    for r in results:
        by_file.setdefault(r.double, []).append(r)
    empty = []
    for double, rs in by_file.items():
        if all(r.note and not r.findings for r in rs):
            empty.append(double)
            continue
        lines.append(double)
        for r in rs:
            failing = [f for f in r.findings if f.fails]
            explained = [f for f in r.findings if f.explained]
            warnings = [f for f in r.findings if f.warning]
            files = " + ".join(r.host_files) or "per-name # host: comments"
            status = "OK" if not failing else f"{len(failing)} MISMATCH" + ("ES" if len(failing) > 1 else "")
            extra = [f"{len(explained)} explained"] * bool(explained) + [f"{len(warnings)} unverified"] * bool(warnings)
            compared = f"{r.compared} compared" + (f", {r.elsewhere} compared elsewhere" if r.elsewhere else "")
            lines.append(f"  {r.host} ({files}): {status}, {compared}"
                         + (f" ({', '.join(extra)})" if extra else ""))
            for f in sorted(r.findings, key=lambda f: (not f.fails, f.warning, f.where)):
                tag = "MISMATCH" if f.fails else "warning " if f.warning else "explained"
                lines.append(f"    {tag} {f.name} [{f.where}] {f.kind}: {f.detail}")
                if f.signatures:
                    lines.append(f"             double {_short(f.signatures[0])}")
                    lines.append(f"             host   {_short(f.signatures[1])} [{f.signatures[2]}]")
                if f.explained:
                    lines.append(f"             why: {f.explained}")
        lines.append("")
    if empty:
        lines.append("Nothing to compare (package markers): " + ", ".join(empty))
        lines.append("")
    for f in stale:
        lines.append(f"MISMATCH {f.where} stale marker: {f.detail}")
    failing = sum(f.fails for r in results for f in r.findings) + len(stale)
    explained = sum(bool(f.explained) for r in results for f in r.findings)
    warnings = sum(f.warning for r in results for f in r.findings)
    lines.append(f"{len(by_file)} double files, {len(results)} file/host pairs: {failing} unexplained, "
                 f"{explained} explained, {warnings} unverified")
    return "\n".join(lines)


def _short(signature: str, width: int = 150) -> str:
    if len(signature) <= width:
        return signature
    cut = signature.rfind(", ", 0, width)
    return f"{signature[:cut]}, ... {signature[cut + 2:].count(', ') + 1} more)"


def as_json(results: list[FileResult], stale: list[Finding], host_roots: dict[str, list[Path]]) -> str:
    def finding(f: Finding):
        return {"name": f.name, "kind": f.kind, "detail": f.detail, "where": f.where, "explained": f.explained,
                "warning": f.warning, "fails": f.fails,
                **dict(zip(("double_signature", "host_signature", "host_where"), f.signatures or (None,) * 3))}

    return json.dumps({
        "hosts": {k: [str(r) for r in v] for k, v in host_roots.items()},
        "files": [{"double": r.double, "host": r.host, "host_files": r.host_files, "compared": r.compared,
                   "compared_elsewhere": r.elsewhere,
                   "note": r.note, "ok": not any(f.fails for f in r.findings),
                   "findings": [finding(f) for f in r.findings]} for r in results],
        "stale_markers": [finding(f) for f in stale],
        "unexplained": sum(f.fails for r in results for f in r.findings) + len(stale),
    }, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compare the host doubles in tests/webui with the pinned hosts.",
                                     epilog="Give at least one host: its WebUI folder at the pinned commit.")
    parser.add_argument("--a1111", type=Path, metavar="DIR", help="AUTOMATIC1111 stable-diffusion-webui at 82a973c0")
    parser.add_argument("--forge-classic", type=Path, metavar="DIR", help="stable-diffusion-webui-forge at bfee03d8")
    parser.add_argument("--forge-new", type=Path, metavar="DIR", help="stable-diffusion-webui-forge at dfdcbab6")
    parser.add_argument("--k-diffusion", type=Path, metavar="DIR",
                        help="A1111's k-diffusion (default: DIR/repositories/k-diffusion of --a1111)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    given = {"a1111": args.a1111, "forge-classic": args.forge_classic, "forge-new": args.forge_new}
    host_roots: dict[str, list[Path]] = {}
    for key, root in given.items():
        if root is None:
            continue
        if not (root / "modules").is_dir():
            parser.error(f"--{key} {root}: not a WebUI folder (no modules/)")
        roots = [root.resolve()]
        k_diffusion = args.k_diffusion if key == "a1111" and args.k_diffusion else root / "repositories" / "k-diffusion"
        if k_diffusion.is_dir():
            roots.append(k_diffusion.resolve())
        host_roots[key] = roots
    if not host_roots:
        parser.print_usage(sys.stderr)
        print("check_doubles.py: give the WebUI folders to compare with, at the pinned commits: --a1111 (A1111 "
              "82a973c0),\n--forge-classic (Forge bfee03d8), --forge-new (Forge dfdcbab6); any of them, e.g.\n"
              "  python tools/check_doubles.py --a1111 PATH/a1111 --forge-classic PATH/forge-classic "
              "--forge-new PATH/forge-new", file=sys.stderr)
        return 2
    results, stale = run(host_roots)
    print(as_json(results, stale, host_roots) if args.json else report(results, stale, host_roots))
    return 1 if any(f.fails for r in results for f in r.findings) or stale else 0


if __name__ == "__main__":
    sys.exit(main())
