"""dirwatch: the exporter learns the moment a file is complete in a
directory (written and closed there; not renamed into it), follows no link, and
keeps one inotify descriptor however many directories it watches."""

import os

import gevent
import pytest

from stapexporter_lib import dirwatch

WAIT = 5.0


@pytest.fixture
def watcher():
    w = dirwatch.DirWatch()
    if w.watch("/") is None:
        pytest.skip("inotify is not available here")
    yield w
    w.close()


def in_thread(func, *args):
    """Do FUNC in another thread, as another process would."""
    return gevent.get_hub().threadpool.apply(func, args)


def test_a_rename_into_place_completes_no_name(watcher, tmp_path):
    """stap renames its module into place on every compile: that wakes
    nobody (the chain's marker is written in place)."""
    (tmp_path / "m.bo.tmp").write_bytes(b"whole")
    watch = watcher.watch(str(tmp_path))
    in_thread(os.rename, str(tmp_path / "m.bo.tmp"), str(tmp_path / "m.bo"))
    in_thread((tmp_path / "marker").write_bytes, b"x")
    assert watch.event.wait(WAIT)
    assert watch.completed("marker")
    assert not watch.completed("m.bo")


def test_a_file_open_for_writing_is_not_complete(watcher, tmp_path):
    watch = watcher.watch(str(tmp_path))
    f = open(tmp_path / "m.bo", "wb")
    f.write(b"half")
    f.flush()
    gevent.sleep(0.05)
    assert not watch.completed("m.bo")
    in_thread(f.close)
    assert watch.event.wait(WAIT)
    assert watch.completed("m.bo")


def test_one_descriptor_for_many_watches_and_links_refused(watcher, tmp_path):
    fds_before = len(os.listdir("/proc/self/fd"))
    watches = []
    for i in range(20):
        d = tmp_path / ("d%d" % i)
        d.mkdir()
        watches.append(watcher.watch(str(d)))
    assert all(watches)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    os.symlink(str(tmp_path / "d0"), str(tmp_path / "link"))
    assert watcher.watch(str(tmp_path / "link")) is None
    assert watcher.watch(str(tmp_path / "missing")) is None
    for watch in watches:
        watch.close()
    in_thread(os.rename, str(tmp_path / "d1"), str(tmp_path / "d1x"))
    (tmp_path / "d1x" / "late").write_bytes(b"x")
    gevent.sleep(0.05)
    assert not watches[1].event.is_set()
