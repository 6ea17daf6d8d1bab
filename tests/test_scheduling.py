"""`make test`'s scheduling holds: under ``--dist loadgroup`` this test's node ID carries its group.

Without the group a file's module fixtures run once per worker and the loopback deployments run side by side.
That happens silently with pytest 9.2 and pytest-xdist 3.8: pytest 9.2 builds node IDs from a structure that
xdist's group suffix does not reach, which is why pyproject.toml caps pytest below 9.2.
"""


def test_the_file_group_reaches_the_scheduler(request):
    if not getattr(request.config.option, "loadgroup", False):
        return  # not under xdist's loadgroup: nothing is scheduled by group
    assert request.node.nodeid.endswith("@tests/test_scheduling.py"), (
        f"node ID {request.node.nodeid!r} carries no xdist group: install the pytest and pytest-xdist of "
        "constraints.txt")
