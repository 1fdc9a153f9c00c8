"""Load a cluster spec: read, parse with positions, validate, check, apply defaults.

    cluster = load_cluster("cluster.yaml")   # -> Cluster, or raises SpecError

Every mistake found is reported at once, each as `file:line:col: $.json.path: message`.
An unsupported `apiVersion` stops early: the rest of the document would be checked against the
wrong schema.
"""

from __future__ import annotations

from pathlib import Path

from marmot_appliance.errors import SpecError

from .defaults import build_cluster
from .model import SUPPORTED_API_VERSIONS, Cluster
from .schema_files import schema_file_problems
from .semantic import semantic_problems
from .validation import schema_problems
from .yaml_source import SourceDocument, parse_yaml

MAX_SPEC_BYTES = 4 * 1024 * 1024


def read_spec_text(path: Path) -> str:
    """The file's text, or a SpecError saying plainly why it cannot be read."""
    try:
        if path.is_dir():
            raise SpecError([f"{path}: is a directory, expected a YAML file"])
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except PermissionError:
        raise SpecError([f"{path}: permission denied"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{path}: larger than {MAX_SPEC_BYTES} bytes; not a cluster spec"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text (invalid byte at offset {exc.start})"]) from None


def _check_api_version(document: SourceDocument) -> None:
    data = document.data
    if not isinstance(data, dict) or "apiVersion" not in data:
        return  # the schema reports a missing apiVersion with everything else
    version = data["apiVersion"]
    if version not in SUPPORTED_API_VERSIONS:
        supported = ", ".join(SUPPORTED_API_VERSIONS)
        problem = document.problem(
            ("apiVersion",), f"unsupported apiVersion {str(version)!r}; supported: {supported}"
        )
        raise SpecError([problem.format()])


def load_cluster_text(
    text: str,
    source_name: str = "<string>",
    base_dir: Path | None = None,
    source: Path | None = None,
    check_schema_files: bool = True,
) -> Cluster:
    """Load a spec from text. Relative paths of local nodes resolve against `base_dir` (default: cwd).

    `check_schema_files` reads and checks the SQL files of `schema:` (docs/schema.md); a node
    runtime, which never reads them (the spec may have been copied to its host without them),
    passes False.
    """
    document = parse_yaml(text, source_name)
    _check_api_version(document)
    base_dir = (base_dir or Path.cwd()).absolute()
    problems = document.problems + schema_problems(document) + semantic_problems(document)
    if check_schema_files:
        problems += schema_file_problems(document, base_dir)
    if problems:
        raise SpecError([problem.format() for problem in dict.fromkeys(problems)])
    return build_cluster(document.data, base_dir, source)


def load_cluster(path: str | Path, check_schema_files: bool = True) -> Cluster:
    """Load and validate the spec file at `path`; raises SpecError listing every mistake."""
    path = Path(path)
    text = read_spec_text(path)
    return load_cluster_text(
        text, str(path), base_dir=path.parent.absolute(), source=path.absolute(), check_schema_files=check_schema_files
    )
