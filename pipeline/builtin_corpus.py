"""``builtin://python-docs``: the docstrings of the installed Python standard library.

Read at run time from the stdlib source files with ``ast`` (nothing is
imported or executed), so the demo runs offline on any machine with Python.
One document per module, in sorted path order: the module docstring, then
each class and function with its signature and docstring, which keeps related
text together in the packed rows.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator

from pipeline.errors import PipelineError
from pipeline.sources import SourceFile

CORPORA = ("python-docs",)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_builtin(uri: str) -> list[SourceFile]:
    name = uri[len("builtin://") :].strip("/")
    if name not in CORPORA:
        raise PipelineError(f"input {uri!r}: unknown built-in corpus (known: {', '.join(CORPORA)})")
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "."))
        ]
        for fn in filenames:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                st = os.stat(path)
                files.append(
                    SourceFile(
                        f"builtin://{name}/{rel}", st.st_size, str(st.st_mtime_ns), "pydoc", None
                    )
                )
    return sorted(files, key=lambda s: s.uri)


def local_path(uri: str) -> str:
    rel = uri[len("builtin://") :].split("/", 1)[1]
    return os.path.join(stdlib_root(), *rel.split("/"))


def module_name(uri: str) -> str:
    rel = uri[len("builtin://") :].split("/", 1)[1]
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_document(source: bytes, name: str) -> str:
    """Headline, module docstring, then every documented class/function; raises SyntaxError."""
    tree = ast.parse(source)
    sections = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        sections.append(f"Module {name}\n\n{doc}")
    sections += list(_definitions(tree, prefix=""))
    return "\n\n".join(sections)


def _definitions(node: ast.AST, prefix: str) -> Iterator[str]:
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, _DEFS):
            continue
        qualname = f"{prefix}{child.name}"
        doc = ast.get_docstring(child, clean=True)
        if doc:
            yield f"{_signature(child, qualname)}\n\n{doc}"
        yield from _definitions(child, prefix=f"{qualname}.")


def _signature(node: ast.AST, qualname: str) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {qualname}({bases})" if bases else f"class {qualname}"
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{keyword} {qualname}({ast.unparse(node.args)})"
