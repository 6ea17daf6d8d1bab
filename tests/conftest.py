import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture
def task_identity():
    """Flower needs a task identity to build instruction messages outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the xdist_group marks into scopes
def pytest_collection_modifyitems(config, items):
    """Scheduling under ``pytest -n 2 --dist loadgroup --no-loadscope-reorder`` (what ``make test`` runs): a
    file's tests stay on one worker (module-scoped fixtures such as a whole deployment run once), and the loopback
    deployments share one worker, so that no two of them compete for the cores at once. That group, the longest
    piece of work, comes first; the files follow in their order and fill the other worker meanwhile."""
    for item in items:
        group = "deployment" if item.get_closest_marker("deployment") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("deployment") is None)  # stable: files keep their order
