"""Small helpers shared by the spec tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from marmot_appliance.errors import SpecError
from marmot_appliance.spec.loader import load_cluster_text

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

MINIMAL = """\
apiVersion: marmot-appliance/v1
kind: Cluster
name: shop
nodes:
  - {name: n1, id: 1, host: 10.0.0.1, db: /srv/app.db}
  - {name: n2, id: 2, host: 10.0.0.2, db: /srv/app.db}
  - {name: n3, id: 3, host: 10.0.0.3, db: /srv/app.db}
"""


def problems_of(text: str, source: str = "spec.yaml") -> list[str]:
    """The located problems the loader reports for `text` (fails the test if it loads)."""
    with pytest.raises(SpecError) as caught:
        load_cluster_text(text, source)
    return caught.value.problems


def single_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]
