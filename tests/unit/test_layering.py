"""The package's layering, from its imports: which part may use which.

Every module of stapexporter_lib is parsed (nothing is imported) and each of
its imports of the package, and of HTTP libraries, is checked against the
rules below (docs/internals.md explains them):

* shared modules (CLI, logging, path trust, states, the thread pool,
  addresses) use no other part;
* scripts/ uses shared modules and itself, and never an HTTP library;
* web/ uses shared modules, itself, and of scripts/ only what answers a
  request (the session's Outcome, URL names, the manager, process costs):
  never the code that reads output files or starts processes;
* server and check, the top, may use anything.
"""

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = "stapexporter_lib"
SHARED = {"__init__", "cli", "logs", "trust", "states", "offhub", "addresses"}
TOP = {"server", "check"}
WEB_MAY_USE = {"scripts", "scripts.session", "scripts.catalog", "scripts.manager",
               "scripts.proccost"}
HTTP_LIBRARIES = ("gevent.pywsgi", "http", "wsgiref", "urllib", "ssl", "bcrypt")


def modules():
    """Every module of the package, dotted relative to it ('scripts.session')."""
    found = []
    for directory, _dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        rel = os.path.relpath(directory, os.path.join(ROOT, PACKAGE))
        for name in files:
            if name.endswith(".py"):
                parts = [] if rel == "." else rel.split(os.sep)
                found.append(".".join(parts + [name[:-3]]))
    return sorted(found)


def imports(module):
    """(package-relative modules, outside modules) that MODULE imports."""
    path = os.path.join(ROOT, PACKAGE, *module.split(".")) + ".py"
    if not os.path.exists(path):
        path = os.path.join(ROOT, PACKAGE, *module.split("."), "__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    here = module.split(".")[:-1]
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.startswith(PACKAGE + ".") else outside).add(
                    alias.name[len(PACKAGE) + 1:] if alias.name.startswith(PACKAGE + ".")
                    else alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module.startswith(PACKAGE):
                    base = node.module[len(PACKAGE) + 1:]
                    inside.update(_targets(base, node))
                else:
                    outside.add(node.module)
                continue
            base_parts = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            base = ".".join(base_parts + ([node.module] if node.module else []))
            inside.update(_targets(base, node))
    return inside, outside


def _targets(base, node):
    """The modules a 'from BASE import a, b' names: submodules where they are
    modules of the package, else BASE itself."""
    names = set(modules())
    out = set()
    for alias in node.names:
        candidate = "%s.%s" % (base, alias.name) if base else alias.name
        out.add(candidate if candidate in names else (base or "__init__"))
    return out


def part(module):
    if module.startswith("scripts"):
        return "scripts"
    if module.startswith("web"):
        return "web"
    if module.split(".")[0] in SHARED:
        return "shared"
    if module in TOP:
        return "top"
    return "unknown"


def violations(module):
    inside, outside = imports(module)
    mine = part(module)
    found = []
    for used in sorted(inside):
        theirs = part(used)
        if mine == "shared" and theirs != "shared":
            found.append("shared module %s uses %s" % (module, used))
        elif mine == "scripts" and theirs not in ("shared", "scripts"):
            found.append("scripts module %s uses %s" % (module, used))
        elif mine == "web" and theirs not in ("shared", "web") and used not in WEB_MAY_USE:
            found.append("web module %s uses %s" % (module, used))
    if mine in ("scripts", "shared"):
        for used in sorted(outside):
            if used in HTTP_LIBRARIES or used.startswith(tuple(l + "." for l in HTTP_LIBRARIES)):
                found.append("%s module %s uses the HTTP library %s" % (mine, module, used))
    return found


def test_every_module_belongs_to_a_part():
    assert "scripts.session" in modules() and "web.app" in modules()
    assert [m for m in modules() if part(m) == "unknown"] == []


@pytest.mark.parametrize("module", modules())
def test_imports_follow_the_layering(module):
    assert violations(module) == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    """A scripts module importing the web side, and a web module reading
    output, are caught (so the rules above can fail)."""
    pkg = tmp_path / PACKAGE
    (pkg / "scripts").mkdir(parents=True)
    (pkg / "web").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scripts" / "__init__.py").write_text("")
    (pkg / "web" / "__init__.py").write_text("")
    (pkg / "scripts" / "output.py").write_text("from ..web import app\nimport gevent.pywsgi\n")
    (pkg / "web" / "app.py").write_text("from ..scripts import output\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert violations("scripts.output") == [
        "scripts module scripts.output uses web.app",
        "scripts module scripts.output uses the HTTP library gevent.pywsgi"]
    assert violations("web.app") == ["web module web.app uses scripts.output"]
