"""moto's own KMS test suite against envfs's AWS endpoint: issue 13's external proof.

Runs ``scripts/moto-kms-suite`` (moto's source release of the installed moto, downloaded
from PyPI; one ``envfs kms serve --listen-http`` per region) and holds its result to
``scripts/moto-kms-suite-explained.toml`` and ``docs/moto-kms-suite.md``: the applicable
tests that fail are exactly the explained ones, so a new failure and a fixed one both fail
here, and the document's counts are the run's. Tests whose failure depends on timing (two
calls within one second, see the table) may go either way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

from moto_kms_suite import explanation_for, load_explanations  # noqa: E402

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("moto-kms-suite") / "summary.json"
    result = subprocess.run(
        # The harness's own timeout comes first, so that it stops its servers itself.
        [sys.executable, str(SCRIPTS / "moto-kms-suite"), "--json", str(out), "--timeout", "600"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"moto-kms-suite exited {result.returncode}:\n{result.stderr}"
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_the_failing_applicable_tests_are_exactly_the_explained_ones(
    summary: dict[str, object],
) -> None:
    table = load_explanations()
    rows: dict[str, dict[str, object]] = summary["tests"]  # type: ignore[assignment]
    applicable = {t: r for t, r in rows.items() if r["category"] != "not applicable"}
    steady = {t: r for t, r in applicable.items() if not r.get("flaky")}
    failing = {t for t, r in steady.items() if r["category"].endswith("failure")}
    explained = {t for t in steady if explanation_for(t, table) is not None}
    assert summary["router_errors"] == [], "the harness failed, not envfs"
    new = {t: steady[t]["message"] for t in sorted(failing - explained)}
    fixed = sorted(explained - failing)
    assert not new, f"applicable tests fail without an explanation: {new}"
    assert not fixed, f"explained tests now pass: remove them from the table and doc: {fixed}"
    assert summary["unused_explanations"] == [], "explanations that match no test"


def test_the_document_has_the_runs_counts(summary: dict[str, object]) -> None:
    counts: dict[str, int] = summary["counts"]  # type: ignore[assignment]
    doc = (REPO / "docs" / "moto-kms-suite.md").read_text()
    assert f"moto {summary['moto_version']}" in doc
    for label, key in (
        ("total", "total"),
        ("not applicable", "not_applicable"),
        ("applicable", "applicable"),
        ("passed", "passed"),
        ("timing-dependent", "timing_dependent"),
        ("failed, explained", "explained"),
        ("failed, unexplained", "unexplained"),
        ("skipped by the test itself", "skipped"),
    ):
        match = re.search(rf"^\| {label} \| (\d+) \|$", doc, re.MULTILINE)
        assert match is not None, f"docs/moto-kms-suite.md has no '| {label} | N |' row"
        assert int(match.group(1)) == counts[key], f"{label}: doc {match.group(1)}, run {counts}"
