"""moto's own KMS test suite, run against envfs's AWS endpoint (issue 13's external proof).

``scripts/moto-kms-suite`` is the command; this module is its body, and also the
classification the pytest plugin (``moto_kms_suite_plugin``) imports.

How a run goes:

1. moto's source release (the installed moto's version, from PyPI, or ``--moto-sdist``) is
   unpacked into a temporary folder: its ``tests/test_kms`` are the tests. Nothing of moto's
   is kept.
2. For every region the tests name, a key store is made once with ``envfs kms init`` (a
   *template*), and an access key for the user running the suite with ``envfs kms
   create-access-key``. That user is root here, a key creator; a key it creates without a
   ``Policy`` gets envfs's default policy with the creator as both key administrator and
   key user (docs/kms.md §4 notes, §5.2), so moto's "create, then encrypt" works without
   any extra grant.
3. A router on a loopback port stands for moto's server. It sends each request, byte for
   byte, to the envfs key service of the region in its SigV4 credential scope, each one
   ``envfs kms serve --listen-http`` on a copy of that region's template. It answers moto's
   ``POST /moto-api/reset`` (sent before and after every test) by retiring each service that
   was used since the last reset and starting a fresh one on a new copy of the template:
   every test meets empty stores, and envfs itself has no reset.
4. moto's tests run unchanged in moto's server mode (``TEST_SERVER_MODE=true``,
   ``TEST_SERVER_MODE_ENDPOINT`` = the router), with the plugin giving each KMS client its
   region's access key and recording what each test calls.
5. Every test is classified: **not applicable** when it tests moto's own code (no request),
   uses another AWS service, calls an operation envfs does not have, or names a kind of key
   envfs does not have (asymmetric, HMAC, external or multi-Region keys); otherwise
   **applicable**, passed or failed. Each applicable failure must have an explanation in
   ``scripts/moto-kms-suite-explained.toml``: a moto quirk, an AWS behaviour envfs chose not
   to copy, or an envfs bug.

The summary is JSON (``--json``) and markdown (``--markdown``). Every server is stopped and
the temporary folder removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import grp
import http.client
import http.server
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envfs.kms.operations import OPERATIONS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXPLAINED = HERE / "moto-kms-suite-explained.toml"
TESTS = "tests/test_kms"

# --- classification ------------------------------------------------------------------------

# Values of CreateKey's parameters that ask for a kind of key envfs does not have
# (docs/kms.md §13: symmetric keys only, origin ENVFS_KMS, single-region).
_OTHER_KEY_SPEC = re.compile(r"^(RSA_\d+|ECC_[A-Z0-9_]+|HMAC_\d+|SM2)$")
_OTHER_KEY_USAGE = {"SIGN_VERIFY", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT"}
_OTHER_ORIGIN = {"EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"}


def _missing_operations(operations: list[str]) -> list[str]:
    return sorted({op for op in operations if op not in OPERATIONS})


def static_not_applicable(static: dict[str, list[str]]) -> str | None:
    """Why a test is not applicable, from what its source names; None if it may be."""
    if static.get("services"):
        return f"uses AWS {', '.join(static['services'])}, which envfs does not provide"
    missing = _missing_operations(static.get("operations", []))
    if missing:
        return f"calls {', '.join(missing)}, which envfs does not have"
    if static.get("features"):
        return (
            f"names {', '.join(static['features'])}: a kind of key envfs does not have"
            " (symmetric, envfs-made, single-region keys only: docs/kms.md §13)"
        )
    return None


def _call_not_applicable(calls: list[dict[str, Any]]) -> str | None:
    services = sorted({c["service"] for c in calls if c["service"] != "kms"})
    if services:
        return f"uses AWS {', '.join(services)}, which envfs does not provide"
    missing = _missing_operations([c["operation"] for c in calls])
    if missing:
        return f"calls {', '.join(missing)}, which envfs does not have"
    for call in calls:
        values = call.get("values", {})
        for name in ("KeySpec", "CustomerMasterKeySpec"):
            if isinstance(values.get(name), str) and _OTHER_KEY_SPEC.match(values[name]):
                return f"asks for {name} {values[name]}: envfs has symmetric keys only"
        if values.get("KeyUsage") in _OTHER_KEY_USAGE:
            return f"asks for KeyUsage {values['KeyUsage']}: envfs keys only encrypt"
        if values.get("Origin") in _OTHER_ORIGIN:
            return f"asks for Origin {values['Origin']}: envfs makes its own key material"
        if values.get("MultiRegion") is True:
            return "asks for a multi-Region key: envfs keys are single-region"
    return None


def not_applicable(entry: dict[str, Any]) -> str | None:
    """Why a test is not applicable, from its source and the calls it made; None if it is."""
    reason = static_not_applicable(entry.get("static", {}))
    if reason is None:
        reason = _call_not_applicable(entry.get("calls", []))
    if reason is None and entry.get("outcome") in ("passed", "failed") and not entry["calls"]:
        reason = "tests moto's own code: it ran without a request to a KMS endpoint"
    return reason


@dataclass(frozen=True)
class Explanation:
    name: str  # the reason's name in the table
    kind: str  # moto-quirk | not-copied | envfs-bug
    why: str
    # The failure depends on timing (e.g. two calls within one second): the test may also
    # pass, and either outcome agrees with the table.
    flaky: bool = False


KINDS = {
    "moto-quirk": "moto quirk",
    "not-copied": "AWS behaviour envfs chose not to copy",
    "envfs-bug": "envfs bug (not fixed here)",
}


def load_explanations(path: Path = EXPLAINED) -> dict[str, Explanation]:
    """Test id (``file.py::name`` or ``file.py::name[params]``) -> its explanation."""
    data = tomllib.loads(path.read_text())
    reasons = {
        name: Explanation(name, r["kind"], " ".join(r["why"].split()), bool(r.get("flaky")))
        for name, r in data["reasons"].items()
    }
    for name, r in reasons.items():
        if r.kind not in KINDS:
            raise ValueError(f"{path}: reason {name!r} has unknown kind {r.kind!r}")
    out = {}
    for test, reason in data["tests"].items():
        if reason not in reasons:
            raise ValueError(f"{path}: test {test!r} names unknown reason {reason!r}")
        out[test] = reasons[reason]
    return out


def short_id(nodeid: str) -> str:
    """``tests/test_kms/test_kms.py::test_x[a]`` -> ``test_kms.py::test_x[a]``."""
    return nodeid.removeprefix(TESTS + "/")


def explanation_for(nodeid: str, table: dict[str, Explanation]) -> tuple[str, Explanation] | None:
    """The table's entry for a test: by its full id, else by its name without parameters,
    else by its class (``file.py::Class``)."""
    test = short_id(nodeid)
    key = test.split("[", 1)[0]
    for candidate in (test, key):
        if candidate in table:
            return candidate, table[candidate]
    while "::" in key:
        key = key.rsplit("::", 1)[0]
        if key in table and "::" in key:
            return key, table[key]
    return None


def classify(tests: dict[str, dict[str, Any]], table: dict[str, Explanation]) -> dict[str, Any]:
    """The summary of a run: counts, and each test's category and explanation."""
    rows: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    explained_passing = []  # explained, yet passed: the table (and the doc) would lie
    for nodeid, entry in sorted(tests.items()):
        test = short_id(nodeid)
        reason = not_applicable(entry)
        outcome = entry.get("outcome") or "not run"
        row: dict[str, Any] = {"outcome": outcome, "message": entry.get("message", "")}
        row["reason"] = reason
        rows[test] = row
        if reason is not None:
            row["category"] = "not applicable"
            continue
        found = explanation_for(test, table)
        if found is not None:
            used.add(found[0])
            explanation = found[1]
            row.update(
                explanation=explanation.name,
                kind=explanation.kind,
                why=explanation.why,
                flaky=explanation.flaky,
            )
        if outcome == "skipped":  # by moto's test itself (none is, in server mode)
            row["category"] = "skipped"
            continue
        if outcome == "passed":
            row["category"] = "passed"
            if found is not None and not found[1].flaky:
                explained_passing.append(test)
            continue
        row["category"] = "unexplained failure" if found is None else "explained failure"
        failed = [c for c in entry.get("calls", []) if c.get("error")]
        if failed:
            row["failed_call"] = f"{failed[0]['operation']}: {failed[0]['error']}"

    def count(test: Any) -> int:
        return sum(1 for row in rows.values() if test(row))

    counts = {"total": len(rows), "not_applicable": count(lambda r: r["reason"] is not None)}
    counts["applicable"] = counts["total"] - counts["not_applicable"]
    # Deterministic counts: a timing-dependent test counts as such, whatever this run gave.
    counts["passed"] = count(lambda r: r["category"] == "passed" and not r.get("flaky"))
    counts["timing_dependent"] = count(lambda r: bool(r.get("flaky")))
    counts["explained"] = count(
        lambda r: r["category"] == "explained failure" and not r.get("flaky")
    )
    counts["unexplained"] = count(lambda r: r["category"] == "unexplained failure")
    counts["skipped"] = count(lambda r: r["category"] == "skipped")
    # This run's.
    counts["passed_this_run"] = count(lambda r: r["category"] == "passed")
    counts["timing_dependent_failed"] = count(
        lambda r: r.get("flaky") and r["category"] != "passed"
    )
    applicable = counts["applicable"] or 1
    rate = counts["passed"] / applicable
    rate_with_timing = (counts["passed"] + counts["timing_dependent"]) / applicable
    return {
        "counts": counts,
        "pass_rate": round(rate, 4),
        "pass_rate_with_timing_dependent": round(rate_with_timing, 4),
        "unused_explanations": sorted(set(table) - used),
        "explained_but_passing": explained_passing,
        "tests": rows,
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the markdown of docs/moto-kms-suite.md's results."""
    c = summary["counts"]
    lines = [
        f"moto {summary.get('moto_version', '?')}, `{TESTS}` ({summary.get('duration_s', '?')} s):",
        "",
        "| tests | count |",
        "|---|---:|",
        f"| total | {c['total']} |",
        f"| not applicable | {c['not_applicable']} |",
        f"| applicable | {c['applicable']} |",
        f"| passed | {c['passed']} |",
        f"| timing-dependent | {c['timing_dependent']} |",
        f"| failed, explained | {c['explained']} |",
        f"| failed, unexplained | {c['unexplained']} |",
        f"| skipped by the test itself | {c['skipped']} |",
        "",
        f"Pass rate among applicable tests: **{c['passed']}/{c['applicable']}"
        f" = {100 * summary['pass_rate']:.1f} %**."
        + (
            f" With the timing-dependent tests, which may pass,"
            f" {c['passed'] + c['timing_dependent']}/{c['applicable']}"
            f" = {100 * summary['pass_rate_with_timing_dependent']:.1f} %"
            f" (this run: {c['timing_dependent_failed']} of them failed)."
            if c["timing_dependent"]
            else ""
        ),
        "",
        "| applicable test | why (below) | outcome |",
        "|---|---|---|",
    ]
    reasons: dict[str, tuple[str, str, int]] = {}
    for test, row in summary["tests"].items():
        if row["category"] in ("explained failure", "unexplained failure") or row.get("flaky"):
            name = row.get("explanation", "**unexplained**")
            outcome = "fails or passes (timing)" if row.get("flaky") else "fails"
            lines.append(f"| `{_cell(test)}` | {name} | {outcome} |")
            if "explanation" in row:
                _, _, n = reasons.get(name, ("", "", 0))
                reasons[name] = (KINDS[row["kind"]], row["why"], n + 1)
            else:
                lines[-1] = lines[-1][:-2] + f": {_cell(row['message'])} |"
    lines.append("")
    for name, (kind, why, n) in sorted(reasons.items(), key=lambda kv: (kv[1][0], kv[0])):
        lines.append(f"- **{name}** ({kind}; {n} test{'s' if n > 1 else ''}): {why}")
    na: dict[str, int] = {}
    for row in summary["tests"].values():
        if row["category"] == "not applicable":
            na[row["reason"]] = na.get(row["reason"], 0) + 1
    lines += ["", "| not applicable because the test … | tests |", "|---|---:|"]
    for reason, n in sorted(na.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {_cell(reason)} | {n} |")
    return "\n".join(lines) + "\n"


# --- key services --------------------------------------------------------------------------


def _envfs_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVFS_", "AWS_"))}
    env.pop("CREDENTIALS_DIRECTORY", None)
    return env


def _run_envfs(envfs: str, *args: str) -> str:
    result = subprocess.run(
        [envfs, *args], env=_envfs_env(), capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"envfs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


@dataclass
class Template:
    """A region's empty key store with the suite's access key, copied for every test."""

    region: str
    kms_dir: Path
    access_key_id: str
    secret: str

    @classmethod
    def make(cls, envfs: str, region: str, kms_dir: Path, user: str) -> Template:
        store = ("--kms-dir", str(kms_dir), "--region", region)
        # The user's own group as the key creators group: a user other than root may then
        # create keys in the suite's stores too (root always may).
        group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
        _run_envfs(envfs, "kms", "init", *store, "--key-creators-group", group)
        out = _run_envfs(
            envfs, "kms", "create-access-key", "--user", user, "--embedded", *store,
            "--output", "json",
        )  # fmt: skip
        key = json.loads(out)["AccessKey"]
        return cls(region, kms_dir, key["AccessKeyId"], key["SecretAccessKey"])


# What ``envfs kms serve`` logs once its HTTP endpoint listens (on the port it picked).
_LISTENING = re.compile(r"HTTP endpoint listening on http://127\.0\.0\.1:(\d+)")


class KeyService:
    """``envfs kms serve --listen-http`` on a fresh copy of a region's template.

    It listens on a port of its own choosing (``127.0.0.1:0``), read from its log: a port
    chosen here and bound there later could be taken in between by anything else.
    """

    def __init__(self, envfs: str, template: Template, work: Path) -> None:
        self.region = template.region
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.region}-", dir=work))
        shutil.copytree(template.kms_dir / self.region, self.dir / self.region)
        self.log = self.dir / "serve.log"
        self.port = 0
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    envfs, "kms", "serve", "--kms-dir", str(self.dir), "--region", self.region,
                    "--socket", str(self.dir / "kms.sock"), "--listen-http", "127.0.0.1:0",
                ],
                env=_envfs_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._stopped = False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.port:
            found = _LISTENING.search(self.log.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"envfs kms serve ({self.region}) exited {self.process.returncode}:"
                    f" {self.log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"envfs kms serve ({self.region}) did not listen in time")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Region:
    """A region's key service and its spares; a reset retires the service if it was used.

    ``spares`` fresh services wait, started, behind the current one, so that a reset
    rarely waits for one to start (each takes about half a second).
    """

    def __init__(self, envfs: str, template: Template, work: Path, spares: int) -> None:
        self.envfs, self.template, self.work = envfs, template, work
        self.lock = threading.Lock()
        # They start while moto's tests load.
        self.queue = collections.deque(KeyService(envfs, template, work) for _ in range(1 + spares))
        self.used = False
        self.retired: list[KeyService] = []

    def service(self) -> KeyService:
        with self.lock:
            self.used = True
            self.queue[0].wait_ready()
            return self.queue[0]

    def reset(self) -> None:
        with self.lock:
            if not self.used:
                return
            old, self.used = self.queue.popleft(), False
            self.queue.append(KeyService(self.envfs, self.template, self.work))
            self.retired.append(old)
        threading.Thread(target=old.stop, daemon=True).start()

    def close(self) -> None:
        with self.lock:
            services = [*self.retired, *self.queue]
        for service in services:
            service.stop()


# --- the router ----------------------------------------------------------------------------

_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/]+)/")
_HOP = {"connection", "keep-alive", "transfer-encoding"}


class Router(http.server.ThreadingHTTPServer):
    """moto's server address: resets, and every other request to its region's key service."""

    daemon_threads = True

    def __init__(self, regions: dict[str, Region], default: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.regions, self.default = regions, default
        self.resets = 0
        self.errors: list[str] = []  # the harness's own failures, for the summary

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # One line, not a traceback: a client gone (the suite stopping) is no news.
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            print(f"moto-kms-suite: router: {error!r}", file=sys.stderr)
            self.errors.append(repr(error)[:2000])


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Router
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(
        self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in headers or []:
            if name.lower() not in _HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/moto-api/"):
            if self.path == "/moto-api/reset":
                for region in self.server.regions.values():
                    region.reset()
                self.server.resets += 1
                self._answer(200, b'{"status": "ok"}')
            else:
                self._answer(404, b"the harness answers only /moto-api/reset")
            return
        # The region a request is signed for picks the key service; a request signed for
        # no region the suite serves goes to the default one, whose answer (a signature
        # error) is envfs's own.
        match = _SCOPE.search(self.headers.get("Authorization", ""))
        name = match.group(1) if match else self.server.default
        target = self.server.regions.get(name) or self.server.regions[self.server.default]
        try:
            status, data, headers = self._relay(target, body)
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            # The harness's own failure, told as such (502), not as envfs's answer.
            print(f"moto-kms-suite: router: {exc}", file=sys.stderr)
            self.server.errors.append(f"{exc}"[:2000])
            error = {"__type": "MotoKmsSuiteRouterError", "message": str(exc)}
            status, data, headers = 502, json.dumps(error).encode(), []
        self._answer(status, data, headers)

    def _relay(self, target: Region, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        service = target.service()
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP:
                    conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.read(), response.getheaders()
        finally:
            conn.close()


# --- the run -------------------------------------------------------------------------------


def get_sdist(work: Path, sdist: Path | None, version: str, python: str) -> Path:
    """moto's unpacked source release; its root holds ``tests/test_kms``."""
    if sdist is None:
        subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             "--dest", str(work), f"moto=={version}"],
            check=True, timeout=300,
        )  # fmt: skip
        sdist = work / f"moto-{version}.tar.gz"
    dest = work / "sdist"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():  # no tarfile filters before Python 3.11.4
            target = (dest / member.name).resolve()
            if not target.is_relative_to(dest.resolve()) or not (member.isfile() or member.isdir()):
                raise RuntimeError(f"{sdist}: refusing member {member.name!r}")
        tar.extractall(dest)  # noqa: S202 (members checked above)
    (root,) = (work / "sdist").iterdir()
    if not (root / TESTS).is_dir():
        raise RuntimeError(f"{sdist} has no {TESTS}")
    return root


_REGION = re.compile(r"[\"']((?:us|eu|ap|sa|ca|me|af|il)-[a-z]+-\d)[\"']")


def regions_named(tests: Path) -> list[str]:
    """The AWS regions moto's KMS tests name (each gets a key service)."""
    found: set[str] = set()
    for path in tests.glob("*.py"):
        found |= set(_REGION.findall(path.read_text()))
    return sorted(found)


@contextlib.contextmanager
def key_services(
    envfs: str, regions: list[str], work: Path, user: str, spares: int
) -> Iterator[tuple[Router, dict[str, Template]]]:
    with concurrent.futures.ThreadPoolExecutor() as pool:
        made = pool.map(lambda r: Template.make(envfs, r, work / "templates", user), regions)
        templates = dict(zip(regions, made, strict=True))
    served: dict[str, Region] = {}
    router: Router | None = None
    try:
        for r in regions:
            served[r] = Region(envfs, templates[r], work, spares)
        default = "us-east-1" if "us-east-1" in served else regions[0]
        router = Router(served, default)
        thread = threading.Thread(target=router.serve_forever, daemon=True)
        thread.start()
        yield router, templates
    finally:
        if router is not None:
            router.shutdown()
            router.server_close()
        for region in served.values():
            region.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    version = args.moto_version or importlib.metadata.version("moto")
    work = Path(tempfile.mkdtemp(prefix="moto-kms-suite-"))
    try:
        root = get_sdist(work, args.moto_sdist, version, args.python)
        regions = regions_named(root / TESTS)
        report = work / "report.json"
        started = time.monotonic()
        with key_services(args.envfs, regions, work, args.user, args.spares) as (
            router,
            templates,
        ):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
            env.update(
                TEST_SERVER_MODE="true",
                TEST_SERVER_MODE_ENDPOINT=router.url,
                MOTO_KMS_SUITE_CREDENTIALS=json.dumps(
                    {r: [t.access_key_id, t.secret] for r, t in templates.items()}
                ),
                MOTO_KMS_SUITE_REPORT=str(report),
                MOTO_KMS_SUITE_SKIP="0" if args.run_all else "1",
                PYTHONPATH=os.pathsep.join([str(HERE), str(root)]),
                AWS_CONFIG_FILE=os.devnull,
                AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            )
            command = [
                args.python, "-m", "pytest", TESTS, "-p", "moto_kms_suite_plugin",
                "-p", "no:cacheprovider", "-p", "no:trio", "-o", "addopts=", "-q",
                "--color=no", "-rN", *args.pytest_args,
            ]  # fmt: skip
            log = work / "pytest.log"
            with log.open("wb") as out:
                result = subprocess.run(
                    command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                    timeout=args.timeout, check=False,
                )  # fmt: skip
            if result.returncode not in (0, 1) or not report.exists():
                raise RuntimeError(
                    f"moto's tests did not run (pytest exited {result.returncode}):\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            resets, router_errors = router.resets, list(router.errors)
        summary = classify(json.loads(report.read_text()), load_explanations(args.explained))
        summary.update(
            moto_version=version,
            regions=regions,
            resets=resets,
            router_errors=router_errors,
            duration_s=round(time.monotonic() - started, 1),
        )
        return summary
    finally:
        if args.keep:
            print(f"moto-kms-suite: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moto-kms-suite",
        description="Run moto's own KMS tests (from moto's source release) against envfs's"
        " AWS endpoint, one envfs key service per region, and classify every test:"
        " not applicable, passed, or an explained failure. See docs/moto-kms-suite.md.",
    )
    parser.add_argument("--moto-sdist", type=Path, help="moto's sdist (default: download it)")
    parser.add_argument(
        "--moto-version", help="the moto release to download (default: the installed moto's)"
    )
    venv = REPO / ".venv" / "bin"
    parser.add_argument(
        "--envfs",
        default=str(venv / "envfs") if (venv / "envfs").exists() else "envfs",
        help="the envfs command (default: the repository's .venv/bin/envfs)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs moto's tests (needs moto, boto3, pytest, freezegun)",
    )
    parser.add_argument(
        "--user", default=None, help="the Unix user whose access key signs (default: you)"
    )
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the summary as markdown here")
    parser.add_argument(
        "--explained", type=Path, default=EXPLAINED, help="the table of explained failures"
    )
    parser.add_argument(
        "--run-all",
        action="store_true",
        help="also run the tests that their source shows to be not applicable",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if an applicable test fails unexplained, or an explained one passes",
    )
    parser.add_argument(
        "--spares",
        type=int,
        default=2,
        help="fresh key services kept started per region, for the resets (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for moto's tests")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "pytest_args", nargs="*", help="more arguments for pytest (after --), e.g. -k NAME"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the key services are stopped, the folder removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.user is None:
        args.user = pwd.getpwuid(os.geteuid()).pw_name
    try:
        summary = run(args)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"moto-kms-suite: error: {exc}", file=sys.stderr)
        return 1
    text = markdown(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    print(text, end="")
    bad = summary["counts"]["unexplained"] or summary["explained_but_passing"]
    if args.check and bad:
        for test, row in summary["tests"].items():
            if row["category"] == "unexplained failure":
                print(f"moto-kms-suite: unexplained: {test}: {row['message']}", file=sys.stderr)
        for test in summary["explained_but_passing"]:
            print(f"moto-kms-suite: explained but passes: {test}", file=sys.stderr)
        return 1
    return 0
