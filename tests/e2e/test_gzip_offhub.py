"""gzip of large bodies runs off the hub, end to end: the
gevent monitor thread reports any greenlet that holds the hub too long."""

import gzip

from conftest import write_script

MONITOR_ENV = {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
BLOCKED_TEXT = "appears to be blocked"     # gevent's report (see test_hardening)


def test_gzip_of_a_large_body_does_not_block_the_hub(dirs, exporter_factory):
    scripts, _ = dirs
    # ~11 MiB of varied text: a third of a second of gzip at level 6.
    write_script(scripts, "big.stp", "lines=300000")
    exp = exporter_factory(env=MONITOR_ENV)
    plain = exp.get_until("/big.stp", timeout=30)
    assert len(plain.body) > 10 * 1024 * 1024
    for _ in range(3):
        r = exp.get("/big.stp", headers={"Accept-Encoding": "gzip"}, timeout=30)
        assert r.status == 200 and r.header("Content-Encoding") == "gzip"
        assert gzip.decompress(r.body).startswith(b'fake_up{script="big.stp"} 1\n')
        # Small answers keep coming meanwhile.
        assert exp.get("/-/healthy").status == 200
    text = exp.log_text()
    assert BLOCKED_TEXT not in text, text[text.find(BLOCKED_TEXT) - 200:][:3000]
