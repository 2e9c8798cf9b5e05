"""``--query`` is JMESPath: the CLI's answer is the ``jmespath`` library's, on real outputs.

Each case runs a real ``envfs kms`` command on an embedded store in tmp_path, once without
``--query`` (its JSON output) and once with ``--query X``, and checks that the second is
exactly ``jmespath.search(X, first)``. Commands whose answers change from call to call
(``generate-data-key``, ``encrypt``, ``audit``, which records its own listing) are run
for real once; the ``--query`` run then gets the same answer from a recording of that
call, through the real CLI code from argument parsing to printing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
import pytest

import envfs.cli.kms as cli_kms
from tests.integration.test_cli import ENVFS, cli, cli_env, envfs, ok

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating keys needs root")


@dataclass
class Setup:
    env: dict[str, str]
    key_id: str
    other_key_id: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    env = cli_env(tmp_path_factory.mktemp("kms"))
    ok(env, "kms", "init")

    def new_key(*args: str) -> str:
        return str(json.loads(ok(env, "kms", "create-key", *args, "--query", "KeyMetadata.KeyId")))

    key_id = new_key("--description", "app data", "--tags", "TagKey=team,TagValue=hr")
    other = new_key("--description", "archive", "--tags", "TagKey=env,TagValue=prod")
    for alias, target in (("alias/app", key_id), ("alias/app-old", key_id), ("alias/zeta", other)):
        ok(env, "kms", "create-alias", "--alias-name", alias, "--target-key-id", target)
    ok(env, "kms", "tag-resource", "--key-id", key_id, "--tags", "TagKey=cost,TagValue=42")
    ok(env, "kms", "encrypt", "--key-id", "alias/app", "--plaintext", "aGk=")
    ok(env, "kms", "disable-key", "--key-id", other)
    return Setup(env, key_id, other)


class _Replay:
    """A backend answering with recorded answers, in the order they were recorded."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self._answers = list(answers)

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return self._answers.pop(0)

    def close(self) -> None:
        pass


class _Recording:
    def __init__(self, backend: cli_kms.Backend, answers: list[dict[str, Any]]) -> None:
        self._backend = backend
        self._answers = answers

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        answer = self._backend.call(operation, params)
        self._answers.append(answer)
        return answer

    def close(self) -> None:
        self._backend.close()


def recorded(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> Any:
    """Run ``envfs ARGS`` for real; answer every later run with what this run got."""
    answers: list[dict[str, Any]] = []
    real_open = cli_kms.open_backend

    @contextlib.contextmanager
    def open_recording(namespace: Any) -> Iterator[cli_kms.Backend]:
        with real_open(namespace) as backend:
            yield _Recording(backend, answers)

    monkeypatch.setattr(cli_kms, "open_backend", open_recording)
    output = json.loads(ok(env, *args))

    @contextlib.contextmanager
    def open_replay(namespace: Any) -> Iterator[cli_kms.Backend]:
        yield _Replay(answers)

    monkeypatch.setattr(cli_kms, "open_backend", open_replay)
    return output


LIST_KEYS = ("kms", "list-keys")
DESCRIBE = ("kms", "describe-key", "--key-id", "alias/app")
ALIASES = ("kms", "list-aliases")
POLICY = ("kms", "get-key-policy", "--key-id", "alias/app")
TAGS = ("kms", "list-resource-tags", "--key-id", "alias/app")
AUDIT = ("kms", "audit")
DATA_KEY = ("kms", "generate-data-key", "--key-id", "alias/app", "--key-spec", "AES_256")
ENCRYPT = ("kms", "encrypt", "--key-id", "alias/app", "--plaintext", "c2VjcmV0")
CHANGING = {AUDIT, DATA_KEY, ENCRYPT}

CASES: list[tuple[tuple[str, ...], str]] = [
    # projections, indexes, slices
    (LIST_KEYS, "Keys[*].KeyId"),
    (LIST_KEYS, "Keys[0]"),
    (LIST_KEYS, "Keys[-1].KeyArn"),
    (LIST_KEYS, "Keys[:1]"),
    (LIST_KEYS, "Keys[::-1].KeyId"),
    (LIST_KEYS, "Keys[*].[KeyId, KeyArn]"),
    (LIST_KEYS, "Keys[*].{id: KeyId, arn: KeyArn}"),
    (LIST_KEYS, "{count: length(Keys), first: Keys[0].KeyId, more: Truncated}"),
    (LIST_KEYS, "Keys | [0].KeyId"),
    (LIST_KEYS, "sort_by(Keys, &KeyId)[*].KeyId"),
    (LIST_KEYS, "max_by(Keys, &KeyId).KeyId"),
    (LIST_KEYS, "Keys[?starts_with(KeyArn, 'arn:envfs:kms:local-1:')].KeyId"),
    (LIST_KEYS, "Truncated || `true`"),
    (LIST_KEYS, "to_string(length(Keys))"),
    # objects, comparisons, literals
    (DESCRIBE, "KeyMetadata.KeyState"),
    (DESCRIBE, "keys(KeyMetadata) | sort(@)"),
    (DESCRIBE, "KeyMetadata.[KeyId, Enabled, Description, Missing]"),
    (DESCRIBE, "KeyMetadata.EncryptionAlgorithms[0]"),
    (DESCRIBE, "contains(KeyMetadata.EncryptionAlgorithms, 'SYMMETRIC_DEFAULT')"),
    (DESCRIBE, "KeyMetadata.Enabled && KeyMetadata.KeyState == 'Enabled'"),
    (DESCRIBE, "!KeyMetadata.Enabled"),
    (DESCRIBE, "KeyMetadata.CreationDate"),
    (DESCRIBE, "KeyMetadata.* | length(@)"),
    (DESCRIBE, '"KeyMetadata"."KeyId"'),
    (DESCRIBE, "KeyMetadata.Missing"),
    (DESCRIBE, '`{"fixed": [1, 2]}`'),
    (DESCRIBE, "merge(KeyMetadata, {Description: 'changed'}).Description"),
    (DESCRIBE, "values(@)[0].KeyUsage"),
    # filters, functions
    (ALIASES, "Aliases[?contains(AliasName, 'app')].AliasName"),
    (ALIASES, "Aliases[?AliasName == 'alias/zeta'] | [0].TargetKeyId"),
    (ALIASES, "Aliases[?TargetKeyId != null] | length(@)"),
    (ALIASES, "join(', ', Aliases[*].AliasName)"),
    (ALIASES, "Aliases[].AliasName | sort(@) | reverse(@)"),
    (ALIASES, "map(&AliasName, Aliases)"),
    (ALIASES, "min_by(Aliases, &AliasName).AliasName"),
    (ALIASES, "Aliases[?ends_with(AliasName, '-old') || AliasName == 'alias/zeta'].AliasName"),
    (POLICY, "PolicyName"),
    (POLICY, "length(Policy) > `100`"),
    (POLICY, "[PolicyName, type(Policy), type(@)]"),
    (TAGS, "Tags[?TagKey == 'team'].TagValue | [0]"),
    (TAGS, "sort(Tags[*].TagKey)"),
    (TAGS, "Tags[?to_number(TagValue) > `40`].TagKey"),
    # nested projections: JMESPath flattens where the old subset nested
    (AUDIT, "Records[*].request.Tags[].TagKey"),
    (AUDIT, "Records[*].request.Tags[]"),
    (AUDIT, "Records[*].request.Tags[].{k: TagKey, v: TagValue}"),
    (AUDIT, "Records[?operation == 'CreateKey'] | length(@)"),
    (AUDIT, "Records[?request.AliasName].request.AliasName"),
    (AUDIT, "Records[-3:].operation"),
    (AUDIT, "sort_by(Records, &seq)[-1].seq"),
    (AUDIT, "[sum(Records[*].seq), max(Records[*].seq), avg(Records[*].seq)]"),
    (AUDIT, "Records[*].[seq, caller.user, operation, outcome]"),
    (AUDIT, "Records[0].caller | keys(@)"),
    (DATA_KEY, "keys(@) | sort(@)"),
    (DATA_KEY, "[KeyId, length(CiphertextBlob) > `0`]"),
    (DATA_KEY, "not_null(Missing, KeyId)"),
    (ENCRYPT, "CiphertextBlob"),
    (ENCRYPT, "{key: KeyId, algorithm: EncryptionAlgorithm}"),
    (ENCRYPT, "[abs(`-3`), ceil(`1.5`), floor(`1.5`), to_array(KeyId)[0] == KeyId]"),
]


def printed(expected: Any) -> str:
    """What the CLI's JSON output is for ``expected`` (an empty object prints nothing)."""
    return "" if expected == {} else json.dumps(expected, indent=4, ensure_ascii=False) + "\n"


@pytest.mark.parametrize(("command", "expression"), CASES, ids=[e for _, e in CASES])
def test_query_answers_as_the_jmespath_library(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], expression: str
) -> None:
    if command in CHANGING:
        answer = recorded(monkeypatch, setup.env, *command)
    else:
        answer = json.loads(ok(setup.env, *command))
    expected = jmespath.search(expression, answer)
    assert ok(setup.env, *command, "--query", expression) == printed(expected)


def test_the_cases_cover_the_language(setup: Setup) -> None:
    """The table uses every JMESPath construct it claims to, and gives real answers."""
    parsed = [jmespath.compile(e).parsed for _, e in CASES]
    kinds: set[str] = set()
    functions: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        kinds.add(node["type"])
        if node["type"] == "function_expression":
            functions.add(node["value"])
        for child in node.get("children", []):
            if isinstance(child, dict):
                walk(child)

    for tree in parsed:
        walk(tree)
    assert {
        "filter_projection", "projection", "flatten", "slice", "index", "pipe",
        "multi_select_list", "multi_select_dict", "literal", "comparator", "or_expression",
        "and_expression", "not_expression", "value_projection", "current", "expref",
    } <= kinds  # fmt: skip
    assert {"length", "sort_by", "contains", "starts_with", "keys", "join", "to_string"} <= (
        functions
    )
    assert len(CASES) >= 25
    # The example flattens: one list of tag keys, not a list per record.
    answer = json.loads(ok(setup.env, *AUDIT))
    assert jmespath.search("Records[*].request.Tags[].TagKey", answer)[:2] == ["team", "env"]


def test_query_through_the_executable(setup: Setup) -> None:
    answer = json.loads(envfs(setup.env, *ALIASES).stdout)
    expression = f"Aliases[?TargetKeyId == '{setup.key_id}'].AliasName | sort(@)"
    proc = envfs(setup.env, *ALIASES, "--query", expression)
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads(proc.stdout)
        == jmespath.search(expression, answer)
        == [
            "alias/app",
            "alias/app-old",
        ]
    )
    proc = envfs(setup.env, *ALIASES, "--output", "text", "--query", expression)
    assert proc.stdout == "alias/app\talias/app-old\n"


def test_query_errors_of_the_executable(setup: Setup) -> None:
    proc = envfs(setup.env, *LIST_KEYS, "--query", "Keys[?KeyId == 'x'")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "envfs: error: argument --query: the expression \"Keys[?KeyId == 'x'\" is incomplete\n"
        "envfs: hint: see 'envfs kms list-keys --help'\n"
    )
    # Refused before the call: no key is created for a misspelt function.
    before = json.loads(ok(setup.env, *LIST_KEYS, "--query", "length(Keys)"))
    proc = envfs(setup.env, "kms", "create-key", "--query", "lenght(KeyMetadata)")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("envfs: error: argument --query: unknown function lenght() ")
    assert json.loads(ok(setup.env, *LIST_KEYS, "--query", "length(Keys)")) == before
    # A function given the wrong type fails on the answer, after the call, quoting nothing
    # of the answer (here a data key).
    proc = envfs(setup.env, *DATA_KEY, "--query", "max_by(@, &KeyId)")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "envfs: error: argument --query: function max_by() was given an object, expected array"
        " (in 'max_by(@, &KeyId)')\n"
    )


def test_table_and_text_of_real_answers(setup: Setup) -> None:
    env = dict(setup.env, COLUMNS="200")
    proc = envfs(env, *DESCRIBE, "--output", "table", "--query", "KeyMetadata.[KeyId, KeyState]")
    assert proc.returncode == 0, proc.stderr
    # A key id has 36 characters: a column of 40, borders included 42.
    assert proc.stdout == (
        f"{'-' * 42}\n"
        f"|{' ' * 15}DescribeKey{' ' * 14}|\n"
        f"+{'-' * 40}+\n"
        f"|  {setup.key_id}  |\n"
        f"|  Enabled{' ' * 31}|\n"
        f"+{'-' * 40}+\n"
    )
    # Every line of a full table is as wide as the first, and titles come from the verbs.
    titles = ((DESCRIBE, "DescribeKey"), (ALIASES, "ListAliases"), (AUDIT, "ListAuditRecords"))
    for args, title in titles:
        proc = envfs(env, *args, "--output", "table")
        lines = proc.stdout.splitlines()
        assert proc.returncode == 0 and lines[1].strip("| ") == title, proc.stdout
        assert {len(line) for line in lines} == {len(lines[0])}, proc.stdout
    zeta = "Aliases[?AliasName == 'alias/zeta'].[AliasName, TargetKeyId]"
    text = ok(setup.env, *ALIASES, "--output", "text", "--query", zeta)
    assert text == f"alias/zeta\t{setup.other_key_id}\n"
    assert ok(setup.env, *DESCRIBE, "--output", "table", "--query", "KeyMetadata.Missing") == (
        "-------------\n|DescribeKey|\n+-----------+\n|  None     |\n+-----------+\n"
    )
    assert (
        cli(setup.env, *ALIASES, "--output", "table", "--query", "Aliases[?`false`]").stdout == ""
    )
    assert ENVFS.exists()
