"""Tamper evidence in the store: every stored event is sealed and names its predecessor's seal.

The chain lives in the infrastructure, not in the domain: `ChainMapper` writes it into each stored
event's state under a reserved key and strips it again on load, so the aggregate never sees it.

Stored state layout (the JSON the transcoder writes, with the reserved key first)::

    {"__chain__":"<prev: 64 hex><seal: 64 hex>", ...the event's own fields...}

- `seal` = sha256 over the event's canonical stored form: originator id, version and topic, then
  the state bytes with the 64 characters of the seal itself left out. A changed event no longer
  matches its seal, including the last event of a job (which has no successor to vouch for it).
- `prev` = the seal of the same job's previous event (64 zeros for version 1). A deleted, inserted
  or reordered event breaks the link to its neighbour.

The seal is unkeyed: it catches edits made behind the application's back (a stray UPDATE, a bad
restore), and someone who rewrites a whole job consistently is caught by what lies outside the
store: the read model's log checkpoints and the hash-chained export.

Writing needs the predecessor's seal for the first event of each save. A bounded cache remembers the
latest seal seen per job (filled when events are read or written); on a miss the mapper reads the
job's last stored event. A save that then fails (a concurrent writer won) leaves a stale entry, which
the next read of the job (every command reads the job before it writes) replaces.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, cast
from uuid import UUID

from eventsourcing.persistence import (
    ApplicationRecorder,
    Cipher,
    Compressor,
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    Transcoder,
    find_id_convertor,
)
from eventsourcing.utils import get_topic, resolve_topic

from podsettle.support.lru import keep

CHAIN_KEY = "__chain__"
PREFIX = b'{"' + CHAIN_KEY.encode() + b'":"'
HASH_LEN = 64
GENESIS = "0" * HASH_LEN
_PREV_START = len(PREFIX)
_SEAL_START = _PREV_START + HASH_LEN
_SEAL_END = _SEAL_START + HASH_LEN
# After the seal comes `",` and the rest of the object, or `"}` for an event without fields.
_BODY_START = _SEAL_END + 2
DEFAULT_CACHE_SIZE = 10_000


class ChainError(ValueError):
    """A stored event does not match its seal or does not follow its predecessor."""

    def __init__(self, originator_id: object, version: int, reason: str) -> None:
        self.originator_id = originator_id
        self.version = version
        self.reason = reason
        super().__init__(f"event {originator_id} v{version}: {reason}")


def header(originator_id: UUID | str, version: int, topic: str) -> bytes:
    """The part of the canonical form that is not the state: it binds the seal to its place.

    A UUID is written as 32 hex digits, as the SQLite recorder stores it."""
    text = originator_id.hex if isinstance(originator_id, UUID) else originator_id
    return f"{text}\n{version}\n{topic}\n".encode()


def compute_seal(originator_id: UUID | str, version: int, topic: str, sealed_state: bytes) -> str:
    """The seal of a sealed plaintext state (its own seal characters are left out of the hash)."""
    digest = hashlib.sha256(header(originator_id, version, topic))
    digest.update(sealed_state[:_SEAL_START])
    digest.update(sealed_state[_SEAL_END:])
    return digest.hexdigest()


def is_sealed(state: bytes) -> bool:
    return state.startswith(PREFIX) and len(state) >= _BODY_START


def split_sealed(state: bytes) -> tuple[str, str, bytes]:
    """(prev, seal, the transcoder's own bytes) of a sealed plaintext state."""
    prev = state[_PREV_START:_SEAL_START].decode("ascii")
    seal = state[_SEAL_START:_SEAL_END].decode("ascii")
    return prev, seal, b"{" + state[_BODY_START:]


def seal_state(
    originator_id: UUID | str, version: int, topic: str, body: bytes, prev: str
) -> tuple[bytes, str]:
    """Seal the transcoder's bytes of an event: returns (the sealed state, its seal)."""
    head = PREFIX + prev.encode("ascii")
    tail = b'"}' if body == b"{}" else b'",' + body[1:]
    seal = hashlib.sha256(header(originator_id, version, topic) + head + tail).hexdigest()
    return head + seal.encode("ascii") + tail, seal


def unseal(originator_id: UUID | str, version: int, topic: str, state: bytes) -> tuple[str, str, bool] | None:
    """(prev, seal, whether the seal matches) of a plaintext state; None when it carries no seal.

    One function on purpose: the audit calls it for every event of the log."""
    if state[:_PREV_START] != PREFIX or len(state) < _BODY_START:
        return None
    seal = state[_SEAL_START:_SEAL_END].decode("ascii")
    matches = compute_seal(originator_id, version, topic, state) == seal
    return state[_PREV_START:_SEAL_START].decode("ascii"), seal, matches


class SealFormat:
    """The seal format as the audit reads it (`podsettle.replay` takes it as an argument, so that the
    replay code does not depend on this adapter). States are already plaintext."""

    genesis = GENESIS

    def plaintext(self, state: bytes) -> bytes:
        return state

    # (prev, seal, whether it matches) of a state: the module's `unseal` itself, without a call more
    unseal = staticmethod(unseal)


SEALS = SealFormat()


class SealCache:
    """The latest seal seen per job, bounded (oldest entries go first).

    A UUID is kept under its integer (hashed in C; a UUID hashes and compares in Python code)."""

    def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE) -> None:
        self.maxsize = maxsize
        # Least recently seen first (an OrderedDict drops its oldest in O(1); a dict scans its holes).
        self._seals: OrderedDict[int | str, tuple[int, str]] = OrderedDict()

    def get(self, originator_id: UUID | str, version: int) -> str | None:
        found = self._seals.get(originator_id.int if isinstance(originator_id, UUID) else originator_id)
        if found is not None and found[0] == version:
            return found[1]
        return None

    def put(self, originator_id: UUID | str, version: int, seal: str) -> None:
        key = originator_id.int if isinstance(originator_id, UUID) else originator_id
        keep(self._seals, key, (version, seal), self.maxsize)

    def __len__(self) -> int:
        return len(self._seals)


class ChainMapper(Mapper[UUID]):
    """A Mapper that seals every stored event and checks the seal of every loaded one.

    `recorder` is a callable because the application builds its mapper before its recorder.
    With `verify` (the default) a loaded event that does not match its seal, or that does not
    follow the predecessor this mapper saw, raises `ChainError`: no decision is taken on an event
    that was changed behind the application's back. Events stored without a seal (before the chain
    was installed) load as they are; the audit reports them.
    """

    def __init__(
        self,
        transcoder: Transcoder,
        compressor: Compressor | None = None,
        cipher: Cipher | None = None,
        *,
        recorder: Callable[[], ApplicationRecorder | None] = lambda: None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        verify: bool = True,
    ) -> None:
        super().__init__(transcoder=transcoder, compressor=compressor, cipher=cipher)
        self._topics: dict[type, str] = {}
        self._recorder = recorder
        self.cache = SealCache(cache_size)
        self.verify = verify

    # ------------------------------------------------------------------ writing

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        # As Mapper.to_stored_event, with the seal put in before the state is compressed or
        # encrypted (the library's version would have to be undone first to seal its bytes).
        cls = type(domain_event)
        topic = self._topics.get(cls)
        if topic is None:
            topic = self._topics[cls] = get_topic(cls)
        state = dict(domain_event.__dict__)
        originator_id = state.pop("originator_id")
        version = state.pop("originator_version")
        class_version = getattr(cls, "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        body = self.transcoder.encode(state)
        prev = GENESIS if version == 1 else self.predecessor_seal(originator_id, version - 1)
        sealed, seal = seal_state(originator_id, version, topic, body, prev)
        self.cache.put(originator_id, version, seal)
        return StoredEvent(
            originator_id=originator_id,
            originator_version=version,
            topic=topic,
            state=self._wrap(sealed) if self.compressor or self.cipher else sealed,
        )

    def predecessor_seal(self, originator_id: UUID | str, version: int) -> str:
        """The seal of event `version` of a job: from the cache, else from its last stored event."""
        cached = self.cache.get(originator_id, version)
        if cached is not None:
            return cached
        recorder = self._recorder()
        if recorder is not None:
            found = recorder.select_events(originator_id, desc=True, limit=1)
            if found and found[0].originator_version == version:
                state = self.plaintext(found[0].state)
                if is_sealed(state):
                    seal = split_sealed(state)[1]
                    self.cache.put(originator_id, version, seal)
                    return seal
        # No such predecessor in the store: the save is about to fail on its version, or the job's
        # history is already broken (the audit says where). Either way there is nothing to chain to.
        return GENESIS

    # ------------------------------------------------------------------ reading

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        """The domain event of a stored one, its seal and its link to its predecessor checked.

        One pass over the state: the seal is hashed straight from it, and the transcoder's own bytes
        (the state without the chain key) are decoded as the library's `Mapper` decodes a state."""
        state = stored_event.state
        if self.cipher or self.compressor:
            state = self.plaintext(state)
        if state[:_PREV_START] != PREFIX or len(state) < _BODY_START:
            return super().to_domain_event(stored_event)
        originator_id = stored_event.originator_id
        version = stored_event.originator_version
        topic = stored_event.topic
        seal = state[_SEAL_START:_SEAL_END].decode("ascii")
        if self.verify:
            if compute_seal(originator_id, version, topic, state) != seal:
                raise ChainError(originator_id, version, "the stored event does not match its seal")
            expected = GENESIS if version == 1 else self.cache.get(originator_id, version - 1)
            if expected is not None and state[_PREV_START:_SEAL_START].decode("ascii") != expected:
                raise ChainError(originator_id, version, "the event does not follow its predecessor")
        self.cache.put(originator_id, version, seal)
        return self._decode(originator_id, version, topic, b"{" + state[_BODY_START:])

    def _decode(self, originator_id: UUID | str, version: int, topic: str, body: bytes) -> Any:
        """What `Mapper.to_domain_event` does with a plaintext state (the same steps and errors)."""
        cls = resolve_topic(topic)
        try:
            event_state: dict[str, Any] = self.transcoder.decode(body)
        except Exception as e:
            msg = (
                f"Failed to deserialise state of stored event with topic '{topic}', "
                f"originator_id '{originator_id}' and originator_version {version}: {e}"
            )
            raise MapperDeserialisationError(msg) from e
        id_type = cast(Hashable, type(originator_id))  # as the library's Mapper passes it
        event_state["originator_id"] = find_id_convertor(cls, id_type)(originator_id)
        event_state["originator_version"] = version
        class_version = getattr(cls, "class_version", 1)
        from_version = event_state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(event_state)
            from_version += 1
        domain_event = object.__new__(cls)
        object.__setattr__(domain_event, "__dict__", event_state)
        return domain_event

    # ------------------------------------------------------------------ the audit's view

    genesis = GENESIS

    # As `SealFormat.unseal`, for a plaintext state (see `plaintext`).
    unseal = staticmethod(unseal)

    # ------------------------------------------------------------------ helpers

    def plaintext(self, state: bytes) -> bytes:
        """The transcoder's bytes of a stored state (undoing the cipher and the compressor)."""
        if self.cipher:
            state = self.cipher.decrypt(state)
        if self.compressor:
            state = self.compressor.decompress(state)
        return state

    def _wrap(self, state: bytes) -> bytes:
        if self.compressor:
            state = self.compressor.compress(state)
        if self.cipher:
            state = self.cipher.encrypt(state)
        return state
