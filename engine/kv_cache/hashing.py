"""Chained block hashes for automatic prefix caching: a full block is known by its whole prefix."""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections import abc
from collections.abc import Callable

from engine.errors import InvalidRequestError
from engine.sequence import Sequence

HashFn = Callable[[bytes], bytes]

HASH_ALGORITHMS = ("sha256", "xxhash")


def sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# Parent of a sequence's first block. A fixed constant, not random per process, so hashes are
# reproducible across restarts and processes (Python's hash() is salted per process).
NONE_HASH: bytes = sha256_digest(b"pagedserve:kv-cache:none-hash")


def get_hash_fn(algorithm: str = "sha256") -> HashFn:
    """sha256 by default; xxhash (xxh3-128, faster, not cryptographic) only if installed."""
    if algorithm == "sha256":
        return sha256_digest
    if algorithm == "xxhash":
        try:
            import xxhash
        except ImportError as exc:
            raise InvalidRequestError("hash algorithm 'xxhash' needs the xxhash package",
                                      param="hash_algorithm") from exc
        digest: HashFn = xxhash.xxh3_128_digest
        return digest
    raise InvalidRequestError(f"hash algorithm must be one of {HASH_ALGORITHMS}, "
                              f"got {algorithm!r}", param="hash_algorithm")


def _serialize(parent_hash: bytes, token_ids: abc.Sequence[int],
               extra_keys: tuple[object, ...]) -> bytes:
    # Length-prefixed fields keep the encoding unambiguous: no (parent, tokens, extras) triple
    # can serialize to the same bytes as another. Tokens are little-endian int64.
    num_tokens = len(token_ids)
    data = struct.pack(f"<B{len(parent_hash)}sI{num_tokens}q", len(parent_hash), parent_hash,
                       num_tokens, *token_ids)
    if extra_keys:
        data += pickle.dumps(extra_keys, protocol=5)
    return data


def hash_block_tokens(parent_hash: bytes | None, token_ids: abc.Sequence[int],
                      extra_keys: tuple[object, ...] = (),
                      hash_fn: HashFn = sha256_digest) -> bytes:
    """Hash of one block given the hash of the block before it (None for the first block).

    Chaining makes equal hashes mean equal whole prefixes, not just equal block contents.
    `extra_keys` holds anything else the KV depends on (an adapter id, image hashes).
    """
    parent = NONE_HASH if parent_hash is None else parent_hash
    return hash_fn(_serialize(parent, token_ids, extra_keys))


def hash_sequence_blocks(sequence: Sequence, block_size: int,
                        hash_fn: HashFn = sha256_digest) -> list[bytes]:
    """Extend sequence.block_hashes to cover every full block of sequence.all_token_ids.

    Only full blocks are hashed; a partial last block waits until it fills. Returns the hashes
    added by this call. Token ids are only ever appended, so earlier hashes stay valid. A
    request's cache_salt goes into the first block's hash, so through the chain into every
    hash: only requests with the same salt share cached blocks.
    """
    hashes = sequence.block_hashes
    num_full_blocks = sequence.num_tokens // block_size
    added: list[bytes] = []
    parent = hashes[-1] if hashes else None
    for index in range(len(hashes), num_full_blocks):
        start = index * block_size
        salt = sequence.sampling_params.cache_salt
        extra_keys: tuple[object, ...] = (salt,) if index == 0 and salt else ()
        parent = hash_block_tokens(parent, sequence.all_token_ids[start:start + block_size],
                                   extra_keys, hash_fn=hash_fn)
        added.append(parent)
    hashes.extend(added)
    return added
