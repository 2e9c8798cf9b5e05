"""The fake key service refuses what the real one refuses: the core's tests over it mean
something only if it does."""

from __future__ import annotations

import pytest

from envfs.errors import (
    AccessDeniedException,
    DisabledException,
    IncorrectKeyException,
    InvalidCiphertextException,
    NotFoundException,
)
from envfs.keys.provider import KeyProvider
from tests.unit.fakekeys import KEY_USER, ROOT, STRANGER, Call, FakeKeyProvider

CONTEXT = {"envfs:volume": "v1", "envfs:file": "00ff"}


@pytest.fixture
def keys() -> FakeKeyProvider:
    return FakeKeyProvider("local-1")


def test_a_data_key_unwraps_with_its_key_and_context_for_its_users(
    keys: FakeKeyProvider,
) -> None:
    provider: KeyProvider = keys
    arn = keys.create_key([KEY_USER.uid])
    assert arn.startswith("arn:envfs:kms:local-1:111122223333:key/")
    made = provider.generate_data_key(arn, CONTEXT, KEY_USER, "made")
    assert (made.key_arn, len(made.plaintext)) == (arn, 32)
    assert made.plaintext not in made.wrapped
    assert provider.decrypt(made.wrapped, arn, dict(CONTEXT), KEY_USER, "used") == made.plaintext
    wrapped = provider.read_wrapped(made.wrapped)
    assert wrapped is not None and arn.endswith(f":key/{wrapped.key_id}")
    assert (provider.region, provider.batches_audit) == ("local-1", False)


def test_every_other_unwrap_is_refused_as_the_key_service_refuses_it(
    keys: FakeKeyProvider,
) -> None:
    arn = keys.create_key([KEY_USER.uid])
    other = keys.create_key([KEY_USER.uid])
    made = keys.generate_data_key(arn, CONTEXT, KEY_USER, "")
    altered = bytearray(made.wrapped)
    altered[-1] ^= 1
    refusals = [
        (
            (made.wrapped, arn, {**CONTEXT, "envfs:file": "00fe"}, KEY_USER),
            InvalidCiphertextException,
        ),
        ((made.wrapped, arn, {}, KEY_USER), InvalidCiphertextException),
        ((bytes(altered), arn, CONTEXT, KEY_USER), InvalidCiphertextException),
        ((b"not a blob", arn, CONTEXT, KEY_USER), InvalidCiphertextException),
        ((made.wrapped, other, CONTEXT, KEY_USER), IncorrectKeyException),
        ((made.wrapped, arn, CONTEXT, STRANGER), AccessDeniedException),
        ((made.wrapped, arn.replace("local-1", "local-2"), CONTEXT, KEY_USER), NotFoundException),
    ]
    for (wrapped, key, context, caller), error in refusals:
        with pytest.raises(error):
            keys.decrypt(wrapped, key, context, caller, "")


def test_contexts_that_concatenate_alike_are_different(keys: FakeKeyProvider) -> None:
    arn = keys.create_key([KEY_USER.uid])
    made = keys.generate_data_key(arn, {"a": "bc"}, KEY_USER, "")
    with pytest.raises(InvalidCiphertextException):
        keys.decrypt(made.wrapped, arn, {"ab": "c"}, KEY_USER, "")


def test_new_data_keys_need_a_user_of_an_enabled_key(keys: FakeKeyProvider) -> None:
    arn = keys.create_key([KEY_USER.uid])
    with pytest.raises(AccessDeniedException, match=r"^user uid 61003 is not authorized"):
        keys.generate_data_key(arn, CONTEXT, STRANGER, "")
    with pytest.raises(NotFoundException, match=r"^key 'nope' does not exist in region 'local-1'$"):
        keys.generate_data_key("nope", CONTEXT, KEY_USER, "")
    made = keys.generate_data_key(arn, CONTEXT, KEY_USER, "")
    keys.key(arn).enabled = False
    with pytest.raises(DisabledException):
        keys.generate_data_key(arn, CONTEXT, KEY_USER, "")
    with pytest.raises(DisabledException):
        keys.decrypt(made.wrapped, arn, CONTEXT, KEY_USER, "")
    with pytest.raises(AccessDeniedException):  # policy before state, as the service checks
        keys.decrypt(made.wrapped, arn, CONTEXT, STRANGER, "")


def test_describe_key_resolves_an_id_for_its_users(keys: FakeKeyProvider) -> None:
    arn = keys.create_key([KEY_USER.uid])
    key_id = arn.rsplit("/", 1)[1]
    assert keys.describe_key(key_id, KEY_USER) == arn
    with pytest.raises(AccessDeniedException):
        keys.describe_key(arn, ROOT)  # root too needs the key's policy


def test_every_call_is_recorded_with_its_outcome(keys: FakeKeyProvider) -> None:
    arn = keys.create_key([KEY_USER.uid])
    made = keys.generate_data_key(arn, CONTEXT, KEY_USER, "/backing/f")
    with pytest.raises(AccessDeniedException):
        keys.decrypt(made.wrapped, arn, CONTEXT, STRANGER, "/backing/f (truncate)")
    keys.flush_audit()  # nothing batched: nothing changes
    assert keys.calls == [
        Call("GenerateDataKey", arn, KEY_USER.uid, "/backing/f", "ok"),
        Call("Decrypt", arn, STRANGER.uid, "/backing/f (truncate)", "AccessDeniedException"),
    ]
    assert keys.decisions("Decrypt") == [("Decrypt", STRANGER.uid, "AccessDeniedException")]
