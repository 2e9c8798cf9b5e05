"""The on-disk format of one encrypted file, version 1 (normative spec: ``docs/format.md``).

A backing file is a fixed-size header followed by one or more sealed blocks. All integers
are big-endian::

    header, HEADER_SIZE = 512 bytes
      offset  size  field
           0     8  magic b"\\x89envfs\\r\\n"
           8     2  format version, u16 = 1
          10     2  cipher suite, u16 = 1 (AES-256-GCM blocks, HKDF-SHA256, HMAC-SHA256)
          12     4  flags, u32: 0, or FLAG_SPARSE = 0x00000002 (the file may have holes)
          16    16  file id (random)
          32     1  block shift s, u8, 12..20: plaintext block size B = 2**s (default 14)
          33     2  key ARN length a, u16 (>= 1)
          35     a  key ARN, UTF-8 (opaque here)
        35+a     2  wrapped data key length w, u16 (>= 1)
        37+a     w  wrapped data key (opaque: the key service's ciphertext blob)
      37+a+w     -  zero padding up to offset 480 (a + w <= 443)
         480    32  HMAC-SHA256(header_key, bytes 0..479)

    block i, at HEADER_SIZE + i * (B + 28)
        nonce (12, random on every write) || AES-256-GCM ciphertext || tag (16)
        AAD = b"envfs" || u16 format version || file id (16) || u64 i

    header_key  = HKDF-SHA256(data_key, salt=file id, info=b"envfs v1 header")
    content_key = HKDF-SHA256(data_key, salt=file id, info=b"envfs v1 content")

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
the MAC with the derived :class:`FileKeys`.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
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
FORMAT_VERSION = 1
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

HEADER_INFO = b"envfs v1 header"
CONTENT_INFO = b"envfs v1 content"
AAD_LABEL = b"envfs"

_PREAMBLE = struct.Struct(">8sH")  # magic, version: the part every future version keeps
_FIXED = struct.Struct(">8sHHI16sB")  # magic, version, suite, flags, file id, block shift
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
MAX_VARIABLE_SIZE = MAC_OFFSET - _FIXED.size - 2 * _U16.size  # key ARN + wrapped key: 443


class NotEnvfsFileError(IntegrityError):
    """The bytes do not start with the envfs magic."""


class UnsupportedFormatError(IntegrityError):
    """A format version, cipher suite, flag or block size this envfs does not know."""


class HeaderOverflowError(EnvfsError):
    """The key ARN and wrapped key for a new header do not fit in ``HEADER_SIZE``."""

    errno = _errno.EOVERFLOW


class FileKeys:
    """The two keys of one file, derived from its data key (which is never used directly).

    Attributes:
        header_key: the HMAC-SHA256 key of the header.
        content: AES-256-GCM under the content key, for the blocks.
    """

    __slots__ = ("content", "header_key")

    def __init__(self, header_key: bytes, content: Aead) -> None:
        self.header_key = header_key
        self.content = content

    @classmethod
    def derive(cls, data_key: bytes, file_id: bytes) -> FileKeys:
        """Derive the header and content keys of the file ``file_id``.

        Raises:
            ValueError: the data key is not 32 bytes or the file id not 16.
        """
        if len(data_key) != KEY_SIZE:
            raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
        _check_file_id(file_id)
        header_key = hkdf(data_key, HEADER_INFO, salt=file_id)
        content_key = hkdf(data_key, CONTENT_INFO, salt=file_id)
        return cls(header_key, Aead(content_key))

    def __repr__(self) -> str:
        return "FileKeys(<redacted>)"


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The header of one file. Build with :meth:`new` or :meth:`parse`.

    For a rewrap, ``dataclasses.replace(header, key_arn=..., wrapped_key=...)`` keeps the
    file id and block size (and so the content) and is validated the same way.
    """

    file_id: bytes
    block_shift: int
    key_arn: str
    wrapped_key: bytes
    flags: int = 0

    def __post_init__(self) -> None:
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
        cls, key_arn: str, wrapped_key: bytes, block_shift: int = DEFAULT_BLOCK_SHIFT
    ) -> FileHeader:
        """A header for a new file, with a fresh random file id.

        Raises:
            HeaderOverflowError: the key ARN and wrapped key are too long together.
            ValueError: an empty key ARN or wrapped key, or a block shift outside 12..20.
        """
        return cls(random_bytes(FILE_ID_SIZE), block_shift, key_arn, wrapped_key)

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
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"unsupported format version {version} (this envfs reads version {FORMAT_VERSION})"
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
                f"unsupported header flags 0x{flags:08x} (version {FORMAT_VERSION} defines"
                f" 0x{KNOWN_FLAGS:08x})"
            )
        if not MIN_BLOCK_SHIFT <= block_shift <= MAX_BLOCK_SHIFT:
            raise UnsupportedFormatError(
                f"unsupported block size 2**{block_shift}"
                f" (version {FORMAT_VERSION} allows 2**{MIN_BLOCK_SHIFT} to 2**{MAX_BLOCK_SHIFT})"
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
        return cls(bytes(file_id), block_shift, key_arn, wrapped_key, flags)

    def verify(self, raw: BytesLike, keys: FileKeys) -> None:
        """Check that ``raw`` is exactly this header, authenticated under ``keys``.

        Raises:
            IntegrityError: ``raw`` is not this header, or its MAC does not verify.
        """
        body = self._body()
        if len(raw) < HEADER_SIZE or raw[:MAC_OFFSET] != body:
            raise IntegrityError("header authentication failed")
        expected = hmac_sha256(keys.header_key, body)
        if not constant_time_equal(expected, bytes(raw[MAC_OFFSET:HEADER_SIZE])):
            raise IntegrityError("header authentication failed")

    @classmethod
    def parse_verified(cls, raw: BytesLike, keys: FileKeys) -> FileHeader:
        """:meth:`parse` then :meth:`verify`, for when the keys are already known."""
        header = cls.parse(raw)
        header.verify(raw, keys)
        return header

    def encode(self, keys: FileKeys) -> bytes:
        """The header's ``HEADER_SIZE`` bytes, MAC'd under ``keys`` (derived for this file id)."""
        body = self._body()
        return body + hmac_sha256(keys.header_key, body)

    def _body(self) -> bytes:
        arn = self.key_arn.encode()
        fixed = _FIXED.pack(
            MAGIC, FORMAT_VERSION, CIPHER_SUITE, self.flags, self.file_id, self.block_shift
        )
        body = b"".join(
            (fixed, _U16.pack(len(arn)), arn, _U16.pack(len(self.wrapped_key)), self.wrapped_key)
        )
        return body.ljust(MAC_OFFSET, b"\0")


def _read_field(raw: BytesLike, pos: int, limit: int, name: str) -> tuple[bytes, int]:
    """Read a u16-length-prefixed field at ``pos`` that must end by ``limit``."""
    (size,) = _U16.unpack_from(raw, pos)
    start = pos + _U16.size
    if size == 0 or start + size > limit:
        raise IntegrityError(f"malformed header: {name} length {size} does not fit")
    return bytes(raw[start : start + size]), start + size


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


def _aad_prefix(file_id: bytes) -> bytes:
    _check_file_id(file_id)
    return AAD_LABEL + _U16.pack(FORMAT_VERSION) + file_id


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
    return seal(plaintext, _aad_prefix(file_id) + _U64.pack(index))


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
        return open_(sealed, _aad_prefix(file_id) + _U64.pack(index))
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
    prefix = _aad_prefix(file_id)
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
    prefix = _aad_prefix(file_id)
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
    """A whole backing file: the header and every block of ``plaintext``."""
    blocks = encrypt_blocks(keys, header.file_id, 0, plaintext, header.block_shift, final=True)
    return header.encode(keys) + blocks


def decrypt_file(raw: BytesLike, keys: FileKeys) -> bytes:
    """The plaintext of a whole backing file, after checking its header, size and blocks.

    Raises:
        IntegrityError: anything about the file is wrong.
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
