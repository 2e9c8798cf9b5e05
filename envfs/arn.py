"""KMS key ARNs and region names, of any partition.

``arn:PARTITION:kms:REGION:ACCOUNT:key/ID`` names a master key: ``envfs`` is the partition
of envfs's own key service, ``aws`` (or ``aws-cn``, ``aws-us-gov``) that of AWS KMS. The
key service (:mod:`envfs.kms.model`) accepts only its own partition; the file side and the
key providers read any, since a volume's key may live in another service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from envfs.errors import InvalidArnException, ValidationException

PARTITION_RE = re.compile(r"^[a-z][a-z0-9-]*$")
REGION_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ACCOUNT_RE = re.compile(r"^[0-9]{12}$")


def validate_region(region: str) -> str:
    """Return ``region`` if it is a well-formed region name.

    Raises:
        ValidationException: it is not.
    """
    if not (1 <= len(region) <= 63) or not REGION_RE.fullmatch(region):
        raise ValidationException(
            f"region {region!r} is not valid: expected lowercase letters, digits and dashes,"
            " like 'local-1' or 'eu-west-1'"
        )
    return region


@dataclass(frozen=True)
class Arn:
    region: str
    account: str
    resource: str  # "key/<id>" or "alias/<name>"
    partition: str = "envfs"


def parse_arn(text: str) -> Arn:
    """Split a KMS ARN of any partition.

    Raises:
        InvalidArnException: not of the form ``arn:PARTITION:kms:REGION:ACCOUNT:RESOURCE``
            with a key or alias as its resource.
    """
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "kms":
        raise InvalidArnException(f"ARN {text!r} is not a KMS ARN")
    if not PARTITION_RE.fullmatch(parts[1]):
        raise InvalidArnException(f"ARN {text!r} has a malformed partition")
    region, account, resource = parts[3], parts[4], parts[5]
    if not REGION_RE.fullmatch(region) or not ACCOUNT_RE.fullmatch(account):
        raise InvalidArnException(f"ARN {text!r} has a malformed region or account")
    if not (resource.startswith("key/") or resource.startswith("alias/")):
        raise InvalidArnException(f"ARN {text!r} names neither a key nor an alias")
    return Arn(region, account, resource, parts[1])


def parse_key_arn(text: str) -> Arn:
    """Split the ARN of one key (not an alias).

    Raises:
        InvalidArnException: ``text`` is not a KMS key ARN.
    """
    arn = parse_arn(text)
    if not arn.resource.startswith("key/") or arn.resource == "key/":
        raise InvalidArnException(f"ARN {text!r} names an alias, not a key")
    return arn
