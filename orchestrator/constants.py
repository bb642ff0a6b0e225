"""Internal tunables of the control plane, in one place (users set theirs in the job config).

Every blocking call of the controller has a bound from here or from the
config (``cluster.collective_timeout_s``, ``elastic.step_timeout_s``,
``cluster.start_timeout_s``), so no wait is unbounded.
"""

# Steps queued ahead on every member: step s+1 is sent before step s's
# results are collected, so Ray's per-call latency hides behind compute.
PIPELINE_DEPTH = 2
# How long a job start waits for all of cluster.workers before it begins with
# the cluster.min_workers that are ready (the rest join when placed).
START_GRACE_S = 15.0
# How often waits on members wake up to check for errors and new members.
POLL_S = 0.25
# After the first error of a step, how long to wait for the other ranks'
# calls to end. A dead peer makes gloo fail within milliseconds, and a
# survivor blocked on another survivor is freed as soon as that one severs
# its connections (collectives/gloo_sockets.py), so this is a safety bound.
SETTLE_S = 10.0
# How long a survivor may take to leave its epoch before it is counted as
# stuck and killed (its state has been exported by then). With severing, no
# survivor has stayed stuck in the chaos runs; this is the fallback should
# one ever block outside a collective (e.g. in user code).
LEAVE_S = 20.0
# How long a control call (holdings, export, layout, memory report) may take:
# it runs on the member's control thread or between steps.
CONTROL_S = 60.0
# How long a member may take to snapshot its checkpoint shard, which first
# waits for its previous upload's current attempt to end.
CHECKPOINT_CALL_S = 600.0
