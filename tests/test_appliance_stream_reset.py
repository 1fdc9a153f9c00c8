"""`destroy --purge` then `apply` with the databases kept (issue 10, case 3, as users hit it).

The purge deletes the JetStream stores; the next `apply` re-creates the shard streams, whose
sequences start again at 1 below every node's stored position. Before, the first changes after
it were dropped as duplicates on the other nodes. Real `marmot-appliance apply` (embedded
nats-servers, node processes), real SQLite files.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_appliance_local import (
    Appliance,
    assert_ok,
    create_databases,
    emergency_stop,
    wait_converged,
    wait_health,
    write_rows,
)
from tests.test_appliance_support import describe, make_workdir, spec_data

pytestmark = pytest.mark.slow


def test_purge_then_apply_with_databases_kept_replays_the_new_streams():
    workdir = make_workdir()
    app = Appliance(workdir, spec_data(nodes=2))
    try:
        create_databases(app)
        spec = str(app.spec)
        assert_ok(app.cli("apply", spec), "Apply complete")
        write_rows(app.db("n1"), "n1", 15)
        wait_converged(app, 15)

        purged = app.cli("destroy", spec, "--purge")
        assert_ok(purged, "Removed state directory")
        assert app.db("n1").exists() and app.db("n2").exists()  # the databases are kept

        assert_ok(app.cli("apply", spec), "Apply complete")
        write_rows(app.db("n1"), "after", 3)  # the first entries of the re-created stream
        wait_converged(app, 18)
        health = wait_health(app, "n2", 200)
        assert health["stream_resets"], json.dumps(health)
    finally:
        result = app.cli("destroy", str(app.spec), "--purge")
        emergency_stop(app)
        shutil.rmtree(workdir, ignore_errors=True)
        assert result.returncode == 0, describe(result)
