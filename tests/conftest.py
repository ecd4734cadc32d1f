import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The modules that use the one local SLURM cluster (jobs on its nodes, a node killed on purpose).
SLURM_MODULES = ("test_launch", "test_node_failure", "test_ownership")


def _scope(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "slurm" if Path(module).stem in SLURM_MODULES else module


def pytest_collection_modifyitems(config, items):
    """The SLURM modules first: under xdist they are the longest chain of one worker."""
    items.sort(key=lambda item: _scope(item.nodeid) != "slurm")  # stable: the order within is kept


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two xdist workers, one per core, with ``--dist loadfile``, scheduled here: a
    module's tests stay on one worker, so its module fixtures are built once, and the modules that
    use the SLURM cluster run one after another on one worker, so a test that kills a node or counts
    a run's submissions never meets another test's jobs."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling  # only under xdist

    class ModulesAndSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModulesAndSlurm(config, log)
