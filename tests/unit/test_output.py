"""``envfs.cli.output`` and ``envfs.cli.table``: queries, and JSON, text and table layouts.

The text and table layouts are aws-cli v2's; every expected layout here was checked
against aws-cli's own renderer (colour off) on the same value, except the cases marked as
envfs's own (where aws-cli loses a value or stops with an error).
"""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest

from envfs.cli.output import QueryError, compile_query, printable, render
from envfs.cli.table import draw_table, text_width


def rendered(value: Any, output: str, query: str | None = None, width: int = 80) -> str:
    out = StringIO()
    compiled = None if query is None else compile_query(query)
    render(value, output=output, query=compiled, stream=out, title="Op", width=width)
    return out.getvalue()


# --- queries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("", "the expression is empty"),
        ("  ", "the expression is empty"),
        ("Keys[", "the expression 'Keys[' is incomplete"),
        ("Keys[?KeyId == 'a'", "the expression \"Keys[?KeyId == 'a'\" is incomplete"),
        ("A,B", "unexpected ',' at character 2 of 'A,B'"),
        ("Keys[*].]", "unexpected ']' at character 9 of 'Keys[*].]'"),
        ('a."b', "unclosed \" delimiter at character 3 of 'a.\"b'"),
        ("a = b", "unknown token '=' at character 3 of 'a = b'"),
        (
            "lenght(Keys)",
            "unknown function lenght() (JMESPath has abs, avg, ceil, contains,"
            " ends_with, floor, join, keys, length, map, max, max_by, merge, min, min_by,"
            " not_null, reverse, sort, sort_by, starts_with, sum, to_array, to_number,"
            " to_string, type, values)",
        ),
        ("length(Keys, Aliases)", "function length() takes 1 argument, got 2"),
        ("Keys[?contains(KeyId)]", "function contains() takes 2 arguments, got 1"),
        ("merge()", "function merge() takes at least 1 argument, got 0"),
        (
            '"foo"(@)',
            "quoted identifier not allowed for function names at character 1 of '\"foo\"(@)'",
        ),
        (
            "&KeyId",
            "an expression reference (&...) is only an argument of map(), max_by(),"
            " min_by() or sort_by(), in '&KeyId'",
        ),
        (
            "to_array(&KeyId)",
            "an expression reference (&...) is only an argument of map(),"
            " max_by(), min_by() or sort_by(), in 'to_array(&KeyId)'",
        ),
        (
            "sort_by(Keys[*].Tags[?length(@) > `0`] | [0], &not_null())",
            "function not_null() takes at least 1 argument, got 0",
        ),
    ],
)
def test_query_that_does_not_compile(expression: str, reason: str) -> None:
    with pytest.raises(QueryError) as caught:
        compile_query(expression)
    assert caught.value.reason == reason
    assert caught.value.message == f"argument --query: {reason}"
    assert caught.value.exit_code == 2


def test_query_failing_on_the_answer_never_shows_it() -> None:
    secret = {"Plaintext": "c2VjcmV0IGtleSBtYXRlcmlhbA==", "KeyId": "k"}
    query = compile_query("max_by(@, &KeyId)")
    with pytest.raises(
        QueryError,
        match=r"^argument --query: function max_by\(\) was given an object, expected array"
        r" \(in 'max_by\(@, &KeyId\)'\)$",
    ) as caught:
        query.search(secret)
    assert "c2Vj" not in str(caught.value)
    with pytest.raises(
        QueryError,
        match=r"^argument --query: function length\(\) was given a number, expected string,"
        r" array, object \(in 'length\(`1`\)'\)$",
    ):
        compile_query("length(`1`)").search({})
    # Nothing is printed when the query fails.
    out = StringIO()
    with pytest.raises(QueryError):
        render(secret, output="json", query=query, stream=out, title="Decrypt")
    assert out.getvalue() == ""


def test_a_backtick_string_is_read_as_aws_cli_reads_it() -> None:
    # jmespath warns that `foo` (not JSON) is deprecated; the test suite turns warnings
    # into errors, so this also checks that the warning does not reach the user.
    assert compile_query("[?@ == `alias/a`]").search(["alias/a", "alias/b"]) == ["alias/a"]


def test_query_runs_on_the_printable_answer() -> None:
    answer = {"CiphertextBlob": b"\x00\x01", "KeyMetadata": {"CreationDate": 0.0}}
    assert rendered(answer, "text", "CiphertextBlob") == "AAE=\n"
    assert rendered(answer, "json", "KeyMetadata.CreationDate") == ('"1970-01-01T00:00:00+00:00"\n')
    assert rendered(answer, "json", "starts_with(KeyMetadata.CreationDate, '1970')") == "true\n"


# --- JSON and text -------------------------------------------------------------------------


def test_printable() -> None:
    shown = printable(
        {
            "Blob": bytearray(b"\xff"),
            "DeletionDate": 86400,
            "Records": [{"time": 1.5}],
            "Enabled": True,
        }
    )
    assert shown == {
        "Blob": "/w==",
        "DeletionDate": "1970-01-02T00:00:00+00:00",
        "Records": [{"time": "1970-01-01T00:00:01.500000+00:00"}],
        "Enabled": True,
    }


def test_json_layout() -> None:
    assert (
        rendered({"A": "é", "B": [1]}, "json")
        == '{\n    "A": "é",\n    "B": [\n        1\n    ]\n}\n'
    )
    # An empty object prints nothing, with a query too (aws-cli); other empties print.
    assert rendered({}, "json") == ""
    assert rendered({"A": {}}, "json", "A") == ""
    assert rendered({"A": []}, "json", "A") == "[]\n"
    assert rendered({"A": 1}, "json", "Missing") == "null\n"


KEYS = [{"KeyId": "k1", "Enabled": True}, {"KeyId": "k2"}]
TAGGED_KEYS = [{"KeyId": "k1", "Tags": ["a", "b"]}, {"KeyId": "k2"}]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (
            {"Blob": b"\x00\x01", "CreationDate": 0.0, "Keys": KEYS, "Ids": ["a", "b"], "T": False},
            "AAE=\t1970-01-01T00:00:00+00:00\tFalse\nIDS\ta\nIDS\tb\nKEYS\tTrue\tk1\nKEYS\t\tk2\n",
        ),
        (
            {"Keys": TAGGED_KEYS, "Truncated": True, "N": None},
            "None\tTrue\nKEYS\tk1\nTAGS\ta\nTAGS\tb\nKEYS\tk2\n",
        ),
        # A key scalar in one map of a list and nested in another prints as it is.
        (
            {"Records": [{"seq": 1, "x": {"b": 2}}, {"seq": 2, "x": 3}]},
            "RECORDS\t1\t{'b': 2}\nRECORDS\t2\t3\n",
        ),
        ([["a", "b"], "c", ["d"]], "c\na\tb\nd\n"),
        ([[1, [2, 3]]], "1\n2\t3\n"),
        (["a", "b"], "a\tb\n"),
        (None, "None\n"),
        ("s", "s\n"),
        ({}, ""),
        ([], ""),
    ],
)
def test_text_layout(value: Any, text: str) -> None:
    assert rendered(value, "text") == text


# --- tables --------------------------------------------------------------------------------

DESCRIBE = {
    "KeyMetadata": {
        "KeyId": "1234abcd",
        "Enabled": True,
        "KeyState": "Enabled",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
    }
}


def test_table_of_nested_maps() -> None:
    assert draw_table("DescribeKey", DESCRIBE, 80) == (
        "---------------------------------------\n"
        "|             DescribeKey             |\n"
        "+-------------------------------------+\n"
        "||            KeyMetadata            ||\n"
        "|+---------+------------+------------+|\n"
        "|| Enabled |   KeyId    | KeyState   ||\n"
        "|+---------+------------+------------+|\n"
        "||  True   |  1234abcd  |  Enabled   ||\n"
        "|+---------+------------+------------+|\n"
        "|||      EncryptionAlgorithms       |||\n"
        "||+---------------------------------+||\n"
        "|||  SYMMETRIC_DEFAULT              |||\n"
        "||+---------------------------------+||\n"
    )


def test_table_wider_than_the_terminal_turns_one_row_sections() -> None:
    assert draw_table("DescribeKey", DESCRIBE, 30) == (
        "----------------------------\n"
        "|        DescribeKey       |\n"
        "+--------------------------+\n"
        "||       KeyMetadata      ||\n"
        "|+-----------+------------+|\n"
        "||  Enabled  |  True      ||\n"
        "||  KeyId    |  1234abcd  ||\n"
        "||  KeyState |  Enabled   ||\n"
        "|+-----------+------------+|\n"
        "||| EncryptionAlgorithms |||\n"
        "||+----------------------+||\n"
        "|||  SYMMETRIC_DEFAULT   |||\n"
        "||+----------------------+||\n"
    )


def test_table_of_a_list_of_maps_and_a_single_scalar() -> None:
    answer = {
        "Aliases": [
            {"AliasName": "alias/app", "TargetKeyId": "1234abcd"},
            {"AliasName": "alias/x", "TargetKeyId": "5678"},
        ],
        "Truncated": False,
    }
    assert draw_table("ListAliases", answer, 80) == (
        "--------------------------------\n"
        "|          ListAliases         |\n"
        "+-----------------+------------+\n"
        "|  Truncated      |  False     |\n"
        "+-----------------+------------+\n"
        "||           Aliases          ||\n"
        "|+------------+---------------+|\n"
        "||  AliasName |  TargetKeyId  ||\n"
        "|+------------+---------------+|\n"
        "||  alias/app |  1234abcd     ||\n"
        "||  alias/x   |  5678         ||\n"
        "|+------------+---------------+|\n"
    )


TAG = {"TagKey": "team", "TagValue": "hr"}


def test_table_repeats_headers_for_maps_with_nested_values() -> None:
    answer = {
        "Records": [
            {"seq": 1, "operation": "CreateKey", "request": {"Tags": [TAG]}},
            {"seq": 2, "operation": "Encrypt"},
        ]
    }
    assert draw_table("ListAuditRecords", answer, 80) == (
        "------------------------------\n"
        "|      ListAuditRecords      |\n"
        "+----------------------------+\n"
        "||          Records         ||\n"
        "|+----------------+---------+|\n"
        "||    operation   |   seq   ||\n"
        "|+----------------+---------+|\n"
        "||  CreateKey     |  1      ||\n"
        "|+----------------+---------+|\n"
        "|||         request        |||\n"
        "||+------------------------+||\n"
        "||||         Tags         ||||\n"
        "|||+---------+------------+|||\n"
        "|||| TagKey  | TagValue   ||||\n"
        "|||+---------+------------+|||\n"
        "||||  team   |  hr        ||||\n"
        "|||+---------+------------+|||\n"
        "||          Records         ||\n"
        "|+----------------+---------+|\n"
        "||    operation   |   seq   ||\n"
        "|+----------------+---------+|\n"
        "||  Encrypt       |  2      ||\n"
        "|+----------------+---------+|\n"
    )


def test_table_of_lists_and_wide_characters() -> None:
    assert draw_table("ListKeys", ["k1", "k2"], 80) == (
        "----------\n|ListKeys|\n+--------+\n|  k1    |\n|  k2    |\n+--------+\n"
    )
    assert draw_table("ListKeys", [["k1", "arn1"], ["k2", "arn2"]], 80) == (
        "----------------\n"
        "|   ListKeys   |\n"
        "+-----+--------+\n"
        "|  k1 |  arn1  |\n"
        "|  k2 |  arn2  |\n"
        "+-----+--------+\n"
    )
    assert text_width("日本語") == 6
    assert draw_table("Op", {"Name": "日本語", "Id": "x"}, 80) == (
        "------------------\n"
        "|       Op       |\n"
        "+-----+----------+\n"
        "| Id  |  Name    |\n"
        "+-----+----------+\n"
        "|  x  |  日本語  |\n"
        "+-----+----------+\n"
    )


def test_table_where_envfs_differs_from_aws_cli() -> None:
    # A scalar answer: aws-cli draws the title alone and loses the value.
    assert draw_table("DescribeKey", "Enabled", 80) == (
        "-------------\n|DescribeKey|\n+-----------+\n|  Enabled  |\n+-----------+\n"
    )
    assert draw_table("ListKeys", 0, 80) == (
        "----------\n|ListKeys|\n+--------+\n|  0     |\n+--------+\n"
    )
    # A map in a list of scalars: aws-cli prints the map's keys in place of its values.
    assert draw_table("Op", ["a", {"b": "c", "d": "e"}], 80) == (
        "--------------\n"
        "|     Op     |\n"
        "+------------+\n"
        "|  a         |\n"
        "+------------+\n"
        "||    Op    ||\n"
        "|+----+-----+|\n"
        "||  b |  d  ||\n"
        "|+----+-----+|\n"
        "||  c |  e  ||\n"
        "|+----+-----+|\n"
    )
    # A scalar in a list of maps, rows of different lengths: aws-cli stops with an error.
    assert draw_table("Op", [{"k": "v"}, "x"], 80) == (
        "-------\n| Op  |\n+-----+\n|  k  |\n+-----+\n|  v  |\n+-----+\n+-----+\n|  x  |\n+-----+\n"
    )
    assert draw_table("Op", [["a", "b"], ["c"]], 80) == (
        "------------\n|    Op    |\n+----+-----+\n|  a |  b  |\n|  c |     |\n+----+-----+\n"
    )


def test_table_of_nothing() -> None:
    assert draw_table("ListKeys", {}, 80) == ""
    assert draw_table("ListKeys", [], 80) == ""
    assert rendered({"Keys": []}, "table", "Keys") == ""


def test_table_through_render_uses_the_title_and_width() -> None:
    assert rendered({"KeyId": "k"}, "table", width=80) == (
        "----------------\n|      Op      |\n+--------+-----+\n|  KeyId |  k  |\n+--------+-----+\n"
    )


# --- strings that are not the user's own ---------------------------------------------------


def test_control_and_format_characters_never_reach_the_terminal_raw() -> None:
    # An HTTP endpoint's answer, or a description another user wrote: envfs's own. aws-cli
    # prints them as they are (text and table) or C1 and format characters raw (JSON).
    evil = "\x1b]0;owned\x07\x1b[2J\x9b1m\u202edesc\tX\x7f"
    shown = "\\u001b]0;owned\\u0007\\u001b[2J\\u009b1m\\u202edesc\\u0009X\\u007f"
    value = {"Description": evil, "K\x1bey": [evil]}
    for output in ("json", "text", "table"):
        out = rendered(value, output, width=200)
        assert not any(char in out for char in "\x1b\x07\x9b\u202e\x7f"), output
    in_json = shown.replace("\\u0009", "\\t")  # JSON's own escape
    assert rendered(value, "json") == (
        f'{{\n    "Description": "{in_json}",\n    "K\\u001bey": [\n'
        f'        "{in_json}"\n    ]\n}}\n'
    )
    assert rendered(value, "text").startswith(f"{shown}\n")
    assert shown in rendered(value, "table", width=200)
    assert rendered(value, "text", query="Description") == f"{shown}\n"  # a query's result too
