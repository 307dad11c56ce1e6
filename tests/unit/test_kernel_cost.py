"""What a script costs the kernel, read from fixture trees: BPF programs and
maps from /proc/PID/fd and fdinfo, a kernel module's size from sysfs;
turning the BPF statistics on (a descriptor first, the sysctl only when
refused, put back after); counting the samples of an output; the index
page's probe time as a share of a CPU."""

import errno
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from stapexporter_lib.scripts import bpfstats, proccost  # noqa: E402
from stapexporter_lib.scripts.bpfstats import KernelCost  # noqa: E402
from stapexporter_lib.scripts.output import count_samples  # noqa: E402
from stapexporter_lib.web.app import PROBE_WINDOW, probe_share  # noqa: E402

# As a stapbpf running a timer script shows them (kernel 6.18).
PROG = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t17
prog_type:\t7
prog_jited:\t1
prog_tag:\tac92226bcfcb1a48
memlock:\t4096
prog_id:\t%(id)d
run_time_ns:\t%(ns)d
run_cnt:\t%(runs)d
recursion_misses:\t0
verified_insns:\t67
"""
MAP = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t17
map_type:\t1
key_size:\t8
value_size:\t8
max_entries:\t2048
map_flags:\t0x0
map_extra:\t0x0
memlock:\t%(memlock)d
map_id:\t%(id)d
frozen:\t0
"""


def fake_proc(tmp_path, processes):
    """A proc tree: PROCESSES is {pid: {fd: (link target, fdinfo text or None)}}."""
    proc = tmp_path / "proc"
    for pid, fds in processes.items():
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "fdinfo").mkdir()
        for fd, (target, info) in fds.items():
            os.symlink(target, str(proc / str(pid) / "fd" / str(fd)))
            if info is not None:
                (proc / str(pid) / "fdinfo" / str(fd)).write_text(info)
    return str(proc)


def test_parse_fdinfo_reads_every_field():
    fields = bpfstats.parse_fdinfo(PROG % {"id": 513, "ns": 94951, "runs": 30})
    assert fields["prog_type"] == "7" and fields["run_time_ns"] == "94951"
    assert fields["run_cnt"] == "30" and fields["memlock"] == "4096"
    assert bpfstats.parse_fdinfo("no colon\n\nkey:  spaced value \n") == {"key": "spaced value"}


def test_bpf_cost_sums_programs_and_maps_of_every_member(tmp_path):
    proc = fake_proc(tmp_path, {
        100: {0: ("/dev/null", "pos:\t0\n"),  # not BPF: its fdinfo is not read
              3: ("socket:[1234]", None),
              5: (bpfstats.MAP_LINK, MAP % {"memlock": 164880, "id": 1752}),
              6: (bpfstats.MAP_LINK, MAP % {"memlock": 320, "id": 1753}),
              9: (bpfstats.PROG_LINK, PROG % {"id": 513, "ns": 94951, "runs": 30}),
              10: (bpfstats.PROG_LINK, PROG % {"id": 514, "ns": 5049, "runs": 10}),
              11: (bpfstats.PROG_LINK, None)},  # closed between the listing and the read
        # Another member holding the same program and map: counted once.
        101: {4: (bpfstats.PROG_LINK, PROG % {"id": 513, "ns": 94951, "runs": 30}),
              7: (bpfstats.MAP_LINK, MAP % {"memlock": 320, "id": 1753})},
        # The stap driver: no BPF descriptors.
        102: {0: ("/dev/null", None)},
    })
    cost = bpfstats.bpf_cost([100, 101, 102, 999], proc)
    assert cost == KernelCost(memory_bytes=164880 + 320 + 4096 * 2, bpf=True,
                              probe_seconds=pytest.approx(100000 / 1e9), probe_runs=40)
    assert bpfstats.bpf_cost([102], proc) is None
    assert bpfstats.bpf_cost([999], proc) is None
    assert bpfstats.bpf_cost([100], str(tmp_path / "nope")) is None


def test_bpf_cost_counts_descriptors_without_ids_and_ignores_garbage(tmp_path):
    proc = fake_proc(tmp_path, {
        7: {3: (bpfstats.MAP_LINK, "map_type:\t2\nmemlock:\t100\n"),
            4: (bpfstats.MAP_LINK, "map_type:\t2\nmemlock:\t100\n"),
            5: (bpfstats.PROG_LINK, "prog_type:\t7\nmemlock:\tlots\nrun_cnt:\t-\n")},
    })
    assert bpfstats.bpf_cost([7], proc) == KernelCost(200, True, 0.0, 0)


def fake_sys(tmp_path, modules):
    sys_root = tmp_path / "sys"
    for name, coresize in modules.items():
        (sys_root / "module" / name).mkdir(parents=True)
        if coresize is not None:
            (sys_root / "module" / name / "coresize").write_text(coresize)
    (tmp_path / "coresize").write_text("4096\n")  # what a traversal would reach
    return str(sys_root)


def test_module_cost_from_a_stand_in_sysfs(tmp_path):
    sys_root = fake_sys(tmp_path, {"stapexp_1_ticks": "1228800\n", "builtin": None,
                                   "odd": "many\n"})
    assert bpfstats.module_cost("stapexp_1_ticks", sys_root) == KernelCost(1228800, False,
                                                                           0.0, 0)
    for missing in ("stapexp_1_gone", "builtin", "odd", "", "..", "../..", "a/../../.."):
        assert bpfstats.module_cost(missing, sys_root) is None, missing


def test_kernel_cost_prefers_bpf_then_the_module(tmp_path):
    proc = fake_proc(tmp_path, {5: {3: (bpfstats.MAP_LINK, MAP % {"memlock": 10, "id": 1})},
                                6: {}})
    sys_root = fake_sys(tmp_path, {"m": "77\n"})
    assert bpfstats.kernel_cost([5], "m", proc, sys_root).bpf
    assert bpfstats.kernel_cost([6], "m", proc, sys_root) == KernelCost(77, False, 0.0, 0)
    assert bpfstats.kernel_cost([6], None, proc, sys_root) is None


def test_group_costs_carry_each_group_kernel_cost(tmp_path):
    proc = fake_proc(tmp_path, {
        10: {3: (bpfstats.PROG_LINK, PROG % {"id": 1, "ns": 2000, "runs": 2})},
        11: {4: (bpfstats.MAP_LINK, MAP % {"memlock": 500, "id": 2})},
        20: {},
    })
    stat = "%d (x) S 1 %d %d" + " 0" * 45 + "\n"
    for pid, pgrp in ((10, 10), (11, 10), (20, 20)):
        with open(os.path.join(proc, str(pid), "stat"), "w") as f:
            f.write(stat % (pid, pgrp, pgrp))
    sys_root = fake_sys(tmp_path, {"kmod": "9000\n"})
    costs = proccost.group_costs([10, 20], proc, {10: "bpf", 20: "kmod"}, sys_root)
    assert costs[10].processes == 2
    assert costs[10].kernel == KernelCost(4596, True, 2e-6, 2)
    assert costs[20].kernel == KernelCost(9000, False, 0.0, 0)


# -- turning the statistics on ---------------------------------------------------

class Sysctl:
    """A stand-in kernel.bpf_stats_enabled: a file whose writes are counted."""

    def __init__(self, tmp_path, value):
        self.path = str(tmp_path / "bpf_stats_enabled")
        with open(self.path, "w") as f:
            f.write(value + "\n")
        os.utime(self.path, ns=(0, 0))

    @property
    def value(self):
        with open(self.path) as f:
            return f.read().strip()

    @property
    def written(self):
        return os.stat(self.path).st_mtime_ns != 0


def refused(err=errno.EPERM):
    def enable():
        raise OSError(err, os.strerror(err))
    return enable


def test_a_held_descriptor_turns_them_on_and_the_sysctl_is_never_written(tmp_path):
    sysctl = Sysctl(tmp_path, "0")
    r, w = os.pipe()
    os.close(w)
    how, stats_off = bpfstats.enable_stats(sysctl.path, enable=lambda: r)
    assert "BPF_ENABLE_STATS" in how
    assert os.fstat(r)  # held
    stats_off()
    with pytest.raises(OSError):
        os.fstat(r)  # closed: the kernel turns them off
    assert sysctl.value == "0" and not sysctl.written


def test_refused_the_sysctl_is_set_and_put_back(tmp_path):
    sysctl = Sysctl(tmp_path, "0")
    how, stats_off = bpfstats.enable_stats(sysctl.path, enable=refused())
    assert sysctl.value == "1" and "put back to 0" in how and "Operation not permitted" in how
    stats_off()
    assert sysctl.value == "0"


def test_refused_with_the_sysctl_already_on_nothing_is_written(tmp_path):
    sysctl = Sysctl(tmp_path, "1")
    _how, stats_off = bpfstats.enable_stats(sysctl.path, enable=refused())
    stats_off()
    assert sysctl.value == "1" and not sysctl.written


def test_refused_both_ways_is_one_clear_error(tmp_path):
    with pytest.raises(bpfstats.StatsError) as caught:
        bpfstats.enable_stats(str(tmp_path / "missing" / "bpf_stats_enabled"),
                              enable=refused(errno.EINVAL))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--bpf-stats: cannot turn")
    assert "bpf(BPF_ENABLE_STATS): Invalid argument" in message
    assert "No such file or directory" in message


def test_an_unknown_machine_is_refused_clearly(tmp_path):
    sysctl = Sysctl(tmp_path, "0")
    with pytest.raises(bpfstats.StatsError, match="system call's number on vax is not known"):
        bpfstats.enable_stats(sysctl.path, enable=lambda: bpfstats.bpf_enable_stats("vax"))
    assert not sysctl.written


# -- samples and shares --------------------------------------------------------

@pytest.mark.parametrize("text,samples", [
    (b"", 0),
    (b"a 1\n", 1),
    (b"# HELP a x\n# TYPE a counter\na 1\nb{c=\"#\"} 2\n", 2),
    (b"\n\n\na 1\n\n# c\nb 2\n", 2),
    (b"a 1\n# c\n\n", 1),
    (b"".join(b'x{n="%d"} %d\n' % (i, i) for i in range(500)), 500),
])
def test_count_samples(text, samples):
    assert count_samples(text) == samples


def test_probe_share_from_the_run_start_then_between_looks_a_window_apart():
    # First look, 20 s into the run: 0.2 s of probe time is 1% of a CPU.
    share, looks = probe_share(None, 42, 100.0, 120.0, 0.2)
    assert share == pytest.approx(0.01)
    # A look soon after counts from the same base, not from a moment ago.
    share, looks = probe_share(looks, 42, 100.0, 121.0, 0.2)
    assert share == pytest.approx(0.2 / 21)
    # Past the window: the growth since the look of 120 s.
    share, looks = probe_share(looks, 42, 100.0, 120.0 + PROBE_WINDOW, 0.2 + PROBE_WINDOW * 0.5)
    assert share == pytest.approx(0.5)
    share, looks = probe_share(looks, 42, 100.0, 121.0 + PROBE_WINDOW, 0.2 + PROBE_WINDOW * 0.5)
    assert share == pytest.approx(PROBE_WINDOW * 0.5 / (PROBE_WINDOW + 1))
    # A new run (another pid) counts from its own start.
    share, _ = probe_share(looks, 43, 500.0, 504.0, 0.04)
    assert share == pytest.approx(0.01)
    assert probe_share(None, 44, None, 7.0, 0.0)[0] is None
