"""Pure functions, tested in-process: FIFO cycle splitting, typed-metric
declarations, module names, log escaping."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from stapexporter_lib.scripts import catalog, declarations, output as procfs  # noqa: E402
from stapexporter_lib.logs import escape_line  # noqa: E402


@pytest.mark.parametrize("data,expected", [
    (b'a{x="1"} 1\nb 2\na{x="1"} 3\nb 4\n', b'a{x="1"} 1\nb 2\n'),
    (b"up 1\nother 2\nup 1\nother 2\n", b"up 1\nother 2\n"),
    (b"# HELP up x\n# TYPE up gauge\nup 1\nup 2\n", b"# HELP up x\n# TYPE up gauge\nup 1\n"),
    (b'a{x="1"} 1\na{x="2"} 2\n', b'a{x="1"} 1\na{x="2"} 2\n'),  # different series: kept
    (b"up 1\nup_total 2\n", b"up 1\nup_total 2\n"),  # a longer name is not the same series
    (b"no newline", b"no newline"),
    (b"", b""),
    (b"# only a comment\n", b"# only a comment\n"),
])
def test_first_cycle(data, expected):
    assert procfs.first_cycle(data) == expected


TYPED = """
// prometheus: TYPE count counter
// prometheus: HELP count read() calls per thread and CPU
# prometheus: TYPE lat_seconds histogram
// prometheus: TYPE bogus nonsense
// prometheus:   HELP spaced   spaced help text
"""


def test_parse_declarations():
    decls = declarations.parse_declarations(TYPED)
    assert decls["count"] == ("counter", "read() calls per thread and CPU")
    assert decls["lat_seconds"] == ("histogram", None)
    assert "bogus" not in decls  # unknown type: ignored, no HELP either
    assert decls["spaced"] == (None, "spaced help text")


def test_annotator_inserts_before_first_sample_of_each_family():
    ann = declarations.Annotator(declarations.parse_declarations(TYPED))
    body = (b'count{tid="1",cpu="0"} 5\ncount{tid="2",cpu="1"} 7\n'
            b'lat_seconds_bucket{le="1"} 1\nlat_seconds_bucket{le="+Inf"} 2\n'
            b"lat_seconds_sum 1.5\nlat_seconds_count 2\nother 1\n")
    out = ann.annotate(body).decode()
    lines = out.splitlines()
    assert lines[0] == "# HELP count read() calls per thread and CPU"
    assert lines[1] == "# TYPE count counter"
    assert lines[4] == "# TYPE lat_seconds histogram"
    assert lines[5].startswith("lat_seconds_bucket")
    assert out.count("# TYPE") == 2
    from prometheus_client.parser import text_string_to_metric_families
    types = {f.name: f.type for f in text_string_to_metric_families(out)}
    assert types["count"] == "counter" and types["lat_seconds"] == "histogram"


def test_annotator_leaves_what_the_output_declares_itself():
    ann = declarations.Annotator(declarations.parse_declarations(TYPED))
    body = b"# HELP count mine\ncount 1\n"
    out = ann.annotate(body)
    assert out.count(b"# HELP count") == 1
    assert b"# TYPE count counter\ncount 1\n" in out


def test_module_names(tmp_path):
    cat = catalog.Catalog(str(tmp_path), pid=4194304)
    names = ["a.stp", "A.stp", "x-y.stp", "x_y.stp", "z" * 200 + ".stp", "ünï.stp"]
    for n in names:
        (tmp_path / n).write_text("probe begin {}\n")
    cat.rescan()
    modules = {n: cat.get(n).module for n in names}
    assert len(set(modules.values())) == len(names)
    for m in modules.values():
        assert len(m) <= 55 and m.startswith("stapexp_4194304_")
        assert all(c.isalnum() and c.isascii() and not c.isupper() or c == "_" for c in m), m
    assert modules["a.stp"] == "stapexp_4194304_a"
    cat.rescan()
    assert {n: cat.get(n).module for n in names} == modules  # stable


def test_escape_line():
    assert escape_line("a\x1b[31mb\r\nc\x00\x7f") == "a\\x1b[31mb\\x0d\\x0ac\\x00\\x7f"
    assert escape_line("plain ünïcode") == "plain ünïcode"


def test_empty_fifo_cycles_are_retried_sooner_early_on():
    """After an empty FIFO cycle the reader pauses a quarter of the time it
    has waited, 5 ms at least and 0.1 s at most: reads come every few ms
    while a just-started script gets ready, rarely once it has been silent a
    while (each empty read makes stapbpf spin until the reader closes)."""
    pauses = [procfs.empty_retry_pause(t) for t in (0, 0.02, 0.1, 0.2, 0.4, 5)]
    assert pauses == pytest.approx([0.005, 0.005, 0.025, 0.05, 0.1, 0.1])
    waited, reads = 0.0, 0
    while waited < 0.2:
        waited += procfs.empty_retry_pause(waited)
        reads += 1
    assert reads == 15  # doubling pauses from 5 ms made 5; a flat 5 ms would make 40

