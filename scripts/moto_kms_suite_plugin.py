"""pytest plugin of ``scripts/moto-kms-suite``, loaded into moto's own test run.

moto's KMS tests run unchanged in moto's server mode (``TEST_SERVER_MODE=true``): every
``boto3.client`` they make is sent to ``TEST_SERVER_MODE_ENDPOINT``, the harness's router in
front of one envfs key service per region. This plugin adds three things to that run:

- **Credentials.** An envfs access key belongs to one region's store (AWS's work in every
  region), so each KMS client is given the access key of the region it signs for, from
  ``$MOTO_KMS_SUITE_CREDENTIALS`` (JSON: region -> [access key id, secret]). moto's own fake
  credentials (``FOOBARKEY``) stay in the environment for everything else.
- **Facts for the classification** (``moto_kms_suite.classify``): the AWS operations and
  services a test names in its source, the asymmetric/HMAC/external-key values it names,
  and the API calls it really makes, with their error codes.
- **The report**: every test's outcome and facts, as JSON in ``$MOTO_KMS_SUITE_REPORT``.

With ``MOTO_KMS_SUITE_SKIP=1`` a test the source scan already shows to be not applicable is
skipped instead of run (it would fail on an operation envfs does not have), which saves the
key-service restarts its resets would cost.

Nothing here changes what a test sends or checks.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import botocore.client
import botocore.exceptions
import botocore.session
import pytest

# Parameters whose values say which kind of key a call is about (recorded as given).
FEATURE_PARAMS = ("KeySpec", "CustomerMasterKeySpec", "KeyUsage", "Origin", "MultiRegion")
# String constants in a test's source that name a kind of key envfs does not have.
_FEATURE_VALUE = re.compile(
    r"^(RSA_\d+|ECC_[A-Z0-9_]+|HMAC_\d+|SM2|SIGN_VERIFY|GENERATE_VERIFY_MAC|KEY_AGREEMENT"
    r"|EXTERNAL|AWS_CLOUDHSM|EXTERNAL_KEY_STORE)$"
)


def _kms_methods() -> dict[str, str]:
    """boto3's KMS client method names -> their AWS operation names."""
    model = botocore.session.get_session().get_service_model("kms")
    return {botocore.xform_name(name): name for name in model.operation_names}


def scan_source(source: str, methods: dict[str, str]) -> dict[str, list[str]]:
    """The KMS operations, other AWS services and kinds of key a test's source names.

    Read from its syntax tree: calls of boto3's KMS client methods (``.create_key(``),
    ``boto3.client("NAME")``, string constants that are exactly a key spec, usage or origin
    envfs lacks, and ``MultiRegion=True``.
    """
    operations, services, features = set(), set(), set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in methods:
                operations.add(methods[node.func.attr])
            if (
                node.func.attr in ("client", "resource")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "boto3"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value != "kms"
            ):
                services.add(str(node.args[0].value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _FEATURE_VALUE.match(node.value):
                features.add(node.value)
        elif (
            isinstance(node, ast.keyword)
            and node.arg == "MultiRegion"
            and isinstance(node.value, ast.Constant)
            and node.value.value is True
        ):
            features.add("MultiRegion=True")
    return {
        "operations": sorted(operations),
        "services": sorted(services),
        "features": sorted(features),
    }


def _source_of(item: pytest.Item) -> str:
    parts = []
    for obj in (getattr(item, "cls", None), getattr(item, "function", None)):
        if obj is None:
            continue
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


class _Recorder:
    def __init__(self) -> None:
        self.current: str | None = None
        self.tests: dict[str, dict[str, Any]] = {}

    def entry(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(
            nodeid, {"outcome": None, "message": "", "calls": [], "static": {}}
        )

    def record(self, call: dict[str, Any]) -> None:
        if self.current is not None:
            self.entry(self.current)["calls"].append(call)


_RECORDER = _Recorder()
_CREDENTIALS: dict[str, list[str]] = json.loads(os.environ.get("MOTO_KMS_SUITE_CREDENTIALS", "{}"))


def _patch_create_client() -> None:
    original: Callable[..., Any] = botocore.session.Session.create_client

    def create_client(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        if service_name == "kms" and kwargs.get("aws_access_key_id") is None and not args:
            region = kwargs.get("region_name") or self.get_config_variable("region")
            if region in _CREDENTIALS:
                kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = _CREDENTIALS[region]
        return original(self, service_name, *args, **kwargs)

    botocore.session.Session.create_client = create_client


def _patch_api_calls() -> None:
    original: Callable[..., Any] = botocore.client.BaseClient._make_api_call

    def make_api_call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        call: dict[str, Any] = {
            "service": self.meta.service_model.service_name,
            "region": self.meta.region_name,
            "operation": operation_name,
            "params": sorted(api_params),
            "values": {k: api_params[k] for k in FEATURE_PARAMS if k in api_params},
            "error": None,
        }
        _RECORDER.record(call)
        try:
            return original(self, operation_name, api_params)
        except botocore.exceptions.ClientError as exc:
            call["error"] = exc.response.get("Error", {}).get("Code")
            raise

    botocore.client.BaseClient._make_api_call = make_api_call


_patch_create_client()
_patch_api_calls()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from moto_kms_suite import static_not_applicable  # the harness's classification

    methods = _kms_methods()
    skip = os.environ.get("MOTO_KMS_SUITE_SKIP") == "1"
    for item in items:
        static = scan_source(_source_of(item), methods)
        _RECORDER.entry(item.nodeid)["static"] = static
        reason = static_not_applicable(static)
        if skip and reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"not applicable: {reason}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _RECORDER.current = item.nodeid
    try:
        return (yield)
    finally:
        _RECORDER.current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _RECORDER.entry(report.nodeid)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            entry["outcome"] = "passed"
        elif report.skipped:
            entry["outcome"] = "skipped"
        else:
            entry["outcome"] = "failed" if report.when == "call" else "error"
    elif report.when == "teardown" and report.failed and entry["outcome"] == "passed":
        entry["outcome"] = "error"
    if report.failed or report.skipped:
        entry["message"] = _message(report)[:1000]


def _message(report: pytest.TestReport) -> str:
    """The line that says why a test failed or was skipped."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])
    lines = str(report.longrepr).strip().splitlines()
    return lines[-1] if lines else ""


def pytest_sessionfinish() -> None:
    path = os.environ.get("MOTO_KMS_SUITE_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(_RECORDER.tests, out, indent=1, sort_keys=True)
