"""Secure aggregation of client update vectors (Bonawitz et al., CCS 2017, double masking).

A federated-learning server wants the sum of its clients' update vectors and nothing
more. Each client sends its (quantized) vector hidden under masks that cancel in the
sum, and the round still finishes when clients drop out after the key-sharing phase.
This module is the protocol alone: plain Python objects that exchange bytes and
tensors; whoever calls it moves them over the network (or, in ``run_round``, in-process).

Phases (U1 ⊇ U2 ⊇ U3 are the clients still present after each one)

0. Advertise keys. Client u makes two X25519 key pairs: (c_sk, c_pk) to encrypt what it
   sends to other clients through the server, (s_sk, s_pk) for pairwise masks. The
   server collects the public keys and broadcasts the roster U1.
1. Share keys. u draws a self-mask seed b_u and splits b_u and s_sk_u into t-of-|U1|
   Shamir shares. The pair of shares for v is encrypted with AES-GCM under a key that
   HKDF derives from the c-key agreement of u and v, and routed by the server. U2 is
   the set of clients whose shares went out; every client in U2 holds one share of
   every other U2 client's secrets (and keeps its own).
2. Masked input. u sends y_u = x_u + PRG(b_u) + Σ_{v∈U2, v>u} PRG(s_uv)
   − Σ_{v∈U2, v<u} PRG(s_uv)  (mod 2**RING_BITS), where s_uv is derived with HKDF
   from the s-key agreement, so u and v get the same seed and their masks cancel in
   y_u + y_v. U3 is the set of clients whose y arrived.
3. Unmask. The server announces U3 and the dropped U2 \\ U3. Each survivor returns its
   share of b_v for every v in U3 and of s_sk_v for every dropped v. From any t
   responses the server rebuilds those secrets, subtracts PRG(b_v) of survivors and
   the dropped clients' pairwise masks that are left in the survivors' y, and obtains
   Σ_{u∈U3} x_u.

What the server learns: that sum, who is in U1, U2 and U3, and the vector length.
What it cannot learn, as long as it follows the protocol (honest but curious) and fewer
than t clients collude with it: any single x_u or the sum of any strict subset of U3.
A survivor's pairwise masks with other survivors are never revealed (its s_sk stays
secret), and a dropped client's y, should it arrive late, stays hidden under PRG(b_v),
because b_v is only rebuilt for survivors. That is why a client never reveals both
the b share and the s_sk share of the same client (``SecAggClient.unmask`` refuses).

Not covered: an actively malicious server (lying about U3 to different clients,
substituting keys) needs the paper's signatures and consistency-check round, which
this module leaves out.

Numbers: values are fixed point (``Quantizer``) in the ring Z / 2**RING_BITS, held in
``torch.int64`` tensors in [0, 2**RING_BITS). Internally masks are added as numpy
``uint64``, whose wrap-around is arithmetic mod 2**64, and 2**RING_BITS divides 2**64,
so reducing once at the end gives the right ring element.

Errors: bad data from another party (a share, a masked input, a response) or a
protocol step that would break its guarantees raises ``SecAggError``; a caller's own
bad argument (a float tensor to ``masked_input``, a negative length) raises
``ValueError``.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PRIME",
    "RING_BITS",
    "AdvertisedKeys",
    "Quantizer",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "prg",
    "run_round",
    "shamir_reconstruct",
    "shamir_split",
]

RING_BITS = 48
_RING = 1 << RING_BITS
_RING_MASK = _RING - 1
_HALF = 1 << (RING_BITS - 1)

# Shamir's field: a Mersenne prime well above any 32-byte secret, so a secret is one
# field element. A share value is below PRIME and fits in 66 bytes.
PRIME = 2**521 - 1
_SHARE_BYTES = (PRIME.bit_length() + 7) // 8
_SEED_BYTES = 32  # b_u, s_sk and every derived seed or key
_NONCE_BYTES = 12  # AES-GCM
_ID_BYTES = 8


class SecAggError(RuntimeError):
    """The round cannot go on safely: bad data from another party, or a step out of order."""


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class Quantizer:
    """Fixed point in the ring: ``value * 2**scale_bits``, rounded, mod 2**RING_BITS.

    Ring elements at or above 2**(RING_BITS-1) stand for negative numbers (two's
    complement), so a sum decodes right as long as it stays within ±2**(RING_BITS-1).
    """

    scale_bits: int = 24

    def __post_init__(self) -> None:
        if not 0 <= self.scale_bits < RING_BITS - 1:
            raise ValueError(f"scale_bits must be in [0, {RING_BITS - 1}), got {self.scale_bits}")

    def _max_int(self, n_summands: int) -> int:
        # n summands of magnitude <= this sum to at most 2**(RING_BITS-1) - 1 in magnitude
        if n_summands < 1:
            raise ValueError(f"n_summands must be >= 1, got {n_summands}")
        return (_HALF - 1) // n_summands

    def max_abs(self, n_summands: int) -> float:
        """The largest |value| per summand that ``n_summands`` summands hold without wrapping.

        Rounded down to a float32 number (a relative 2**-24 below the exact bound), so
        that ``x.clamp(-m, m)`` on a float32 tensor, which rounds ``m`` to float32,
        cannot land just above the bound and make ``encode`` refuse.
        """
        exact = self._max_int(n_summands) / 2**self.scale_bits  # exact in float64
        m = np.float32(exact)
        if float(m) > exact:
            m = np.nextafter(m, np.float32(0))
        return float(m)

    def encode(self, x: torch.Tensor, n_summands: int = 1) -> torch.Tensor:
        """Float tensor -> int64 ring elements in [0, 2**RING_BITS).

        ``n_summands`` (default 1: the value itself must fit) tightens the bound to what
        a sum of that many encoded values can hold; ValueError names the bound exceeded.
        """
        if x.is_complex():
            raise ValueError("cannot encode a complex tensor")
        # float64 holds every float32 exactly, and scaling by a power of two is exact
        x64 = x.detach().to(device="cpu", dtype=torch.float64)
        if x64.numel() == 0:
            return torch.zeros(x64.shape, dtype=torch.int64)
        if not bool(torch.isfinite(x64).all()):
            raise ValueError("cannot encode non-finite values (NaN or inf)")
        q = torch.round(x64 * 2.0**self.scale_bits)
        limit = self._max_int(n_summands)
        # compare the rounded integers, not the floats: the bound is on what is summed
        biggest = float(q.abs().max())
        if biggest > limit:
            raise ValueError(
                f"|x| up to {float(x64.abs().max()):.6g} exceeds max_abs({n_summands}) = "
                f"{self.max_abs(n_summands):.6g} (scale_bits={self.scale_bits}, "
                f"RING_BITS={RING_BITS})"
            )
        return torch.remainder(q.to(torch.int64), _RING)

    def decode(self, total: torch.Tensor) -> torch.Tensor:
        """int64 ring elements (e.g. a sum) -> float64; >= 2**(RING_BITS-1) reads as negative."""
        if total.dtype.is_floating_point or total.is_complex() or total.dtype == torch.bool:
            raise ValueError(f"decode takes an integer tensor, got {total.dtype}")
        r = torch.remainder(total.detach().to(device="cpu", dtype=torch.int64), _RING)
        r = torch.where(r >= _HALF, r - _RING, r)
        # |r| < 2**47 < 2**53: the conversion to float64 is exact
        return r.to(torch.float64) / 2.0**self.scale_bits


# --------------------------------------------------------------------------- Shamir


def _lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_i with f(0) = Σ l_i f(x_i) for any polynomial of degree < len(xs)."""
    coeffs = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


def shamir_split(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """t-of-n shares of ``secret``: {x: f(x)} with f random of degree t-1 and f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element in [0, PRIME)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in (0, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    poly = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def shamir_reconstruct(shares: Mapping[int, int]) -> int:
    """f(0) from points {x: f(x)}: the secret when there are at least t of them.

    With fewer than t points the result is an unrelated field element; nothing here can
    tell, so callers check what they rebuild where they can.
    """
    if not shares:
        raise ValueError("no shares to reconstruct from")
    xs = list(shares)
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be in (0, PRIME)")
    lam = _lagrange_at_zero(xs)
    return sum(li * shares[x] for li, x in zip(lam, xs, strict=True)) % PRIME


# --------------------------------------------------------------------------- primitives


def _id_bytes(client: int) -> bytes:
    return client.to_bytes(_ID_BYTES, "big")


def _context(label: bytes, round_id: bytes, *clients: int) -> bytes:
    # length-prefixed round id: no two (round_id, ids) pairs share an encoding
    return (
        label
        + len(round_id).to_bytes(4, "big")
        + round_id
        + b"".join(_id_bytes(c) for c in clients)
    )


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_SEED_BYTES, salt=None, info=info).derive(shared)


def _agree(sk: X25519PrivateKey, pk: bytes, what: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as e:  # a low-order point gives an all-zero secret
        raise SecAggError(f"X25519 agreement failed for {what}: {e}") from e


def _pair_seed(s_sk: X25519PrivateKey, s_pk: bytes, round_id: bytes, u: int, v: int) -> bytes:
    """The seed of the pairwise mask of u and v: the same from either side."""
    lo, hi = min(u, v), max(u, v)
    shared = _agree(s_sk, s_pk, f"the mask of clients {lo} and {hi}")
    return _hkdf(shared, _context(b"shoal-secagg/mask", round_id, lo, hi))


def _keystream_words(seed: bytes, length: int) -> np.ndarray:
    """AES-256-CTR keystream under key ``seed``, as ``length`` little-endian uint64 words.

    A seed is used for one vector of one round only (b_u is fresh, s_uv binds the
    round id), so a fixed zero counter block is safe.
    """
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8")


def prg(seed: bytes, length: int) -> torch.Tensor:
    """Expand a 32-byte seed into ``length`` uniform ring elements (int64 in [0, 2**RING_BITS))."""
    if len(seed) != _SEED_BYTES:
        raise ValueError(f"seed must be {_SEED_BYTES} bytes")
    words = _keystream_words(seed, length) & np.uint64(_RING_MASK)
    return torch.from_numpy(words.view(np.int64))


def _add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """acc += sign * PRG(seed) for each (seed, sign), in place, mod 2**64 (so mod 2**RING_BITS).

    The full 64-bit words are added and reduced once by the caller: reducing each mask
    to RING_BITS first gives the same ring element and costs a pass per mask. One
    keystream buffer is reused for all masks, which spares a fresh 8-bytes-per-element
    allocation (and its page faults) per mask.
    """
    n = acc.shape[0]
    zeros = memoryview(bytes(8 * n))
    buf = bytearray(8 * n + 15)  # update_into wants room for one block more
    words = np.frombuffer(buf, dtype="<u8", count=n)
    for seed, sign in masks:
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        written = encryptor.update_into(zeros, buf)
        assert written == 8 * n  # CTR is a stream mode: no bytes held back
        if sign > 0:
            acc += words
        else:
            acc -= words


def _to_ring_tensor(acc: np.ndarray) -> torch.Tensor:
    acc &= np.uint64(_RING_MASK)
    return torch.from_numpy(acc.view(np.int64))


def _check_client_id(client: object) -> int:
    # ids are Shamir points (id + 1) and 8-byte fields in the encrypted shares
    if isinstance(client, bool) or not isinstance(client, int):
        raise ValueError(f"client ids are ints, got {client!r}")
    if not 0 <= client < 2**63 - 1:
        raise ValueError(f"client ids must be in [0, 2**63 - 1), got {client}")
    return client


def _check_round_and_length(round_id: bytes, length: int) -> None:
    if not isinstance(round_id, bytes):
        raise ValueError("round_id must be bytes")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")


def _check_threshold(threshold: int) -> None:
    # with t = 1 every share equals the secret: each client would hold all others' secrets
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
        raise ValueError(f"threshold must be an int >= 2, got {threshold!r}")


def _ring_problem(t: torch.Tensor, length: int) -> str | None:
    """Why ``t`` is not a vector of ``length`` ring elements, or None."""
    if not isinstance(t, torch.Tensor):
        return f"expected a torch.Tensor, got {type(t).__name__}"
    if t.dtype != torch.int64:
        return f"dtype must be torch.int64, got {t.dtype}"
    if t.shape != (length,):
        return f"shape must be ({length},), got {tuple(t.shape)}"
    if bool((t < 0).any()) or bool((t >= _RING).any()):
        return f"values must lie in [0, 2**{RING_BITS})"
    return None


def _as_uint64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.uint64)  # a copy: the caller's tensor is kept


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class AdvertisedKeys:
    """A client's public keys for one round (phase 0), as broadcast in the roster."""

    client: int
    c_pk: bytes  # X25519 public key for encrypting shares
    s_pk: bytes  # X25519 public key for pairwise masks


def _check_roster(keys: Sequence[AdvertisedKeys]) -> dict[int, AdvertisedKeys]:
    roster: dict[int, AdvertisedKeys] = {}
    seen_pks: set[bytes] = set()
    for k in keys:
        if not isinstance(k, AdvertisedKeys):
            raise SecAggError(f"expected AdvertisedKeys, got {type(k).__name__}")
        try:
            _check_client_id(k.client)
        except ValueError as e:
            raise SecAggError(str(e)) from e
        if k.client in roster:
            raise SecAggError(f"duplicate client id {k.client} in the key list")
        for pk in (k.c_pk, k.s_pk):
            if not isinstance(pk, bytes) or len(pk) != 32:
                raise SecAggError(f"client {k.client}: public keys must be 32 bytes")
            # a reused key would make two pairwise seeds (or share keys) coincide
            if pk in seen_pks:
                raise SecAggError(f"client {k.client}: duplicate public key in the key list")
            seen_pks.add(pk)
        roster[k.client] = k
    return roster


@dataclass(frozen=True)
class _HeldShares:
    """The shares one client holds of another client's (or its own) two secrets."""

    b: int  # share of the self-mask seed b_v
    s: int  # share of the mask private key s_sk_v


class SecAggClient:
    """One client of one round. Call advertise, share_keys, receive_shares, masked_input,
    unmask in that order; each at most once, except unmask (repeats must be consistent)."""

    def __init__(self, client: int, round_id: bytes, length: int) -> None:
        self.client = _check_client_id(client)
        _check_round_and_length(round_id, length)
        self.round_id = round_id
        self.length = length
        # Fresh secrets for every round: reusing b_u or s_sk across rounds would let a
        # server that learned them once (as survivor / as dropped) unmask later inputs.
        self._c_sk = X25519PrivateKey.from_private_bytes(os.urandom(_SEED_BYTES))
        self._s_sk_raw = os.urandom(_SEED_BYTES)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_raw)
        self._b = os.urandom(_SEED_BYTES)
        self._keys = AdvertisedKeys(
            client,
            self._c_sk.public_key().public_bytes_raw(),
            self._s_sk.public_key().public_bytes_raw(),
        )
        self._roster: dict[int, AdvertisedKeys] | None = None
        self._threshold = 0
        self._share_keys: dict[int, bytes] = {}  # AES-GCM key per peer
        self._own: _HeldShares | None = None  # this client's shares of its own secrets
        self._held: dict[int, _HeldShares] | None = None  # by owner; U2 as this client saw it
        self._sent_masked = False
        self._told_survivor: set[int] = set()
        self._told_dropped: set[int] = set()

    def advertise(self) -> AdvertisedKeys:
        """Phase 0: the public keys to send to the server."""
        return self._keys

    def _share_aad(self, sender: int, recipient: int) -> bytes:
        # binds a ciphertext to its round and direction: it cannot be replayed elsewhere
        return _context(b"shoal-secagg/share-ad", self.round_id, sender, recipient)

    def share_keys(self, roster: Sequence[AdvertisedKeys], threshold: int) -> dict[int, bytes]:
        """Phase 1: encrypted shares of b_u and s_sk_u for every other client, by recipient."""
        if self._roster is not None:
            raise SecAggError(f"client {self.client}: share_keys called twice")
        _check_threshold(threshold)
        peers = _check_roster(roster)
        if peers.get(self.client) != self._keys:
            raise SecAggError(f"client {self.client}: the roster does not hold this client's keys")
        if len(peers) < threshold:
            raise SecAggError(f"roster of {len(peers)} clients is below the threshold {threshold}")
        self._roster, self._threshold = peers, threshold

        points = {v: v + 1 for v in peers}  # x = 0 is where the secret sits
        b_shares = shamir_split(int.from_bytes(self._b, "big"), list(points.values()), threshold)
        s_shares = shamir_split(
            int.from_bytes(self._s_sk_raw, "big"), list(points.values()), threshold
        )
        self._own = _HeldShares(b_shares[points[self.client]], s_shares[points[self.client]])

        out: dict[int, bytes] = {}
        for v, keys in peers.items():
            if v == self.client:
                continue
            lo, hi = min(self.client, v), max(self.client, v)
            shared = _agree(self._c_sk, keys.c_pk, f"the share key of clients {lo} and {hi}")
            key = _hkdf(shared, _context(b"shoal-secagg/share-key", self.round_id, lo, hi))
            self._share_keys[v] = key
            plaintext = (
                _id_bytes(self.client)
                + _id_bytes(v)
                + b_shares[points[v]].to_bytes(_SHARE_BYTES, "big")
                + s_shares[points[v]].to_bytes(_SHARE_BYTES, "big")
            )
            nonce = os.urandom(_NONCE_BYTES)
            out[v] = nonce + AESGCM(key).encrypt(nonce, plaintext, self._share_aad(self.client, v))
        return out

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Phase 1 end: decrypt the shares other clients sent this one, keyed by sender.

        The senders (and this client) are U2 as this client sees it: the clients whose
        pairwise masks go into its masked input.
        """
        if self._roster is None:
            raise SecAggError(f"client {self.client}: receive_shares before share_keys")
        if self._held is not None:
            raise SecAggError(f"client {self.client}: receive_shares called twice")
        assert self._own is not None
        held: dict[int, _HeldShares] = {self.client: self._own}
        for sender, ct in ciphertexts.items():
            if sender == self.client or sender not in self._roster:
                raise SecAggError(f"client {self.client}: unexpected shares from client {sender}")
            if not isinstance(ct, bytes) or len(ct) <= _NONCE_BYTES:
                raise SecAggError(f"share ciphertext from client {sender} is malformed")
            nonce, body = ct[:_NONCE_BYTES], ct[_NONCE_BYTES:]
            try:
                plaintext = AESGCM(self._share_keys[sender]).decrypt(
                    nonce, body, self._share_aad(sender, self.client)
                )
            except InvalidTag as e:
                raise SecAggError(
                    f"share ciphertext from client {sender} failed authentication "
                    f"(tampered, or not for client {self.client} in this round)"
                ) from e
            ids, rest = plaintext[: 2 * _ID_BYTES], plaintext[2 * _ID_BYTES :]
            if ids != _id_bytes(sender) + _id_bytes(self.client) or len(rest) != 2 * _SHARE_BYTES:
                raise SecAggError(f"share plaintext from client {sender} is malformed")
            b = int.from_bytes(rest[:_SHARE_BYTES], "big")
            s = int.from_bytes(rest[_SHARE_BYTES:], "big")
            if b >= PRIME or s >= PRIME:
                raise SecAggError(f"share from client {sender} is not a field element")
            held[sender] = _HeldShares(b, s)
        if len(held) < self._threshold:
            raise SecAggError(
                f"client {self.client}: only {len(held)} clients (with itself) shared keys, "
                f"below the threshold {self._threshold}"
            )
        self._held = held

    def masked_input(self, x: torch.Tensor) -> torch.Tensor:
        """Phase 2: y = x + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv) mod 2**RING_BITS.

        v ranges over the clients whose shares this client received. Only one masked
        input per round: two under the same masks would reveal their difference.
        """
        if self._held is None:
            raise SecAggError(f"client {self.client}: masked_input before receive_shares")
        if self._sent_masked:
            raise SecAggError(f"client {self.client}: masked_input called twice")
        problem = _ring_problem(x, self.length)
        if problem is not None:
            raise ValueError(f"client {self.client}: x {problem}")
        assert self._roster is not None
        roster, u = self._roster, self.client
        pairwise = (
            (_pair_seed(self._s_sk, roster[v].s_pk, self.round_id, u, v), +1 if v > u else -1)
            for v in self._held
            if v != u
        )
        acc = _as_uint64(x)
        _add_masks(acc, itertools.chain([(self._b, +1)], pairwise))
        self._sent_masked = True
        return _to_ring_tensor(acc)

    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int]
    ) -> dict[int, tuple[str, int]]:
        """Phase 3: ("b", share of b_v) for each survivor v, ("s", share of s_sk_v) for each
        dropped v. Never both kinds for one client, in this call or across calls."""
        if not self._sent_masked or self._held is None:
            raise SecAggError(f"client {self.client}: unmask before masked_input")
        alive, gone = set(survivors), set(dropped)
        both = alive & gone
        if both:
            raise SecAggError(f"clients {sorted(both)} are listed both as survivors and dropped")
        if self.client not in alive:
            raise SecAggError(f"client {self.client} is not in the survivors it was sent")
        unknown = (alive | gone) - set(self._held)
        if unknown:
            raise SecAggError(f"clients {sorted(unknown)} did not share keys with {self.client}")
        if len(alive) < self._threshold:
            raise SecAggError(f"{len(alive)} survivors are below the threshold {self._threshold}")
        flipped = (alive & self._told_dropped) | (gone & self._told_survivor)
        if flipped:
            # b_v and s_sk_v together unmask v's input on its own
            raise SecAggError(
                f"client {self.client} refuses to reveal both the b and the s share of "
                f"clients {sorted(flipped)}"
            )
        self._told_survivor |= alive
        self._told_dropped |= gone
        out: dict[int, tuple[str, int]] = {v: ("b", self._held[v].b) for v in sorted(alive)}
        out.update({v: ("s", self._held[v].s) for v in sorted(gone)})
        return out


# --------------------------------------------------------------------------- server


def _response_matches(response: object, expected: dict[int, str]) -> bool:
    """Whether an unmask response holds exactly the requested kind of share per client."""
    if not isinstance(response, dict) or set(response) != set(expected):
        return False
    for v, entry in response.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] == expected[v]):
            return False
        share = entry[1]
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share < PRIME:
            return False
    return True


class SecAggServer:
    """The server of one round: routes shares, sums masked inputs, removes the masks."""

    def __init__(self, round_id: bytes, length: int, threshold: int) -> None:
        _check_round_and_length(round_id, length)
        _check_threshold(threshold)
        self.round_id = round_id
        self.length = length
        self.threshold = threshold
        self._roster: dict[int, AdvertisedKeys] | None = None
        self._u2: list[int] | None = None
        self._masked_from: set[int] = set()
        # running sum of the masked inputs: the server needs nothing else of them
        self._sum = np.zeros(length, dtype=np.uint64)
        self._u3: list[int] | None = None

    def receive_keys(self, keys: Sequence[AdvertisedKeys]) -> list[AdvertisedKeys]:
        """Phase 0: check the advertised keys; returns the roster U1 to broadcast."""
        if self._roster is not None:
            raise SecAggError("receive_keys called twice")
        roster = _check_roster(keys)
        for k in roster.values():
            for pk in (k.c_pk, k.s_pk):
                try:
                    X25519PublicKey.from_public_bytes(pk)
                except ValueError as e:
                    raise SecAggError(f"client {k.client}: invalid X25519 public key") from e
        if len(roster) < self.threshold:
            raise SecAggError(f"{len(roster)} clients are below the threshold {self.threshold}")
        self._roster = roster
        return [roster[c] for c in sorted(roster)]

    def route_shares(self, outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Phase 1: sender -> recipient -> ct becomes recipient -> sender -> ct.

        The senders are U2. Only U2 members get shares: a client that did not share
        keys is out of the round, and every U2 member must get every other's shares
        so that all of them mask against the same U2.
        """
        if self._roster is None:
            raise SecAggError("route_shares before receive_keys")
        if self._u2 is not None:
            raise SecAggError("route_shares called twice")
        u2 = set(outgoing)
        strangers = u2 - set(self._roster)
        if strangers:
            raise SecAggError(f"shares from clients {sorted(strangers)} not in the roster")
        if len(u2) < self.threshold:
            raise SecAggError(
                f"{len(u2)} clients shared keys, below the threshold {self.threshold}"
            )
        for sender, cts in outgoing.items():
            missing = u2 - {sender} - set(cts)
            if missing:
                raise SecAggError(f"client {sender} sent no shares for clients {sorted(missing)}")
            extra = set(cts) - set(self._roster)
            if sender in cts or extra:
                raise SecAggError(f"client {sender} addressed shares outside the roster")
        self._u2 = sorted(u2)
        return {r: {s: outgoing[s][r] for s in self._u2 if s != r} for r in self._u2}

    def receive_masked(self, client: int, y: torch.Tensor) -> None:
        """Phase 2: take one client's masked input (the server never sees x)."""
        if self._u2 is None:
            raise SecAggError("receive_masked before route_shares")
        if self._u3 is not None:
            # after the unmask request a late client counts as dropped: its s_sk may
            # be revealed, so its input must not be used
            raise SecAggError(f"masked input from client {client} arrived after the unmask request")
        if client not in self._u2:
            raise SecAggError(f"masked input from client {client}, which did not share keys")
        if client in self._masked_from:
            raise SecAggError(f"second masked input from client {client}")
        problem = _ring_problem(y, self.length)
        if problem is not None:
            raise SecAggError(f"masked input from client {client}: {problem}")
        self._sum += _as_uint64(y)
        self._masked_from.add(client)

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """Phase 3 start: (survivors U3, dropped U2 \\ U3), fixed from now on."""
        if self._u2 is None:
            raise SecAggError("unmask_request before route_shares")
        if self._u3 is None:
            if len(self._masked_from) < self.threshold:
                raise SecAggError(
                    f"only {len(self._masked_from)} masked inputs arrived, below the threshold "
                    f"{self.threshold}: the masks cannot be removed"
                )
            self._u3 = sorted(self._masked_from)
        return list(self._u3), [c for c in self._u2 if c not in self._masked_from]

    def finish(self, responses: dict[int, dict[int, tuple[str, int]]]) -> torch.Tensor:
        """Phase 3 end: from survivors' shares, remove the masks; returns Σ_{u∈U3} x_u."""
        if self._u3 is None or self._u2 is None or self._roster is None:
            raise SecAggError("finish before unmask_request")
        survivors, dropped = self.unmask_request()
        expected = {v: "b" for v in survivors} | {v: "s" for v in dropped}
        for w, response in responses.items():
            if w not in survivors:
                raise SecAggError(f"unmask response from client {w}, which is not a survivor")
            if not _response_matches(response, expected):
                raise SecAggError(f"unmask response from client {w} does not match the request")
        if len(responses) < self.threshold:
            raise SecAggError(
                f"{len(responses)} unmask responses, below the threshold {self.threshold}"
            )
        # Any t responders will do; the same t for every secret shares one set of
        # Lagrange coefficients.
        responders = sorted(responses)[: self.threshold]
        lam = _lagrange_at_zero([w + 1 for w in responders])

        def rebuild(v: int) -> int:
            return (
                sum(li * responses[w][v][1] for li, w in zip(lam, responders, strict=True)) % PRIME
            )

        # Rebuild and check every secret before the (costly) mask removal starts.
        masks: list[tuple[bytes, int]] = []
        for v in survivors:
            b = rebuild(v)
            if b >= 1 << (8 * _SEED_BYTES):
                raise SecAggError(f"the shares of b_{v} are inconsistent")
            masks.append((b.to_bytes(_SEED_BYTES, "big"), -1))
        for v in dropped:
            s_raw = rebuild(v)
            if s_raw >= 1 << (8 * _SEED_BYTES):
                raise SecAggError(f"the shares of s_sk_{v} are inconsistent")
            s_sk = X25519PrivateKey.from_private_bytes(s_raw.to_bytes(_SEED_BYTES, "big"))
            # the rebuilt key must match what v advertised, or the shares were bad
            if s_sk.public_key().public_bytes_raw() != self._roster[v].s_pk:
                raise SecAggError(f"the shares of s_sk_{v} do not rebuild its advertised key")
            for u in survivors:
                # y_u holds +PRG(s_uv) if v > u, -PRG(s_uv) if v < u: take it back out
                seed = _pair_seed(s_sk, self._roster[u].s_pk, self.round_id, u, v)
                masks.append((seed, -1 if v > u else +1))
        acc = self._sum.copy()
        _add_masks(acc, masks)
        return _to_ring_tensor(acc)


# --------------------------------------------------------------------------- in-process round


def run_round(
    inputs: dict[int, torch.Tensor],
    threshold: int,
    drop_after_sharing: Sequence[int] = (),
    round_id: bytes = b"r",
) -> torch.Tensor:
    """Run one whole round in-process; returns the ring sum of the survivors' inputs.

    ``inputs`` maps client id to int64 ring elements (e.g. ``Quantizer().encode(x)``),
    all of one length. Clients in ``drop_after_sharing`` share keys but never send a
    masked input.
    """
    if not inputs:
        raise ValueError("run_round needs at least one client")
    lengths = {int(x.numel()) for x in inputs.values()}
    if len(lengths) != 1:
        raise ValueError(f"all inputs must have one length, got {sorted(lengths)}")
    unknown = set(drop_after_sharing) - set(inputs)
    if unknown:
        raise ValueError(f"drop_after_sharing names clients without inputs: {sorted(unknown)}")
    length = lengths.pop()
    clients = {c: SecAggClient(c, round_id, length) for c in sorted(inputs)}
    server = SecAggServer(round_id, length, threshold)

    roster = server.receive_keys([cl.advertise() for cl in clients.values()])
    inbox = server.route_shares({c: cl.share_keys(roster, threshold) for c, cl in clients.items()})
    for c, cts in inbox.items():
        clients[c].receive_shares(cts)
    for c, cl in clients.items():
        if c not in drop_after_sharing:
            server.receive_masked(c, cl.masked_input(inputs[c]))
    survivors, dropped = server.unmask_request()
    return server.finish({c: clients[c].unmask(survivors, dropped) for c in survivors})
