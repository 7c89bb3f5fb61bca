"""A deterministic fault simulator for the control plane (issue 9, item 8).

Each seed runs one or more real gateways (`gateway.app.create_app` and its lifespan: controller,
policies, reaper, ledger, lease, SQLite store in a temp file) on a virtual-time event loop, against
a simulated cloud behind the Provider protocol, with seeded traffic and injected faults, and
checks the invariants after every step, every few virtual seconds and at the end.

    python -m tests.sim --seeds 2000             # seeds 0..1999: faults by kind, violations by seed
    python -m tests.sim --seed 17                # replay seed 17 with its whole trace
    python -m tests.sim --seeds 200 --only stop-fail   # only one kind of fault ('none': no faults)

Files: vloop.py (the virtual-time loop, stalls and kill -9), faults.py and cloud.py (SimCloud:
the shared world) and views.py (one gateway's Provider), dbfaults.py (database errors),
plan.py (settings, models and the steps a seed draws), actions.py (what a step does),
driver.py (the only code that knows controller internals), schedules.py (after hours and
pre-warm firings), invariants.py, store_view.py (reads the database for the checks), sim.py (one
seed), run.py (the command line), test_sim.py (in `make test`).

A trace line is `<virtual seconds> <what happened>`; deployment ids are random (uuid4), so traces
name them d1, d2, ... in order of appearance, and clusters are c1, c2, ...
"""
