"""Checks of the bundled example scripts in examples/ against the real SystemTap.

* every example has the documented header comment and `// prometheus:`
  TYPE/HELP declarations, and avoids the tapset macros broken in 4.8;
* every example elaborates (`stap -p2`, realstap);
* every examples/bpf script without user-space probes really runs on the BPF
  runtime and produces valid Prometheus text (realstap); those with
  user-space probes run end to end in tests/test_uprobe_examples.py.
"""

import glob
import os
import re
import time

import pytest

import realstap

from conftest import ROOT as REPO  # noqa: E402
EXAMPLES = os.path.join(REPO, "examples")
ALL_EXAMPLES = sorted(glob.glob(os.path.join(EXAMPLES, "**", "*.stp"), recursive=True))
BPF_EXAMPLES = sorted(glob.glob(os.path.join(EXAMPLES, "bpf", "*.stp")))


def _id(path):
    return os.path.relpath(path, EXAMPLES)


def _runtime(path):
    return "bpf" if os.path.dirname(path) == os.path.join(EXAMPLES, "bpf") else "kernel"


TYPE_RE = re.compile(r"^// prometheus: TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) "
                     r"(counter|gauge|histogram|summary|untyped)\s*$")
HELP_RE = re.compile(r"^// prometheus: HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (\S.*)$")
# prometheus_dump_array4 expands to the broken prometheus_dump_array4_map.
BROKEN_MACRO_RE = re.compile(r"@prometheus_dump_array4(_map)?(_unquoted)?\b"
                             r"|@prometheus_dump_array8_map_unquoted\b")
HEADER_FIELDS = ("Measures:", "Probes:", "Overhead:", "Runtime:")
# Probe points the BPF runtime supports on these machines (see tests/realstap.py):
# timers, procfs and user-space probes on a library or program given by its
# absolute path (optionally `!`, sufficient: the first that resolves wins).
BPF_PROBE_RE = re.compile(r"^(begin|end|error|timer\.\w+\(\d+\)|procfs\b.*|prometheus"
                          r'|process\("/[^"]+"\)\.function\("\w+"\)(\.return)?\s*!?)$')
UPROBE_RE = re.compile(r'^\s*probe\s+process\(', re.M)


def uses_uprobes(path):
    with open(path) as f:
        return bool(UPROBE_RE.search(f.read()))


def declarations(text):
    """{family: (type, help)} from the `// prometheus:` comments."""
    types, helps = {}, {}
    for line in text.splitlines():
        if not line.startswith("// prometheus:"):
            continue
        m = TYPE_RE.match(line)
        if m:
            assert m.group(1) not in types, "duplicate TYPE for %s" % m.group(1)
            types[m.group(1)] = m.group(2)
            continue
        m = HELP_RE.match(line)
        assert m, "malformed declaration: %r" % line
        assert m.group(1) not in helps, "duplicate HELP for %s" % m.group(1)
        helps[m.group(1)] = m.group(2)
    return {f: (types[f], helps.get(f)) for f in types}, set(helps) - set(types)


def header_block(text):
    lines = []
    for line in text.splitlines():
        if line.startswith("//") or not line.strip():
            lines.append(line)
        else:
            break
    return "\n".join(lines)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"(//|#).*$", "", l) for l in text.splitlines())


# ---------------------------------------------------------------- static checks

def test_examples_exist():
    names = [os.path.basename(p) for p in ALL_EXAMPLES]
    assert len(BPF_EXAMPLES) >= 3, BPF_EXAMPLES
    assert len([p for p in BPF_EXAMPLES if uses_uprobes(p)]) >= 3, BPF_EXAMPLES
    assert len(ALL_EXAMPLES) - len(BPF_EXAMPLES) >= 5
    assert any("autostart" in os.path.basename(p) for p in BPF_EXAMPLES)
    assert any("autostart" in n for n in names if n not in
               [os.path.basename(p) for p in BPF_EXAMPLES])


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=_id)
def test_example_header_and_declarations(path):
    with open(path) as f:
        text = f.read()
    assert text.startswith("// "), "%s must start with a header comment" % _id(path)
    header = header_block(text)
    for field in HEADER_FIELDS:
        assert re.search(r"^// %s\s+\S" % re.escape(field), header, re.M), \
            "%s: header comment lacks %r" % (_id(path), field)
    decls, orphan_helps = declarations(text)
    assert decls, "%s: no `// prometheus: TYPE` line" % _id(path)
    assert not orphan_helps, "%s: HELP without TYPE: %s" % (_id(path), orphan_helps)
    for family, (typ, helptext) in decls.items():
        assert helptext, "%s: no HELP for %s" % (_id(path), family)
        assert not re.search(r"_(bucket|sum|count)$", family) or typ not in ("histogram", "summary"), \
            "%s: histogram/summary family must be the base name: %s" % (_id(path), family)
        # the family name must actually be emitted by the script
        assert family in text.replace("// prometheus:", ""), family
    code = strip_comments(text)
    assert not BROKEN_MACRO_RE.search(code), \
        "%s uses a prometheus.stpm macro that is broken in systemtap 4.8" % _id(path)
    assert re.search(r"^\s*probe\s+prometheus\b", code, re.M), _id(path)
    if _runtime(path) == "bpf":
        assert re.search(r"^// Runtime:.*BPF", header, re.M), _id(path)
        for m in re.finditer(r"^\s*probe\s+([^{]+?)\s*\{", code, re.M):
            for point in m.group(1).split(","):
                assert BPF_PROBE_RE.match(point.strip()), \
                    "%s: probe %r is not supported by the BPF runtime here" % (_id(path), point)


# ---------------------------------------------------------------- real systemtap

@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    reason = realstap.skip_reason()
    if reason:
        pytest.skip(reason)
    return realstap.prepare(tmp_path_factory.mktemp("realstap"))


# Errors that only mean "this machine has no kernel headers/debuginfo", i.e.
# kernel probe points (tracepoints, DWARF kernel.function) cannot be resolved.
ENV_ERROR_RES = [
    re.compile(r"^semantic error: while resolving probe point: identifier '\w+' at "),
    re.compile(r"^semantic error: no match\s*$"),
    re.compile(r"^semantic error: missing \S+ kernel/module debuginfo"),
    re.compile(r"^semantic error: resolution failed in (tracepoint|alias expansion) builder"),
]


def only_environment_errors(stderr):
    errors = [l for l in stderr.splitlines() if re.match(r"^\w+ error: ", l)]
    if not errors:
        return False
    if not ("debuginfo" in stderr or "identifier 'kernel' at" in stderr
            or "tracepoint builder" in stderr):
        return False
    return all(any(r.match(e) for r in ENV_ERROR_RES) for e in errors)


@pytest.mark.realstap
@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=_id)
def test_example_elaborates(rs, path):
    runtime = _runtime(path)
    if uses_uprobes(path):
        reason = realstap.uprobe_skip_reason(rs)
        if reason:
            pytest.skip(reason)
    rc, stderr = rs.elaborate(path, runtime=runtime, timeout=60)
    if rc != 0 and runtime == "kernel" and only_environment_errors(stderr):
        # The kernel probe points cannot be resolved on a machine without kernel
        # headers/debuginfo; everything else (the prometheus probe bodies, the
        # tapset macros, the script's own code) was still checked by pass 2 and
        # produced no error.
        return
    assert rc == 0, "stap -p2 (%s runtime) failed for %s:\n%s" % (runtime, _id(path), stderr)


@pytest.mark.realstap
def test_wrapper_script_elaborates(rs, tmp_path):
    wrapper = str(tmp_path / "ticks.stp")
    with open(BPF_EXAMPLES[0]) as f:
        real = rs.write_wrapper_script(wrapper, f.read())
    assert os.access(wrapper, os.X_OK) and not real.endswith(".stp")
    rc, stderr = rs.elaborate(wrapper)
    assert rc == 0, stderr
    with open(real, "w") as f:
        f.write("probe nosuchprobe { }\n")
    rc, stderr = rs.elaborate(wrapper)
    assert rc != 0 and "nosuchprobe" in stderr, stderr


SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)\s*$")


def family_of(sample_name, decls):
    for family, (typ, _) in decls.items():
        if sample_name == family:
            return family
        if typ == "histogram" and sample_name in (family + "_bucket", family + "_sum",
                                                  family + "_count"):
            return family
        if typ == "summary" and sample_name in (family + "_sum", family + "_count"):
            return family
    return None


def annotate(text, decls):
    """Prepend # HELP/# TYPE (from the script's declarations) to each family's lines."""
    groups = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = SAMPLE_RE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        family = family_of(m.group(1), decls)
        assert family, "sample %r of undeclared family" % line
        groups.setdefault(family, []).append(line)
    out = []
    for family, lines in groups.items():
        typ, helptext = decls[family]
        out.append("# HELP %s %s" % (family, helptext))
        out.append("# TYPE %s %s" % (family, typ))
        out.extend(lines)
    return "\n".join(out) + "\n", groups


@pytest.mark.realstap
@pytest.mark.parametrize("path", [p for p in BPF_EXAMPLES if not uses_uprobes(p)], ids=_id)
def test_bpf_example_runs(rs, path, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    with open(path) as f:
        decls, _ = declarations(f.read())
    module = "stapex_t%d_%d" % (os.getpid() % 100000, BPF_EXAMPLES.index(path))
    fifo = realstap.fifo_path(module)
    errlog = open(str(tmp_path / "stap.err"), "w+")
    proc = None
    script = path
    if "autostart" in os.path.basename(path):
        # exercise the distribution-style form too: an executable .stp shell
        # wrapper to which the caller appends `-m MODULE`
        script = str(tmp_path / "scripts" / os.path.basename(path))
        os.mkdir(os.path.dirname(script))
        with open(path) as f:
            rs.write_wrapper_script(script, f.read())
    try:
        proc = rs.start(module, script, tmp_path, stderr=errlog)
        deadline = time.monotonic() + 12
        while not os.path.exists(fifo):
            assert proc.poll() is None, "stap exited early (%s)" % proc.returncode
            assert time.monotonic() < deadline, "no FIFO %s" % fifo
            time.sleep(0.1)
        time.sleep(1.2)  # let timer probes fire
        text = realstap.read_fifo(fifo, timeout=8, proc=proc)
    except BaseException:
        errlog.seek(0)
        print("stap stderr:\n" + errlog.read())
        raise
    finally:
        realstap.stop(proc)
        errlog.close()
    assert not os.path.exists(os.path.dirname(fifo)), "FIFO directory left behind"
    assert not glob.glob(os.path.join(REPO, "*.bo"))

    annotated, groups = annotate(text, decls)
    assert groups, "no samples in %r" % text
    families = list(text_string_to_metric_families(annotated))
    samples = [s for fam in families for s in fam.samples]
    assert len(samples) == sum(len(v) for v in groups.values())
    by_name = {}
    for fam in families:
        for s in fam.samples:
            by_name.setdefault(s.name, []).append(s)
            declared = decls[family_of(s.name, decls)][0]
            assert fam.type == declared or (declared == "untyped" and fam.type == "unknown"), \
                (s.name, fam.type, declared)
    for family, (typ, _) in decls.items():
        if typ != "histogram" or family not in groups:
            continue
        buckets = by_name[family + "_bucket"]
        les = [s.labels["le"] for s in buckets]
        assert les[-1] == "+Inf", les
        bounds = [float(le) for le in les]
        assert bounds == sorted(bounds), les
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), "buckets must be cumulative: %s" % counts
        assert by_name[family + "_count"][0].value == counts[-1]
        assert by_name[family + "_sum"][0].value >= 0
