"""The prefix cache: the keys and values of prompts already prefilled, reused by later prompts that
begin the same way (a system prompt and image sent again, the earlier turns of a chat).

A sequence is cut into blocks of BLOCK tokens; each block's hash chains the hash of the blocks
before it, the block's token ids and, for image tokens, the hash of the image they come from
(its preprocessed pixels), so that two images behind identical text never share a block. The
chain starts from a root that names what else changes the keys and values (the model, its
weights and dtype). An entry holds the keys and values of one sequence: a prompt once it is
prefilled, then that prompt and its answer once the answer is finished (the next turn of a chat
resends both, and the shorter entry is dropped); the index maps the hash of each of its full
blocks to the entries holding it. A lookup walks the new prompt's chain while it is indexed, then
compares the tokens that follow with those of a few entries holding that chain: the prompt's
first M tokens then have exactly the keys and values of that entry's first M slots (causal
attention: a token's keys and values depend only on the tokens before it), and only the rest is
prefilled. The entries are a least recently used map bounded in bytes.

Video tokens are keyed by a digest of the video's sampled, preprocessed frames, as image tokens
by their image's. What is not shared: prompts with a visual token reduction (methods inside the
language model select with the whole prompt, and several methods before it read the question, so
an image's tokens would differ by what follows them), and quantized KV caches (KIVI and VidKV
quantize in groups whose boundaries move with the prompt's length).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per hashed block
CANDIDATES = 8  # entries whose tokens past the last shared full block a lookup compares


@dataclass
class Entry:
    k: torch.Tensor  # [L, Hkv, N, Dh] keys of a sequence's N tokens
    v: torch.Tensor  # [L, Hkv, N, Dh]
    keys: list  # the N token keys (token_keys)
    hashes: list[bytes]  # the chain hash of each of its full blocks

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def token_keys(ids: list[int], image_token: int, image_digests: list[bytes], image_counts: list[int],
               video_token: int | None = None, video_digests: list[bytes] = (), video_counts: list[int] = ()) -> list:
    """What identifies each prompt token: its id, or for the image tokens (the images' runs, in
    order: image_counts[i] tokens for the i-th) the image's digest and the token's index in it;
    the same for video tokens with the videos' digests (of their sampled frames) and counts."""
    media = {image_token: (list(image_digests), list(image_counts))}
    if video_token is not None:
        media[video_token] = (list(video_digests), list(video_counts))
    for token, (digests, counts) in media.items():
        if sum(counts) != sum(1 for t in ids if t == token) or len(digests) != len(counts):
            raise ValueError("the image or video token counts do not match the prompt")
    keys, place = [], {token: [-1, 0, 0] for token in media}  # per kind: item, tokens left in it, index
    for t in ids:
        if t not in media:
            keys.append(t)
            continue
        digests, counts = media[t]
        at = place[t]
        if at[1] == 0:
            at[0], at[1], at[2] = at[0] + 1, counts[at[0] + 1], 0
        keys.append((digests[at[0]], at[2]))
        at[1], at[2] = at[1] - 1, at[2] + 1
    return keys


def block_hash(prev: bytes, keys: list) -> bytes:
    """The hash of a block of token keys (BLOCK of them, or fewer: a partial block) after `prev`."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(repr(keys).encode())
    return h.digest()


def chain(root: bytes, keys: list) -> list[bytes]:
    """The chained hash of each full block of `keys` (see the module's docstring)."""
    hashes, prev = [], root
    for b in range(len(keys) // BLOCK):
        prev = block_hash(prev, keys[b * BLOCK:(b + 1) * BLOCK])
        hashes.append(prev)
    return hashes


class PrefixCache:
    def __init__(self, max_bytes: int, root: str):
        """max_bytes: the keys and values kept, at most; root: what else the keys and values
        depend on (the model and its cache layout)."""
        if max_bytes <= 0:
            raise ValueError("a prefix cache needs a positive size")
        self.max_bytes = max_bytes
        self.root = hashlib.blake2b(root.encode(), digest_size=16).digest()
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.index: dict[bytes, set[int]] = {}  # block hash -> entries holding that block
        self.nbytes = 0
        self._next = 0
        self.hits = self.misses = self.evictions = 0  # lookups, and entries evicted
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the cache

    def lookup(self, keys: list) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with a prompt of these token keys and how many of
        its tokens to reuse (at most len(keys) - 1: the last token is always computed, for its
        logits); (None, 0) on a miss."""
        key, matched = self._match(keys, len(keys) - 1)
        if key is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self.cached_tokens += matched
        self.entries.move_to_end(key)
        return self.entries[key], matched

    def store(self, keys: list, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys and values k, v [L, Hkv, N, Dh] (kept as they are, not copied) of a
        sequence of N tokens with these token keys, unless an entry holds it all already; entries
        that it extends (a chat's earlier turn) are dropped."""
        if len(keys) != k.shape[2]:
            raise ValueError(f"{len(keys)} token keys for {k.shape[2]} slots")
        hashes = chain(self.root, keys)
        if not hashes or self._match(keys, len(keys))[1] == len(keys):
            return
        entry = Entry(k, v, list(keys), hashes)
        if entry.nbytes > self.max_bytes:
            return
        for old in [e for e in self.index.get(hashes[0], ()) if _extends(keys, self.entries[e].keys)]:
            self._drop(old)
        key, self._next = self._next, self._next + 1
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        for h in hashes:
            self.index.setdefault(h, set()).add(key)
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.evictions += 1

    def _match(self, keys: list, limit: int) -> tuple[int | None, int]:
        """(the entry sharing the most of keys' first `limit` tokens, how many), walking the
        indexed full blocks, then comparing the tokens of the next block with a few of the entries
        that hold them all; (None, 0) when not even the first block is held."""
        holders, matched = None, 0
        for h in chain(self.root, keys[:limit]):
            found = self.index.get(h)
            if not found:
                break
            holders, matched = found, matched + BLOCK
        if not holders:
            return None, 0
        best, most = None, matched
        for key in list(holders)[:CANDIDATES]:
            theirs = self.entries[key].keys
            n, end = matched, min(len(theirs), limit, matched + BLOCK - 1)
            while n < end and theirs[n] == keys[n]:
                n += 1
            if best is None or n > most:
                best, most = key, n
        return best, most

    def _drop(self, key: int) -> None:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            holders = self.index[h]
            holders.discard(key)
            if not holders:
                del self.index[h]


def _extends(keys: list, shorter: list) -> bool:
    """Whether `keys` begins with all of `shorter` (and is longer)."""
    return len(shorter) < len(keys) and keys[:len(shorter)] == shorter


def row_kv(cache, row: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [L, Hkv, N, Dh] of one row of a full-precision cache (a single stage) at
    the N slot indices `slots`."""
    k = torch.stack([layer[row][:, slots] for layer in cache.k])
    v = torch.stack([layer[row][:, slots] for layer in cache.v])
    return k, v
