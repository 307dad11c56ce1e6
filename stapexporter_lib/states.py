"""Lifecycle states of one script's session.

Plain constants with named groups, no imports: every other module may use
these without pulling in anything else.

    STOPPED --start--> STARTING --output appeared--> RUNNING
    STARTING/RUNNING --exit--> FAILED (on-demand) | BACKOFF (autostart)
    STARTING/RUNNING --keepalive/shutdown--> STOPPING --exit--> STOPPED
    BACKOFF --delay elapsed--> STARTING
    FAILED --error reported / next request--> STOPPED --start--> ...
    STOPPED/FAILED/STARTING --file not trusted, wrong setting--> REFUSED (no process)
    STARTING/RUNNING --output not trusted--> REFUSED (the process runs on)
    REFUSED --file fixed--> STOPPED (on-demand) | STARTING (request, autostart timer)
    REFUSED --output trusted again--> RUNNING

``RUNNING`` means the process runs and its output exists (whether or not
anyone has read it yet).  ``REFUSED`` comes in two kinds: without a process
(the script file is not trusted: the next request, or for an autostart
script the backoff timer, checks it again) and with one (its output is not
trusted: nothing is served until a check passes, then it is ``RUNNING``).

Owns the states, their groups and the transitions table.  Must not import
anything or hold behaviour.
"""

STOPPED = "stopped"    # no process; started on the next request
STARTING = "starting"  # process spawned, no output yet (compiling)
RUNNING = "running"    # process up and its output exists
STOPPING = "stopping"  # SIGTERM sent, waiting for the process group to go
BACKOFF = "backoff"    # autostart script exited; waiting to restart it
FAILED = "failed"      # exited on its own; the error is kept for a 502
REFUSED = "refused"    # its file (untrusted, a wrong setting) or its output was refused

# Every state, in the order the documentation and the metrics list them.
ALL_STATES = (STOPPED, STARTING, RUNNING, STOPPING, BACKOFF, FAILED, REFUSED)

# A request may be answered from the script's output in these states
# (REFUSED only while its process runs: the check is made again).
SERVING_STATES = (STARTING, RUNNING, REFUSED)

# A request (re)starts the script from these states (REFUSED only without
# a process, and only once its file is trusted).
STARTABLE_STATES = (STOPPED, FAILED, REFUSED)

# The watchdog looks for the output (at an interval) in these states.
OUTPUT_PENDING_STATES = (STARTING, REFUSED)

# Which states each state may move to; Lifecycle._transition enforces it.
TRANSITIONS = {
    STOPPED: (STARTING, REFUSED),
    STARTING: (RUNNING, STOPPING, FAILED, BACKOFF, REFUSED),
    RUNNING: (STOPPING, FAILED, BACKOFF, REFUSED),
    STOPPING: (STOPPED,),
    BACKOFF: (STARTING, STOPPED),
    FAILED: (STARTING, STOPPED, REFUSED),
    REFUSED: (STARTING, RUNNING, STOPPING, FAILED, BACKOFF, STOPPED),
}
