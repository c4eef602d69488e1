"""Write ``docs/api.md``: the public API of ``diffusers_msgm``, generated from signatures and docstrings.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date (tests/test_docs.py does the same)

Public means: the names in a module's ``__all__`` (or, without one, the names it defines that do not start with
``_``); for classes, the methods and properties they define themselves. Nothing is imported besides the package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

#: documented modules, in order; the optional ones are skipped when absent
MODULES = [
    ("diffusers_msgm.sde", True),
    ("diffusers_msgm.models", True),
    ("diffusers_msgm.schedulers", True),
    ("diffusers_msgm.pipelines", True),
    ("diffusers_msgm.losses", True),
    ("diffusers_msgm.moderation", True),
    ("diffusers_msgm.moderation_exemplar", True),
    ("diffusers_msgm.metrics", True),
    ("diffusers_msgm.data", True),
    ("diffusers_msgm.hub", True),
    ("diffusers_msgm.image_utils", True),
    ("diffusers_msgm.audit", False),
    ("diffusers_msgm.evaluation", False),
]
API_MD = Path(__file__).resolve().parent / "api.md"
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr):`~?\.?([^`]+)`")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _markdown(doc: str | None) -> str:
    """A docstring (``inspect.getdoc`` output) with reST roles and double backticks turned into markdown code."""
    if not doc:
        return "*(no docstring)*"
    text = _ROLE.sub(r"`\1`", doc).replace("``", "`")
    return "\n".join(line.rstrip() for line in text.splitlines())


class _Annotation:
    """Shows a string annotation (``from __future__ import annotations``) without quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"

    def bare(annotation):
        return _Annotation(annotation) if isinstance(annotation, str) else annotation

    sig = sig.replace(parameters=[p.replace(annotation=bare(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=bare(sig.return_annotation))
    return _ADDRESS.sub("", str(sig))


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return sorted(set(names), key=lambda n: (not inspect.isclass(getattr(module, n)), n.lower()))


def _own_members(cls) -> list[tuple[str, object]]:
    """Public methods (and ``__call__``) and properties that ``cls`` or its bases from this package define;
    docstrings may come from the base a method overrides."""
    members, seen = [], set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("diffusers_msgm"):
            continue
        for name, value in vars(klass).items():
            if name in seen or (name.startswith("_") and name != "__call__"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                seen.add(name)
                members.append((name, value, inspect.getdoc(getattr(cls, name))))
    return sorted(members, key=lambda m: (m[0] != "__call__", m[0]))


def _document_class(name: str, cls) -> list[str]:
    lines = [f"### class `{name}`", "", f"```python\n{name}{_signature(cls)}\n```", "",
             f"*Bases:* {', '.join(f'`{b.__name__}`' for b in cls.__bases__)}", "", _markdown(inspect.getdoc(cls)), ""]
    for member, value, doc in _own_members(cls):
        if isinstance(value, property):
            lines += [f"* **`{member}`** (property) — {_markdown(doc).splitlines()[0]}"]
        else:
            first = _markdown(doc).split("\n\n")[0].replace("\n", " ")
            lines += [f"* **`{member}{_signature(value)}`** — {first}"]
    return lines + [""]


def _document(name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        return _document_class(name, obj)
    if callable(obj):
        return [f"### `{name}`", "", f"```python\n{name}{_signature(obj)}\n```", "", _markdown(inspect.getdoc(obj)), ""]
    value = _ADDRESS.sub("", repr(obj))
    return [f"### `{name}`", "", f"`{value if len(value) <= 100 else value[:97] + '...'}`", ""]


def generate() -> str:
    """The markdown text of ``docs/api.md``."""
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when this file is out of date).", ""]
    sections = []
    for module_name, required in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if required or err.name != module_name:
                raise
            continue
        sections.append((module_name, module))
    lines += [f"* [`{m}`](#{m.replace('.', '')})" for m, _ in sections] + [""]
    for module_name, module in sections:
        lines += [f"## `{module_name}`", "", _markdown(inspect.getdoc(module)).split("\n\n")[0], ""]
        for name in _public_names(module):
            lines += _document(name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    parser.add_argument("--output", type=Path, default=API_MD)
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
