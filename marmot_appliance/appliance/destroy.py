"""`destroy`: stop every process the appliance started; with --purge also delete the state dir.

What --purge deletes is exactly the state directory (configs, credentials, JetStream stores
under it, logs, the state file) and nothing else. The nodes' SQLite databases are the user's
data: they are kept, even when they sit next to the spec, and destroy says where they are.
A JetStream store placed outside the state directory (nats.jetstream.store_dir) is kept too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from marmot_appliance.appliance.errors import ApplianceError
from marmot_appliance.appliance.progress import Progress
from marmot_appliance.appliance.resources import NODE_KIND, kind_of, store_dir_for
from marmot_appliance.appliance.state import StateDir
from marmot_appliance.appliance.supervisor import stop_process
from marmot_appliance.nats_client import default_state_dir
from marmot_appliance.spec.model import Cluster


@dataclass
class DestroyResult:
    stopped: list[str] = field(default_factory=list)
    purged: bool = False
    kept: list[Path] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def destroy_local(cluster: Cluster, purge: bool = False, progress: Progress | None = None) -> DestroyResult:
    progress = progress or Progress()
    state = StateDir(default_state_dir(cluster).resolve())
    result = DestroyResult()
    if state.exists():
        if not state.is_appliance_dir():
            raise ApplianceError(
                f"{state.root} was not created by marmot-appliance (no {state.marker.name}); not touching it"
            )
        with state.locked():
            recorded = state.load(cluster.name)
            # Node runtimes first: they drain their NATS connection while the servers still run.
            order = sorted(recorded.processes, key=lambda name: (kind_of(name) != NODE_KIND, name))
            for resource in order:
                record = recorded.processes[resource]
                if stop_process(record):
                    result.stopped.append(resource)
                    progress.say(f"stopped {resource} (pid {record.pid})")
                del recorded.processes[resource]
                state.save(recorded)
            if purge:
                shutil.rmtree(state.root)
                result.purged = True
    if not result.stopped:
        progress.say("No running processes." if state.exists() or result.purged else "Nothing to destroy.")
    if result.purged:
        progress.say(f"Removed state directory {state.root}.")
    databases = [Path(node.db) for node in sorted(cluster.nodes, key=lambda n: n.id)]
    result.kept = [db for db in databases if not (result.purged and _inside(db, state.root))]
    if result.purged and cluster.nats.jetstream.store_dir:
        result.kept += [store_dir_for(cluster, node, state) for node in cluster.nodes]
    if result.kept:
        progress.say("Kept (user data, never deleted by destroy): " + ", ".join(map(str, result.kept)))
    if state.exists():
        progress.say(f"Kept state directory {state.root} (JetStream data, logs); `destroy --purge` removes it.")
    return result
