"""Each request waits with its own deadline, end to end.

Concurrent requests for one script share a single read of its output; that
read runs on the deadline of the request that began it.  A client with a
short deadline (a Prometheus scrape timeout header) must not make the
others' scrapes fail: when the shared read gives up, a request with time
left reads again itself."""

import threading

from conftest import write_script


def test_a_short_deadline_does_not_fail_the_scrapes_sharing_its_read(dirs, exporter_factory):
    scripts, _ = dirs
    # The output takes 0.6 s to come once a reader opens the FIFO.
    write_script(scripts, "slow.stp", "mode=fifo write_delay=0.6")
    exp = exporter_factory()
    assert exp.get_until("/slow.stp").status == 200
    for _ in range(5):
        short = {}

        def hasty():
            short["r"] = exp.get("/slow.stp",
                                 headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.35"})
        t = threading.Thread(target=hasty)
        t.start()
        patient = exp.get("/slow.stp", timeout=15)
        t.join(15)
        assert short["r"].status == 503, short["r"]  # its own 0.1 s were too short
        assert patient.status == 200, patient        # the default 5 s were not
