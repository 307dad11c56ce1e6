"""Lifecycle states of one script's session.

Plain constants with named groups, no imports: every other module may use
these without pulling in anything else.

    STOPPED --start--> STARTING --output readable--> RUNNING
    STARTING/RUNNING --exit--> FAILED (on-demand) | BACKOFF (autostart)
    STARTING/RUNNING --keepalive/shutdown--> STOPPING --exit--> STOPPED
    BACKOFF --delay elapsed--> STARTING
    FAILED --error reported / next request--> STOPPED --start--> ...

Owns the states, their groups and the transitions table.  Must not import
anything or hold behaviour.
"""

STOPPED = "stopped"    # no process; started on the next request
STARTING = "starting"  # process spawned, no output readable yet (compiling)
RUNNING = "running"    # process up and its output has been read
STOPPING = "stopping"  # SIGTERM sent, waiting for the process group to go
BACKOFF = "backoff"    # autostart script exited; waiting to restart it
FAILED = "failed"      # exited on its own; the error is kept for a 502

# A request may be answered from the script's output in these states.
SERVING_STATES = (STARTING, RUNNING)

# A request (re)starts the script from these states.
STARTABLE_STATES = (STOPPED, FAILED)

# Which states each state may move to; Session._transition enforces it.
TRANSITIONS = {
    STOPPED: (STARTING,),
    STARTING: (RUNNING, STOPPING, FAILED, BACKOFF),
    RUNNING: (STOPPING, FAILED, BACKOFF),
    STOPPING: (STOPPED,),
    BACKOFF: (STARTING, STOPPED),
    FAILED: (STARTING, STOPPED),
}
