"""Point-to-point messages between two ranks (a stage's activation and tangent bundle, an input
gradient), with shapes agreed once per key.

Shapes are agreed once. A message travels under a *key* that both ranks compute from the same
schedule state: the message kind, the stage pair and the micro-batch's rows (whatever determines
the shapes; `runtime.transport.message_key`). The first message of a key between a sender and a
receiver is preceded by a header (tensor count, dtypes, shapes) that the receiver reads on the
host and caches; every later message of that key is posted straight into fresh buffers of the
cached shapes with `irecv`: no header, no host read. Shapes that legitimately vary (a smaller last
micro-batch, a micro-batch without tangent rows, evaluation chunks, the alignment probe, BP's
gradients) vary with the key, so they get a header the first time each appears. `key=None`
sends a header every time (self-describing; the benchmark's link probe).

Mismatches fail loudly. A sender whose tensors differ from the shapes agreed for their key raises
`MessageMismatch` before sending anything. Every message without a header carries a tag (the same
size as a header: a marker, sequence number, checksums of the key and of the shapes), posted in
the same batch as the data and compared with what the receiver expected: on the CPU as soon as the
receive has waited (free: gloo's wait already blocked), on CUDA in `Link.check()` (the transport
calls it in `flush`, once per mini-batch, so no host read per message). A receiver that expected a
header and got a tag, or the reverse, or another key, another shape or another sequence number,
raises `MessageMismatch` naming both sides' keys.

Ordering invariant (what keeps NCCL from deadlocking or mismatching): between an ordered pair of
ranks (A -> B) messages are matched in the order they are posted. A posts its sends to B in the
order its schedule calls `send` for B's stages and B posts its receives in the order its schedule
calls `recv` for A's stages; the schedules make these calls in the same (micro-batch, stage) order
on both ranks. Both ranks therefore see the same keys in the same order and make the same
header / no-header decision for every message: each op on one side has its match, of the same
size, at the same position on the other. The only waits on sends are on this rank's *oldest*
sends (the in-flight cap, `flush`), whose receives the peer posts without waiting on anything this
rank does after them. Each agreed-shape cache holds at most `max_keys` keys, evicted oldest first:
both sides see the same key sequence, so they evict the same keys.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Hashable

import torch
import torch.distributed as dist

from ..runtime.transport import MessageMismatch

_SLOTS = 32  # int64 slots of a header or a tag
_HEADER_MARK, _TAG_MARK = 0x47524850, 0x47525447  # "GRHP", "GRTG"
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]

Spec = tuple[torch.dtype, tuple[int, ...]] | None  # one tensor's dtype and shape, or None
Desc = tuple[Spec, ...]


def describe(tensors: list[torch.Tensor | None]) -> Desc:
    return tuple(None if t is None else (t.dtype, tuple(t.shape)) for t in tensors)


def _checksum(obj: object) -> int:
    """Stable across processes (unlike hash() of strings): the repr's CRC-32."""
    return zlib.crc32(repr(obj).encode())


def _slots(mark: int, seq: int, key: Hashable, desc: Desc, body: list[int],
           device: torch.device) -> torch.Tensor:
    h = [mark, seq, _checksum(key), _checksum(desc), *body]
    if len(h) > _SLOTS:
        raise ValueError(f"too many dims to describe in a {_SLOTS}-slot header: {desc}")
    return torch.tensor(h + [0] * (_SLOTS - len(h)), dtype=torch.int64, device=device)


def _header_body(desc: Desc) -> list[int]:
    body = [len(desc)]
    for spec in desc:
        body += [-1, 0] if spec is None else [_DTYPES.index(spec[0]), len(spec[1]), *spec[1]]
    return body


def _parse_body(h: list[int]) -> Desc:
    out: list[Spec] = []
    i = 1
    for _ in range(h[0]):
        code, ndim = h[i], h[i + 1]
        out.append(None if code < 0 else (_DTYPES[code], tuple(h[i + 2:i + 2 + ndim])))
        i += 2 + ndim
    return tuple(out)


def _what(h: list[int]) -> str:
    kind = {_HEADER_MARK: "a header", _TAG_MARK: "a tag"}.get(h[0], "neither header nor tag")
    return f"{kind} (sequence {h[1]}, key checksum {h[2]}, shapes checksum {h[3]})"


class Link:
    """This rank's messages with one peer rank: the shapes agreed per key in each direction,
    sequence numbers, counters (`headers_sent`, `headers_received`, `messages_*`)."""

    def __init__(self, peer: int, device: torch.device | str = "cpu", max_keys: int = 4096):
        self.peer = peer
        self.device = torch.device(device)
        self.max_keys = max_keys
        self._sent: OrderedDict[Hashable, Desc] = OrderedDict()
        self._received: OrderedDict[Hashable, Desc] = OrderedDict()
        self.messages_sent = self.messages_received = 0
        self.headers_sent = self.headers_received = 0
        self._unchecked: list[tuple[torch.Tensor, list[int], Hashable]] = []

    def _remember(self, cache: OrderedDict, key: Hashable, desc: Desc) -> None:
        if key is None:
            return
        cache[key] = desc
        if len(cache) > self.max_keys:
            cache.popitem(last=False)

    def isend(self, tensors: list[torch.Tensor | None], key: Hashable = None) -> list:
        """Start sending `tensors` under `key`; returns the works to wait on (they keep the
        tensors alive)."""
        desc = describe(tensors)
        seq = self.messages_sent
        agreed = self._sent.get(key) if key is not None else None
        if key is not None and key in self._sent and agreed != desc:
            raise MessageMismatch(
                f"message {seq} to rank {self.peer} under key {key!r}: shapes {desc}, but "
                f"{agreed} were agreed for this key (the key must determine the shapes)")
        if key is None or key not in self._sent:
            first = _slots(_HEADER_MARK, seq, key, desc, _header_body(desc), self.device)
            self.headers_sent += 1
            self._remember(self._sent, key, desc)
        else:
            first = _slots(_TAG_MARK, seq, key, desc, [], self.device)
        self.messages_sent += 1
        ops = [dist.P2POp(dist.isend, first, self.peer)]
        ops += [dist.P2POp(dist.isend, t.contiguous(), self.peer)
                for t in tensors if t is not None and t.numel()]
        return dist.batch_isend_irecv(ops)

    def recv(self, key: Hashable = None) -> list[torch.Tensor | None]:
        """What the peer sent under `key`; blocks until it arrived (on CUDA: until the current
        stream waits for it)."""
        seq = self.messages_received
        self.messages_received += 1
        if key is None or key not in self._received:
            header = torch.empty(_SLOTS, dtype=torch.int64, device=self.device)
            dist.recv(header, self.peer)
            h = header.tolist()
            self.headers_received += 1
            if h[:3] != [_HEADER_MARK, seq, _checksum(key)]:
                raise MessageMismatch(
                    f"message {seq} from rank {self.peer}: expected the header of key {key!r} "
                    f"(its first message; checksum {_checksum(key)}), got {_what(h)}: the two "
                    "ranks disagree about the keys of their messages")
            desc = _parse_body(h[4:])
            self._remember(self._received, key, desc)
            tag = None
        else:
            desc = self._received[key]
            tag = torch.empty(_SLOTS, dtype=torch.int64, device=self.device)
        out = [None if s is None else torch.empty(s[1], dtype=s[0], device=self.device)
               for s in desc]
        ops = [] if tag is None else [dist.P2POp(dist.irecv, tag, self.peer)]
        ops += [dist.P2POp(dist.irecv, t, self.peer) for t in out if t is not None and t.numel()]
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        if tag is not None:
            expected = [_TAG_MARK, seq, _checksum(key), _checksum(desc)]
            if self.device.type == "cpu":
                self._check(tag.tolist(), expected, key)
            else:
                self._unchecked.append((tag, expected, key))
        return out

    def _check(self, h: list[int], expected: list[int], key: Hashable) -> None:
        if h[:4] != expected:
            raise MessageMismatch(
                f"message {expected[1]} from rank {self.peer}: expected a tag for key {key!r} "
                f"(checksum {expected[2]}, shapes checksum {expected[3]}), got {_what(h)}: the "
                "two ranks disagree about the keys or shapes of their messages")

    def check(self) -> None:
        """Compare the tags received on the GPU since the last check (one host read)."""
        if not self._unchecked:
            return
        tags = torch.stack([t[:4] for t, _, _ in self._unchecked]).tolist()
        unchecked, self._unchecked = self._unchecked, []
        for h, (_, expected, key) in zip(tags, unchecked):
            self._check(h, expected, key)

    def counters(self) -> dict[str, int]:
        return {"messages_sent": self.messages_sent, "messages_received": self.messages_received,
                "headers_sent": self.headers_sent, "headers_received": self.headers_received}


# Self-describing messages (a header every time), for callers without a key.

def isend(tensors: list[torch.Tensor | None], dst: int,
          device: torch.device | str = "cpu") -> list:
    """Start sending `tensors` (on `device`: CUDA for nccl) to rank `dst` with a header;
    returns the works to wait on."""
    return Link(dst, device).isend(tensors)


def recv(src: int, device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """Receive what `isend` sent from rank `src`, into tensors on `device`."""
    return Link(src, device).recv()


def wait_all(works: list) -> None:
    for w in works:
        w.wait()
