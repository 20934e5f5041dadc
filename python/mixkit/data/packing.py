"""Packing documents into fixed-length training sequences with cu_seqlens.

A document becomes `[BOS] + tokens + [EOS]` (each optional). One that fits in
seq_len stays whole; a longer one is cut into seq_len pieces (the last one
shorter), or raises with long_documents="error" (SFT: a cut answer loses its
prompt). Pieces fill sequences greedily in order; a piece that does not fit
in the space left starts the next sequence, and the space left becomes a
padding segment. So every sequence is exactly seq_len tokens, and its
cu_seqlens (int32, 0 .. seq_len) lists its segments: documents, pieces and
at most one trailing padding segment.

Labels for next-token training, per segment [s, e):
  labels[t] = tokens[t + 1] for s <= t < e - 1, and labels[e - 1] = -100,
so no loss crosses a boundary; a padding segment is all -100. With a loss
mask (SFT), labels[t] is also -100 where token t + 1 is not a target.

A stream packs one Documents epoch after epoch, each epoch in its own
permutation drawn from (seed, stream id, epoch). With shuffle_sequences the
packed sequences of an epoch are then read in a permutation of their own, so
consecutive sequences (one batch) come from different places in the corpus
rather than from consecutive pieces of one long document: a long file unlike
the rest (the stdlib's base64 test data) then fills one row of a batch, not
the whole batch for dozens of steps. The plan of an epoch is
computed once, in one pass over its documents' lengths, and cached; sequence k
is then a direct look-up, so resuming at any k costs no replay of the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .token_files import Documents

IGNORE_INDEX = -100
LONG_DOCUMENTS = ("split", "error")


class DocumentTooLongError(ValueError):
    """A document longer than seq_len with long_documents="error"."""


@dataclass
class _EpochPlan:
    order: np.ndarray  # document index per position in the epoch
    piece_doc: np.ndarray  # document index of each piece
    piece_start: np.ndarray  # offset of the piece in the document with BOS/EOS
    piece_len: np.ndarray
    seq_first: np.ndarray  # (n_seqs + 1,) first piece of each sequence
    seq_order: np.ndarray | None = None  # read order of the sequences (shuffle_sequences)

    @property
    def n_sequences(self) -> int:
        return len(self.seq_first) - 1


class PackedStream:
    """Sequence k (k = 0, 1, ...) of `docs` packed into seq_len-token sequences,
    epoch after epoch. `sequence(k)` -> (tokens int64 (L,), labels int64 (L,),
    cu_seqlens int32 (n + 1,))."""

    def __init__(self, docs: Documents, seq_len: int, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool = True, add_eos: bool = True, long_documents: str = "split",
                 shuffle: bool = True, seed: int = 0, stream_id: int = 0, pad_id: int = 0,
                 shuffle_sequences: bool = False):
        if seq_len < 2:
            raise ValueError(f"PackedStream: seq_len must be >= 2, got {seq_len}")
        if long_documents not in LONG_DOCUMENTS:
            raise ValueError(f"PackedStream: long_documents must be one of {LONG_DOCUMENTS}, got {long_documents!r}")
        if add_bos and bos_id is None:
            raise ValueError(f"{docs.name}: add_bos needs a bos_id (the tokenizer has no BOS token)")
        if add_eos and eos_id is None:
            raise ValueError(f"{docs.name}: add_eos needs an eos_id (the tokenizer has no EOS token)")
        if len(docs) == 0:
            raise ValueError(f"{docs.name}: no documents")
        self.docs, self.seq_len = docs, seq_len
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        self.long_documents, self.shuffle, self.seed, self.stream_id = long_documents, shuffle, seed, stream_id
        self.pad_id = pad_id
        self.shuffle_sequences = shuffle_sequences
        self.eff_lengths = docs.lengths + int(add_bos) + int(add_eos)
        if (self.eff_lengths == 0).any():
            raise ValueError(f"{docs.name}: empty documents and neither BOS nor EOS to add")
        if long_documents == "error" and (self.eff_lengths > seq_len).any():
            i = int(np.argmax(self.eff_lengths > seq_len))
            raise DocumentTooLongError(
                f"{docs.name}: document {i} has {int(self.eff_lengths[i])} tokens (BOS/EOS included), more than "
                f"seq_len {seq_len}; with long_documents='error' every document must fit in one sequence")
        self._plans: dict[int, _EpochPlan] = {}
        self._epoch_first: list[int] = [0]  # first global sequence index of each planned epoch

    # ------------------------------------------------------------ planning
    def _plan(self, epoch: int) -> _EpochPlan:
        plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        n = len(self.docs)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.stream_id, epoch]).permutation(n)
        else:
            order = np.arange(n)
        lens = self.eff_lengths[order]
        n_pieces = -(-lens // self.seq_len)  # ceil
        piece_doc = np.repeat(order, n_pieces)
        first_of_doc = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        piece_idx = np.arange(len(piece_doc)) - first_of_doc
        piece_start = piece_idx * self.seq_len
        piece_len = np.minimum(self.seq_len, np.repeat(lens, n_pieces) - piece_start)
        # Greedy fill: one pass, a piece opens a new sequence when it does not fit.
        seq_first = [0]
        used = 0
        for p, length in enumerate(piece_len.tolist()):
            if used + length > self.seq_len:
                seq_first.append(p)
                used = 0
            used += length
        seq_first.append(len(piece_len))
        plan = _EpochPlan(order, piece_doc, piece_start, piece_len, np.asarray(seq_first, dtype=np.int64))
        if self.shuffle_sequences:
            plan.seq_order = np.random.default_rng([self.seed, self.stream_id, epoch, 1]).permutation(
                plan.n_sequences)
        # Keep the last two epochs' plans (each is O(n_docs)): enough for a
        # stream read in order across an epoch boundary.
        self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
        self._plans[epoch] = plan
        return plan

    def _locate(self, k: int) -> tuple[int, int]:
        """(epoch, sequence index within it) of global sequence k."""
        if k < 0:
            raise IndexError(f"{self.docs.name}: sequence index {k} < 0")
        while self._epoch_first[-1] <= k:
            e = len(self._epoch_first) - 1
            self._epoch_first.append(self._epoch_first[-1] + self._plan(e).n_sequences)
        e = int(np.searchsorted(np.asarray(self._epoch_first), k, side="right")) - 1
        return e, k - self._epoch_first[e]

    def sequences_per_epoch(self, epoch: int = 0) -> int:
        return self._plan(epoch).n_sequences

    # --------------------------------------------------------- materialising
    def _piece(self, doc: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [start, start + length) of [BOS] + doc + [EOS], and their loss mask."""
        toks = self.docs[doc]
        mask = self.docs.mask(doc)
        b = int(self.add_bos)
        lo, hi = max(start - b, 0), min(start + length - b, len(toks))
        parts, mparts = [], []
        if b and start == 0:
            parts.append(np.array([self.bos_id]))
            mparts.append(np.array([False]))  # BOS is never a target
        parts.append(np.asarray(toks[lo:hi], dtype=np.int64))
        mparts.append(np.ones(max(hi - lo, 0), dtype=bool) if mask is None else np.asarray(mask[lo:hi], bool))
        if self.add_eos and start + length == self.eff_lengths[doc]:
            parts.append(np.array([self.eos_id]))
            mparts.append(np.array([True]))
        return np.concatenate(parts).astype(np.int64), np.concatenate(mparts)

    def sequence(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        e, i = self._locate(k)
        plan = self._plan(e)
        if plan.seq_order is not None:
            i = int(plan.seq_order[i])
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        cu = [0]
        pos = 0
        for p in range(int(plan.seq_first[i]), int(plan.seq_first[i + 1])):
            toks, mask = self._piece(int(plan.piece_doc[p]), int(plan.piece_start[p]), int(plan.piece_len[p]))
            n = len(toks)
            tokens[pos:pos + n] = toks
            labels[pos:pos + n - 1] = np.where(mask[1:], toks[1:], IGNORE_INDEX)
            pos += n
            cu.append(pos)
        if pos < self.seq_len:
            cu.append(self.seq_len)  # the padding segment
        return tokens, labels, np.asarray(cu, dtype=np.int32)


def collate(sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """B packed sequences -> one row of T = B * seq_len tokens, the batch format
    of mixkit training: input_ids (1, T) int64, labels (1, T) int64 (-100 =
    no loss), cu_seqlens (N + 1,) int32 from 0 to T, max_seqlen int."""
    import torch

    tokens = np.concatenate([s[0] for s in sequences])
    labels = np.concatenate([s[1] for s in sequences])
    cus, base = [np.zeros(1, dtype=np.int32)], 0
    for toks, _, cu in sequences:
        cus.append(cu[1:] + base)
        base += len(toks)
    cu_seqlens = np.concatenate(cus).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(tokens)[None],
        "labels": torch.from_numpy(labels)[None],
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(np.diff(cu_seqlens).max()),
    }


def sft_example(prompt_ids, answer_ids, *, bos_id: int, eos_id: int) -> tuple[list[int], list[bool]]:
    """One SFT example as (ids, loss_mask): [BOS] prompt answer [EOS], the mask
    True on the answer and the EOS (the loss covers answer tokens only)."""
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not answer_ids:
        raise ValueError("sft_example: empty answer (nothing to train on)")
    ids = [bos_id] + prompt_ids + answer_ids + [eos_id]
    return ids, [False] * (1 + len(prompt_ids)) + [True] * (len(answer_ids) + 1)


def sft_documents(examples, name: str = "sft") -> Documents:
    """SFT examples, each an (ids, loss_mask) pair from `sft_example` or
    mixkit.tokenizer.encode_chat (BOS/EOS already inside), as Documents with
    a loss mask. In a MixtureLoader use add_bos=False, add_eos=False,
    long_documents="error"."""
    examples = list(examples)
    return Documents.from_lists((e[0] for e in examples), name, masks=(e[1] for e in examples))


def sft_stream(examples, seq_len: int, *, shuffle: bool = True, seed: int = 0, pad_id: int = 0,
               name: str = "sft") -> PackedStream:
    """Pack SFT examples (see sft_documents) several to a sequence, each its
    own cu_seqlens segment; an example longer than seq_len raises
    DocumentTooLongError."""
    docs = sft_documents(examples, name)
    return PackedStream(docs, seq_len, bos_id=None, eos_id=None, add_bos=False, add_eos=False,
                        long_documents="error", shuffle=shuffle, seed=seed, pad_id=pad_id)
