"""The on-disk format of one encrypted file, versions 1 and 2 (normative spec:
``docs/format.md``).

A backing file is a fixed-size header followed by one or more sealed blocks. All integers
are big-endian::

    header, HEADER_SIZE = 512 bytes
      offset  size  field
           0     8  magic b"\\x89envfs\\r\\n"
           8     2  format version v, u16: 1 or 2
          10     2  cipher suite, u16 = 1 (AES-256-GCM blocks, HKDF-SHA256, HMAC-SHA256)
          12     4  flags, u32: 0, or FLAG_SPARSE = 0x00000002 (the file may have holes)
          16    16  file id (random)
          32     1  block shift s, u8, 12..20: plaintext block size B = 2**s (default 14)
          33     2  key ARN length a, u16 (>= 1)
          35     a  key ARN, UTF-8 (opaque here)
        35+a     2  wrapped data key length w, u16 (>= 1)
        37+a     w  wrapped data key (opaque: the key service's ciphertext blob)
      37+a+w     -  zero padding up to offset 480 (a + w <= 443)
         480    32  header MAC, HMAC-SHA256(header_key, ...):
                      v1: bytes 0..479 (every field and the padding)
                      v2: bytes 0..32 (magic to block shift: the fixed fields only)

    block i, at HEADER_SIZE + i * (B + 28)
        nonce (12, random on every write) || AES-256-GCM ciphertext || tag (16)
        AAD = b"envfs" || u16 v || file id (16) || u64 i

    header_key  = HKDF-SHA256(data_key, salt=file id, info=b"envfs v<v> header")
    content_key = HKDF-SHA256(data_key, salt=file id, info=b"envfs v<v> content")

The two versions differ only in the header MAC's coverage and in the version number (and so
in the labels and the AAD: keys and blocks of one version never open in the other). A
version 2 header's key ARN and wrapped key can be replaced without any key
(:func:`rewrap_header`): the key service binds the wrapped key to the volume and the file
id, and checks that the key ARN names the key the blob is under.

Every block but the last holds exactly B plaintext bytes; the last holds 0..B-1. When the
plaintext size is a multiple of B (the empty file included) the file ends with an empty
28-byte block. So every file has a header and at least one block, a file cut at a block
boundary has an impossible size, and the plaintext size follows from the backing size alone:
``backing = HEADER_SIZE + plaintext + 28 * (plaintext // B + 1)``. The final block is
authenticated before any of the file is served (:mod:`envfs.files.cryptfile`).

In a file whose header has ``FLAG_SPARSE``, a block other than the final one whose B + 28
bytes on disk are all zero is a *hole* and reads as B zero bytes: large gaps (a truncate
upwards, a write far past the end) cost no disk space and no time. A file without the flag
has no holes: an all-zero block fails authentication like any other damaged block.

Parsing is two-phase: :meth:`FileHeader.parse` reads the structure (unauthenticated) so the
caller can have the key service unwrap the data key; :meth:`FileHeader.verify` then checks
the MAC with the :class:`FileKeys` derived for the header's version.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass, field, replace
from typing import NamedTuple, TypeAlias

from envfs.crypto import (
    KEY_SIZE,
    SEAL_OVERHEAD,
    Aead,
    constant_time_equal,
    hkdf,
    hmac_sha256,
    random_bytes,
)
from envfs.errors import EnvfsError, IntegrityError

BytesLike: TypeAlias = bytes | bytearray | memoryview

MAGIC = b"\x89envfs\r\n"
# The version of headers and keys made without saying otherwise, and of new volumes.
FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2)  # the versions this envfs reads and writes
CIPHER_SUITE = 1  # AES-256-GCM blocks, HKDF-SHA256 key derivation, HMAC-SHA256 header MAC
HEADER_SIZE = 512
MAC_SIZE = 32
MAC_OFFSET = HEADER_SIZE - MAC_SIZE
FILE_ID_SIZE = 16
MIN_BLOCK_SHIFT = 12
MAX_BLOCK_SHIFT = 20
DEFAULT_BLOCK_SHIFT = 14
BLOCK_OVERHEAD = SEAL_OVERHEAD  # nonce (12) + tag (16)
MIN_BACKING_SIZE = HEADER_SIZE + BLOCK_OVERHEAD  # the empty file

# Header flags. Bit 0 is reserved (never set; refused like any unknown flag).
FLAG_SPARSE = 0x00000002  # non-final all-zero blocks are holes that read as zeros
KNOWN_FLAGS = FLAG_SPARSE

HEADER_INFO = b"envfs v1 header"  # version 1's HKDF labels
CONTENT_INFO = b"envfs v1 content"
HEADER_INFO_V2 = b"envfs v2 header"
CONTENT_INFO_V2 = b"envfs v2 content"
_LABELS = {1: (HEADER_INFO, CONTENT_INFO), 2: (HEADER_INFO_V2, CONTENT_INFO_V2)}
AAD_LABEL = b"envfs"

_PREAMBLE = struct.Struct(">8sH")  # magic, version: the part every future version keeps
_FIXED = struct.Struct(">8sHHI16sB")  # magic, version, suite, flags, file id, block shift
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
MAX_VARIABLE_SIZE = MAC_OFFSET - _FIXED.size - 2 * _U16.size  # key ARN + wrapped key: 443
V2_MAC_COVERS = _FIXED.size  # a version 2 header MAC covers bytes 0..32 (the fixed fields)


class NotEnvfsFileError(IntegrityError):
    """The bytes do not start with the envfs magic."""


class UnsupportedFormatError(IntegrityError):
    """A format version, cipher suite, flag or block size this envfs does not know."""


class HeaderOverflowError(EnvfsError):
    """The key ARN and wrapped key for a new header do not fit in ``HEADER_SIZE``."""

    errno = _errno.EOVERFLOW


class NotRewrappableError(EnvfsError):
    """A version 1 header: its MAC covers the wrapped key, so replacing it needs the data key."""


class FileKeys:
    """The two keys of one file, derived from its data key (which is never used directly).

    Attributes:
        header_key: the HMAC-SHA256 key of the header.
        content: AES-256-GCM under the content key, for the blocks.
        version: the format version the keys were derived for; the blocks' AAD carries it,
            and a header of another version refuses them.
    """

    __slots__ = ("content", "header_key", "version")

    def __init__(self, header_key: bytes, content: Aead, version: int = FORMAT_VERSION) -> None:
        _check_version(version)
        self.header_key = header_key
        self.content = content
        self.version = version

    @classmethod
    def derive(cls, data_key: bytes, file_id: bytes, version: int = FORMAT_VERSION) -> FileKeys:
        """Derive the header and content keys of the file ``file_id`` in format ``version``
        (the header's: see :attr:`FileHeader.version`).

        Raises:
            ValueError: the data key is not 32 bytes, the file id not 16, or the version
                not one of ``FORMAT_VERSIONS``.
        """
        if len(data_key) != KEY_SIZE:
            raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
        _check_file_id(file_id)
        _check_version(version)
        header_info, content_info = _LABELS[version]
        header_key = hkdf(data_key, header_info, salt=file_id)
        content_key = hkdf(data_key, content_info, salt=file_id)
        return cls(header_key, Aead(content_key), version)

    def __repr__(self) -> str:
        return "FileKeys(<redacted>)"


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The header of one file. Build with :meth:`new` or :meth:`parse`.

    ``version`` is 1 unless said otherwise: the version of a new file is the volume's
    (``Volume.format_version``), never this default.

    To replace the key ARN and wrapped key (a rewrap): in version 2, :func:`rewrap_header`,
    without any key; in version 1, ``dataclasses.replace(header, key_arn=...,
    wrapped_key=...)`` encoded with the file's keys. Both keep the file id and block size,
    and so the content.
    """

    file_id: bytes
    block_shift: int
    key_arn: str
    wrapped_key: bytes
    flags: int = 0
    version: int = field(default=FORMAT_VERSION, kw_only=True)

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_file_id(self.file_id)
        _check_shift(self.block_shift)
        if self.flags & ~KNOWN_FLAGS:
            raise ValueError(f"unknown header flags 0x{self.flags & ~KNOWN_FLAGS:08x}")
        arn_size = len(self.key_arn.encode())
        if arn_size == 0 or not self.wrapped_key:
            raise ValueError("key arn and wrapped key must not be empty")
        if arn_size + len(self.wrapped_key) > MAX_VARIABLE_SIZE:
            raise HeaderOverflowError(
                f"key arn ({arn_size} bytes) and wrapped key ({len(self.wrapped_key)} bytes)"
                f" do not fit in the file header: at most {MAX_VARIABLE_SIZE} bytes together"
            )

    @classmethod
    def new(
        cls,
        key_arn: str,
        wrapped_key: bytes,
        block_shift: int = DEFAULT_BLOCK_SHIFT,
        *,
        version: int = FORMAT_VERSION,
    ) -> FileHeader:
        """A header for a new file, with a fresh random file id.

        Raises:
            HeaderOverflowError: the key ARN and wrapped key are too long together.
            ValueError: an empty key ARN or wrapped key, a block shift outside 12..20, or
                an unknown version.
        """
        return cls(random_bytes(FILE_ID_SIZE), block_shift, key_arn, wrapped_key, version=version)

    @property
    def block_size(self) -> int:
        """The plaintext block size B in bytes."""
        return 1 << self.block_shift

    @property
    def sparse(self) -> bool:
        """Whether the file may have holes (all-zero non-final blocks reading as zeros)."""
        return bool(self.flags & FLAG_SPARSE)

    @classmethod
    def parse(cls, raw: BytesLike) -> FileHeader:
        """Read the header's structure from the first ``HEADER_SIZE`` bytes of ``raw``.

        Unauthenticated: good for finding the key ARN and wrapped key, and for inspection.
        Bytes after the header (the first blocks, if the caller read them too) are ignored.
        Every field is checked in both versions (the padding and the length fields too,
        although a version 2 MAC does not cover them).

        Raises:
            NotEnvfsFileError: no envfs magic.
            UnsupportedFormatError: unknown version, cipher suite, flags or block size.
            IntegrityError: a truncated or malformed header.
        """
        if len(raw) < _PREAMBLE.size:
            raise NotEnvfsFileError("not an envfs file (bad magic)")
        magic, version = _PREAMBLE.unpack_from(raw)
        if magic != MAGIC:
            raise NotEnvfsFileError("not an envfs file (bad magic)")
        if version not in FORMAT_VERSIONS:
            raise UnsupportedFormatError(
                f"unsupported format version {version} (this envfs reads versions 1 and 2)"
            )
        if len(raw) < HEADER_SIZE:
            raise IntegrityError(f"truncated header: {len(raw)} of {HEADER_SIZE} bytes")
        _, _, suite, flags, file_id, block_shift = _FIXED.unpack_from(raw)
        if suite != CIPHER_SUITE:
            raise UnsupportedFormatError(
                f"unsupported cipher suite {suite} (this envfs knows suite {CIPHER_SUITE})"
            )
        if flags & ~KNOWN_FLAGS:
            raise UnsupportedFormatError(
                f"unsupported header flags 0x{flags:08x} (version {version} defines"
                f" 0x{KNOWN_FLAGS:08x})"
            )
        if not MIN_BLOCK_SHIFT <= block_shift <= MAX_BLOCK_SHIFT:
            raise UnsupportedFormatError(
                f"unsupported block size 2**{block_shift}"
                f" (version {version} allows 2**{MIN_BLOCK_SHIFT} to 2**{MAX_BLOCK_SHIFT})"
            )
        # The key ARN must leave room for the wrapped key's length field.
        arn, pos = _read_field(raw, _FIXED.size, MAC_OFFSET - _U16.size, "key arn")
        wrapped_key, pos = _read_field(raw, pos, MAC_OFFSET, "wrapped key")
        if any(memoryview(raw)[pos:MAC_OFFSET]):
            raise IntegrityError("malformed header: nonzero padding")
        try:
            key_arn = arn.decode()
        except UnicodeDecodeError:
            raise IntegrityError("malformed header: key arn is not utf-8") from None
        return cls(bytes(file_id), block_shift, key_arn, wrapped_key, flags, version=version)

    def verify(self, raw: BytesLike, keys: FileKeys) -> None:
        """Check that ``raw`` is exactly this header, authenticated under ``keys``.

        Raises:
            IntegrityError: ``raw`` is not this header, or its MAC does not verify.
            ValueError: ``keys`` were derived for another version than this header's.
        """
        self._check_keys(keys)
        body = self._body()
        if len(raw) < HEADER_SIZE or raw[:MAC_OFFSET] != body:
            raise IntegrityError("header authentication failed")
        expected = self._mac(body, keys)
        if not constant_time_equal(expected, bytes(raw[MAC_OFFSET:HEADER_SIZE])):
            raise IntegrityError("header authentication failed")

    @classmethod
    def parse_verified(cls, raw: BytesLike, keys: FileKeys) -> FileHeader:
        """:meth:`parse` then :meth:`verify`, for when the keys are already known."""
        header = cls.parse(raw)
        header.verify(raw, keys)
        return header

    def encode(self, keys: FileKeys) -> bytes:
        """The header's ``HEADER_SIZE`` bytes, MAC'd under ``keys`` (derived for this file id
        and this header's version).

        Raises:
            ValueError: ``keys`` were derived for another version than this header's.
        """
        self._check_keys(keys)
        body = self._body()
        return body + self._mac(body, keys)

    def _check_keys(self, keys: FileKeys) -> None:
        if keys.version != self.version:
            raise ValueError(
                f"keys of format version {keys.version} used with a version {self.version} header"
            )

    def _mac(self, body: bytes, keys: FileKeys) -> bytes:
        covered = body if self.version == 1 else body[:V2_MAC_COVERS]
        return hmac_sha256(keys.header_key, covered)

    def _body(self) -> bytes:
        arn = self.key_arn.encode()
        fixed = _FIXED.pack(
            MAGIC, self.version, CIPHER_SUITE, self.flags, self.file_id, self.block_shift
        )
        body = b"".join(
            (fixed, _U16.pack(len(arn)), arn, _U16.pack(len(self.wrapped_key)), self.wrapped_key)
        )
        return body.ljust(MAC_OFFSET, b"\0")


def rewrap_header(raw: BytesLike, key_arn: str, wrapped_key: bytes) -> bytes:
    """A version 2 header with its key ARN and wrapped key replaced, without any key.

    The header MAC is kept: in version 2 it covers neither field (``docs/format.md``,
    *Version 2*). ``wrapped_key`` must be the key service's ``ReEncrypt`` of the old one
    (same encryption context, so the same data key): nothing here can check that, and a
    reader that finds another file's or another volume's blob fails to unwrap it. The caller
    checks first that the volume file accepts the header's key ARN (docs/format.md,
    *Rewrap*): re-encrypting a planted file's blob onto an accepted key would launder it.

    Args:
        raw: the header as read (at least ``HEADER_SIZE`` bytes; more are ignored). It is
            parsed, not authenticated: a header that did not verify still does not.

    Returns:
        The new ``HEADER_SIZE`` bytes.

    Raises:
        NotRewrappableError: a version 1 header (its MAC needs the data key).
        HeaderOverflowError: the new key ARN and wrapped key do not fit.
        ValueError: an empty key ARN or wrapped key.
        IntegrityError: ``raw`` is not a well-formed header (see :meth:`FileHeader.parse`).
    """
    header = FileHeader.parse(raw)
    if header.version == 1:
        raise NotRewrappableError(
            "a version 1 header's wrapped key cannot be replaced without its data key"
        )
    new = replace(header, key_arn=key_arn, wrapped_key=wrapped_key)
    return new._body() + bytes(raw[MAC_OFFSET:HEADER_SIZE])


def _read_field(raw: BytesLike, pos: int, limit: int, name: str) -> tuple[bytes, int]:
    """Read a u16-length-prefixed field at ``pos`` that must end by ``limit``."""
    (size,) = _U16.unpack_from(raw, pos)
    start = pos + _U16.size
    if size == 0 or start + size > limit:
        raise IntegrityError(f"malformed header: {name} length {size} does not fit")
    return bytes(raw[start : start + size]), start + size


def _check_version(version: int) -> None:
    if version not in FORMAT_VERSIONS:
        raise ValueError(f"format version must be 1 or 2, got {version}")


def _check_file_id(file_id: bytes) -> None:
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError(f"file id must be {FILE_ID_SIZE} bytes, got {len(file_id)}")


def _check_shift(block_shift: int) -> None:
    if not MIN_BLOCK_SHIFT <= block_shift <= MAX_BLOCK_SHIFT:
        raise ValueError(
            f"block shift must be {MIN_BLOCK_SHIFT}..{MAX_BLOCK_SHIFT}, got {block_shift}"
        )


# --- size and offset math ------------------------------------------------------------------


class BlockSpan(NamedTuple):
    """The on-disk blocks covering a plaintext byte range.

    Read ``backing_length`` bytes at ``backing_offset`` in one ``pread`` (fewer come back
    at the end of the file: the final block is short), decrypt them with
    :func:`decrypt_blocks` starting at ``first_block``, and the requested bytes start at
    ``skip`` in the result.
    """

    first_block: int
    block_count: int
    backing_offset: int
    backing_length: int
    skip: int


def block_stride(block_shift: int) -> int:
    """The on-disk size of a whole block: B + 28."""
    _check_shift(block_shift)
    return (1 << block_shift) + BLOCK_OVERHEAD


def block_offset(index: int, block_shift: int) -> int:
    """Where block ``index`` starts in the backing file."""
    _check_index(index)
    return HEADER_SIZE + index * block_stride(block_shift)


def block_count(plaintext_size: int, block_shift: int) -> int:
    """How many blocks a file of ``plaintext_size`` bytes has on disk (the final one too)."""
    _check_size(plaintext_size)
    _check_shift(block_shift)
    return (plaintext_size >> block_shift) + 1


def backing_size(plaintext_size: int, block_shift: int) -> int:
    """The backing file size for ``plaintext_size`` bytes of plaintext."""
    return HEADER_SIZE + plaintext_size + BLOCK_OVERHEAD * block_count(plaintext_size, block_shift)


def plaintext_size(backing_size: int, block_shift: int) -> int:
    """The plaintext size of a backing file of ``backing_size`` bytes, without decrypting.

    Raises:
        IntegrityError: no valid file has this size (truncated, or not an envfs file).
    """
    stride = block_stride(block_shift)
    whole, rest = divmod(backing_size - HEADER_SIZE, stride)
    if backing_size < MIN_BACKING_SIZE or rest < BLOCK_OVERHEAD:
        raise IntegrityError(
            f"impossible backing size {backing_size} for {1 << block_shift}-byte blocks"
            " (truncated or corrupt)"
        )
    return (whole << block_shift) + rest - BLOCK_OVERHEAD


def block_span(offset: int, length: int, block_shift: int) -> BlockSpan:
    """The blocks, and the one backing byte range, covering plaintext ``[offset, offset+length)``.

    A zero ``length`` gives an empty span (``block_count`` 0) at ``offset``'s block.
    """
    _check_size(offset)
    _check_size(length)
    stride = block_stride(block_shift)
    first = offset >> block_shift
    count = 0 if length == 0 else ((offset + length - 1) >> block_shift) - first + 1
    skip = offset - (first << block_shift)
    return BlockSpan(first, count, HEADER_SIZE + first * stride, count * stride, skip)


def _check_size(value: int) -> None:
    if value < 0:
        raise ValueError(f"sizes and offsets must not be negative, got {value}")


def _check_index(index: int) -> None:
    if not 0 <= index < 1 << 64:
        raise ValueError(f"block index must be 0..2**64-1, got {index}")


# --- blocks --------------------------------------------------------------------------------


def _aad_prefix(file_id: bytes, version: int) -> bytes:
    _check_file_id(file_id)
    return AAD_LABEL + _U16.pack(version) + file_id


def encrypt_block(
    keys: FileKeys, file_id: bytes, index: int, plaintext: BytesLike, block_shift: int
) -> bytes:
    """Seal block ``index``: at most B bytes, and shorter than B only as the file's final block.

    Raises:
        ValueError: more than B bytes, or a negative index.
    """
    if len(plaintext) > 1 << block_shift:
        raise ValueError(f"a block holds at most {1 << block_shift} bytes, got {len(plaintext)}")
    _check_index(index)
    seal = keys.content.seal
    return seal(plaintext, _aad_prefix(file_id, keys.version) + _U64.pack(index))


def decrypt_block(
    keys: FileKeys,
    file_id: bytes,
    index: int,
    sealed: BytesLike,
    block_shift: int,
    *,
    holes: bool = False,
) -> bytes:
    """Open on-disk block ``index`` (28 to B + 28 bytes).

    Args:
        holes: the file has ``FLAG_SPARSE``: a whole block of zero bytes is a hole and
            reads as B zeros.

    Raises:
        IntegrityError: the block has an impossible length or fails authentication.
    """
    _check_index(index)
    if len(sealed) > block_stride(block_shift):
        raise IntegrityError(f"block {index} failed authentication")
    open_ = keys.content.open
    try:
        return open_(sealed, _aad_prefix(file_id, keys.version) + _U64.pack(index))
    except IntegrityError:
        if holes and is_hole(sealed, block_shift):
            return bytes(1 << block_shift)
        raise IntegrityError(f"block {index} failed authentication") from None


def is_hole(sealed: BytesLike, block_shift: int) -> bool:
    """Whether on-disk bytes are a hole: a whole block (B + 28 bytes) of zeros."""
    return len(sealed) == block_stride(block_shift) and _zero_block(block_shift) == sealed


def _zero_block(block_shift: int) -> bytes:
    zeros = _ZERO_BLOCKS.get(block_shift)
    if zeros is None:
        zeros = _ZERO_BLOCKS[block_shift] = bytes(block_stride(block_shift))
    return zeros


_ZERO_BLOCKS: dict[int, bytes] = {}


def encrypt_blocks(
    keys: FileKeys,
    file_id: bytes,
    first_index: int,
    plaintext: BytesLike,
    block_shift: int,
    *,
    final: bool,
) -> bytes:
    """Seal consecutive blocks from ``first_index``, ready for one ``pwrite``.

    Args:
        final: the run ends the file. Its last block may then be short, and when
            ``len(plaintext)`` is a multiple of B an empty final block is appended (so the
            empty file's run is one 28-byte block). When False, the run must be whole blocks.

    Raises:
        ValueError: a run that does not end the file is not whole blocks.
    """
    size = block_stride(block_shift) - BLOCK_OVERHEAD
    _check_index(first_index)
    total = len(plaintext)
    partial = total & (size - 1)
    if partial and not final:
        raise ValueError(
            f"only the final block may be short: {total} bytes is not whole {size}-byte blocks"
        )
    prefix = _aad_prefix(file_id, keys.version)
    seal = keys.content.seal
    view = memoryview(plaintext)
    pack = _U64.pack
    sealed = [
        seal(view[start : start + size], prefix + pack(first_index + number))
        for number, start in enumerate(range(0, total, size))
    ]
    if final and not partial:
        sealed.append(seal(b"", prefix + pack(first_index + (total >> block_shift))))
    return b"".join(sealed)


def decrypt_blocks(
    keys: FileKeys,
    file_id: bytes,
    first_index: int,
    data: BytesLike,
    block_shift: int,
    *,
    holes: bool = False,
) -> bytes:
    """Open a run of consecutive on-disk blocks starting at ``first_index``.

    Every block but the last must be whole (B + 28 bytes); the last may be short. Checking
    that a short block really is the file's last is the size check's job
    (:func:`plaintext_size`), not this function's.

    Args:
        holes: the file has ``FLAG_SPARSE``: whole blocks of zero bytes are holes and
            read as B zeros each (a short block never is one).

    Raises:
        IntegrityError: a block fails authentication (the message names its index).
    """
    stride = block_stride(block_shift)
    _check_index(first_index)
    prefix = _aad_prefix(file_id, keys.version)
    open_ = keys.content.open
    view = memoryview(data)
    pack = _U64.pack
    plain = []
    index = first_index
    for start in range(0, len(view), stride):
        sealed = view[start : start + stride]
        try:
            plain.append(open_(sealed, prefix + pack(index)))
        except IntegrityError:
            if holes and is_hole(sealed, block_shift):
                plain.append(bytes(1 << block_shift))
            else:
                raise IntegrityError(f"block {index} failed authentication") from None
        index += 1
    return b"".join(plain)


# --- whole files ---------------------------------------------------------------------------


def encrypt_file(header: FileHeader, keys: FileKeys, plaintext: BytesLike) -> bytes:
    """A whole backing file: the header and every block of ``plaintext``.

    Raises:
        ValueError: ``keys`` were derived for another version than the header's.
    """
    encoded = header.encode(keys)
    return encoded + encrypt_blocks(
        keys, header.file_id, 0, plaintext, header.block_shift, final=True
    )


def decrypt_file(raw: BytesLike, keys: FileKeys) -> bytes:
    """The plaintext of a whole backing file, after checking its header, size and blocks.

    Raises:
        IntegrityError: anything about the file is wrong.
        ValueError: ``keys`` were derived for another version than the header says.
    """
    header = FileHeader.parse_verified(raw, keys)
    plaintext_size(len(raw), header.block_shift)
    return decrypt_blocks(
        keys,
        header.file_id,
        0,
        memoryview(raw)[HEADER_SIZE:],
        header.block_shift,
        holes=header.sparse,
    )
