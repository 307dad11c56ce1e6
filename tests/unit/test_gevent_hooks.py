"""The private gevent.pywsgi hooks that stapexporter_lib/web/http.py relies on
still exist and are still called by pywsgi.

http.py subclasses pywsgi's WSGIHandler and WSGIServer and overrides or calls
names that are not gevent's public API (``_check_http_version``,
``_handle_client_error``, ``MessageClass``, a copy of ``_write_with_headers``
...).  A gevent release may rename them without notice; then the hardening
would silently stop applying (an override nobody calls) or the server would
fail at the first request.  requirements.txt pins gevent to the releases CI
runs (Debian 12's 22.10 and the newest); this test is what tells, with the
hook's name, why a new release may not be allowed in yet.
"""

import ast
import inspect
import os

import pytest
from gevent import pywsgi

from conftest import ROOT  # noqa: E402
HTTP_PY = os.path.join(ROOT, "stapexporter_lib", "web", "http.py")

# Methods http.py overrides that only matter if pywsgi itself calls them
# (``self.NAME(`` in pywsgi's source), with what the override does.
CALLED_BY_PYWSGI = {
    "handle_one_request": "the header/idle deadline per request",
    "read_requestline": "silent close when no request line arrives in time",
    "read_request": "HTTP/0.9 refusal; bodies never drained",
    "_check_http_version": "strict HTTP/1.x version check",
    "MessageClass": "header parsing with the line, count and size limits (431)",
    "_handle_client_error": "408/431/400 answers instead of tracebacks",
    "_write_with_headers": "headers and small bodies in one send",
    "log_request": "access log formatted only at debug level",
    "log_error": "escaped one-line client errors",
}

# Other names of pywsgi's that http.py uses (attributes it reads or sets,
# methods it calls, the exception class it raises).
HANDLER_NAMES = ("_sendall", "_write", "finalize_headers", "response_use_chunked",
                 "headers_sent", "status", "response_headers", "content_length",
                 "close_connection", "request_version", "headers")
SERVER_METHODS = ("do_read", "handle")
MODULE_NAMES = ("_InvalidClientRequest", "MAX_REQUEST_LINE", "WSGIHandler", "WSGIServer")

PYWSGI_SOURCE = inspect.getsource(pywsgi)


def gevent_says(name):
    import gevent
    return ("gevent %s no longer provides the private pywsgi hook %s that"
            " stapexporter_lib/web/http.py relies on" % (gevent.__version__, name))


@pytest.mark.parametrize("name", sorted(CALLED_BY_PYWSGI))
def test_overridden_hook_exists_and_is_called(name):
    assert hasattr(pywsgi.WSGIHandler, name), \
        gevent_says("WSGIHandler.%s (%s)" % (name, CALLED_BY_PYWSGI[name]))
    assert "self.%s(" % name in PYWSGI_SOURCE, \
        gevent_says("WSGIHandler.%s: pywsgi no longer calls it, so our override (%s)"
                    " would be dead code" % (name, CALLED_BY_PYWSGI[name]))


@pytest.mark.parametrize("name", HANDLER_NAMES)
def test_handler_attribute_exists(name):
    assert hasattr(pywsgi.WSGIHandler, name), gevent_says("WSGIHandler.%s" % name)


@pytest.mark.parametrize("name", SERVER_METHODS)
def test_server_method_exists(name):
    assert hasattr(pywsgi.WSGIServer, name), gevent_says("WSGIServer.%s" % name)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_module_name_exists(name):
    assert hasattr(pywsgi, name), gevent_says("gevent.pywsgi.%s" % name)


def _http_tree():
    with open(HTTP_PY, encoding="utf-8") as f:
        return ast.parse(f.read(), HTTP_PY)


def _pywsgi_references(tree):
    """``pywsgi.NAME`` attribute references in http.py."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "pywsgi"}


def _handler_class(tree):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Attribute) and b.attr == "WSGIHandler" for b in node.bases):
            return node
    raise AssertionError("http.py has no subclass of pywsgi.WSGIHandler any more:"
                         " update this test")


def _self_reads_not_defined_here(cls):
    """Attributes the handler reads from ``self`` without defining or assigning
    them anywhere in its class: they must come from pywsgi (or its base)."""
    defined, read = set(), set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined.add(target.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            if isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            else:
                read.add(node.attr)
    return read - defined


def test_every_pywsgi_name_http_py_uses_exists():
    """Derived from http.py itself, so a hook added there later is covered too."""
    missing = sorted(n for n in _pywsgi_references(_http_tree()) if not hasattr(pywsgi, n))
    assert not missing, gevent_says(", ".join("gevent.pywsgi.%s" % n for n in missing))


def test_every_inherited_handler_attribute_exists():
    """Every ``self.X`` the handler reads but does not define must be provided
    by pywsgi: a class attribute, or assigned in pywsgi's source."""
    cls = _handler_class(_http_tree())
    missing = sorted(name for name in _self_reads_not_defined_here(cls)
                     if not hasattr(pywsgi.WSGIHandler, name)
                     and "self.%s =" % name not in PYWSGI_SOURCE)
    assert not missing, gevent_says(", ".join("WSGIHandler.%s" % n for n in missing))


def test_the_checks_above_see_the_hooks():
    # Guards the derivation: if the AST walk found nothing, the two tests
    # above would pass vacuously.
    tree = _http_tree()
    assert "_InvalidClientRequest" in _pywsgi_references(tree)
    reads = _self_reads_not_defined_here(_handler_class(tree))
    assert {"response_use_chunked", "response_headers"} <= reads, reads


def test_gevent_version_is_in_the_pinned_range():
    """requirements.txt names the range CI runs; running on another gevent
    means the hooks above were never exercised with it."""
    import gevent
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        spec = [line.strip() for line in f if line.strip().startswith("gevent")]
    assert spec, "requirements.txt does not name gevent"
    low, high = _bounds(spec[0])
    version = tuple(int(p) for p in gevent.__version__.split(".")[:2] if p.isdigit())
    assert low <= version < high, \
        "gevent %s is outside the tested range %s in requirements.txt" \
        % (gevent.__version__, spec[0])


def _bounds(spec):
    """'gevent>=22.10,<27' -> ((22, 10), (27,))."""
    low, high = (0,), (10 ** 6,)
    for part in spec[len("gevent"):].split(","):
        part = part.strip()
        number = tuple(int(p) for p in part.lstrip("<>=").split("."))
        if part.startswith(">="):
            low = number
        elif part.startswith("<"):
            high = number
    return low, high
