"""A weighted mixture of components, deterministic and resumable at any step.

As in The Pile's table, each component has a weight or a number of epochs:
the sampling proportion of component c is w_c / sum(w), where w_c is its
weight, or, given epochs instead, epochs x its token count (the Pile's
"effective size"). Sequences are drawn one at a time: global sequence g
(g = (step * world_size + rank) * batch_size + i) comes from the component
drawn for g, and is that component's next packed sequence (PackedStream).

Determinism: the component of g is the (g mod 8192)-th categorical draw of a
NumPy Generator seeded with (seed, g // 8192), so it depends on nothing but the
seed and g; a component's sequence index is the count of earlier draws of it,
computed by vectorised replay of whole blocks (about 1 ms per 8192 sequences,
cached). The loader's state is therefore only the step counter, and
`batch(n)` is the same whether reached by iterating or by resuming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .packing import PackedStream, collate
from .token_files import Documents

_BLOCK = 8192


@dataclass
class Component:
    """A named corpus in a mixture: give `weight` (any positive scale) or
    `epochs` (weight = epochs x tokens)."""

    name: str
    documents: Documents
    weight: float | None = None
    epochs: float | None = None

    def effective_weight(self) -> float:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError(f"component {self.name!r}: give exactly one of weight and epochs")
        w = self.weight if self.weight is not None else self.epochs * self.documents.n_tokens
        what = "weight" if self.weight is not None else f"epochs ({self.epochs}) x tokens"
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"component {self.name!r}: {what} must be finite and > 0, got {w!r}")
        return float(w)


class MixtureLoader:
    """Batches of packed sequences from a weighted mixture (see the module doc).

    `batch(step)` -> the dict of `collate` (input_ids, labels, cu_seqlens,
    max_seqlen) plus "components": the component name of each of its
    batch_size sequences. Iterating yields batch(self.step) and advances
    self.step; `state_dict()` / `load_state_dict()` save and restore it.
    """

    def __init__(self, components: list[Component], seq_len: int, batch_size: int = 1, *, seed: int = 0,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = True, add_eos: bool = True,
                 long_documents: str = "split", shuffle: bool = True, pad_id: int | None = None,
                 rank: int = 0, world_size: int = 1, shuffle_sequences: bool = False):
        if not components:
            raise ValueError("MixtureLoader: no components")
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"MixtureLoader: duplicate component names in {names}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"MixtureLoader: need batch_size >= 1 and 0 <= rank < world_size, "
                             f"got {batch_size}, {rank}, {world_size}")
        weights = np.array([c.effective_weight() for c in components])
        self.components, self.names = components, names
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.streams = [PackedStream(c.documents, seq_len, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                                     add_eos=add_eos, long_documents=long_documents, shuffle=shuffle, seed=seed,
                                     stream_id=i, pad_id=pad, shuffle_sequences=shuffle_sequences)
                        for i, c in enumerate(components)]
        self.step = 0
        self._counts = [np.zeros(len(components), dtype=np.int64)]  # draws of each component before block b
        self._last_block: tuple[int, np.ndarray | None] = (-1, None)

    # ------------------------------------------------------------ sampling
    def _block(self, b: int) -> np.ndarray:
        if self._last_block[0] != b:
            choices = np.random.default_rng([self.seed, 0x6D6978, b]).choice(len(self.components), size=_BLOCK,
                                                                             p=self.probs)
            self._last_block = (b, choices)
        return self._last_block[1]

    def locate(self, g: int) -> tuple[int, int]:
        """(component index, its sequence index) of global sequence g."""
        b, j = divmod(g, _BLOCK)
        while len(self._counts) <= b:
            last = len(self._counts) - 1
            self._counts.append(self._counts[-1] + np.bincount(self._block(last), minlength=len(self.components)))
        choices = self._block(b)
        c = int(choices[j])
        return c, int(self._counts[b][c] + np.count_nonzero(choices[:j] == c))

    def batch(self, step: int) -> dict:
        if step < 0:
            raise IndexError(f"MixtureLoader: step {step} < 0")
        first = (step * self.world_size + self.rank) * self.batch_size
        seqs, comps = [], []
        for g in range(first, first + self.batch_size):
            c, k = self.locate(g)
            seqs.append(self.streams[c].sequence(k))
            comps.append(self.names[c])
        out = collate(seqs)
        out["components"] = comps
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.batch(self.step)
        self.step += 1
        return out

    # ------------------------------------------------------------ resuming
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "components": list(self.names),
                "probs": [float(p) for p in self.probs], "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"]; the rest of the state must match this loader
        (same seed, components, weights, seq_len, batch and world size)."""
        mine = self.state_dict()
        for key in ("seed", "components", "seq_len", "batch_size", "world_size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"MixtureLoader.load_state_dict: {key} is {state[key]!r} in the state but "
                                 f"{mine[key]!r} in this loader")
        if "probs" in state and not np.allclose(state["probs"], mine["probs"], rtol=1e-12, atol=0):
            raise ValueError("MixtureLoader.load_state_dict: the mixture weights differ from the saved ones")
        self.step = int(state["step"])

    # ------------------------------------------------------------ reporting
    def table(self, total_steps: int | None = None) -> list[dict]:
        """The Pile-style table: per component, its tokens, its share of the
        mixture and, given total_steps, the epochs that many steps make."""
        rows = []
        for c, p, s in zip(self.components, self.probs, self.streams):
            row = {"name": c.name, "documents": len(c.documents), "tokens": c.documents.n_tokens,
                   "proportion": float(p)}
            if total_steps is not None:
                seqs = p * total_steps * self.batch_size * self.world_size
                row["epochs"] = float(seqs / s.sequences_per_epoch(0))
            rows.append(row)
        return rows


def build_mixture(table: dict[str, dict], sources: dict[str, Documents], seq_len: int, batch_size: int = 1,
                  **kwargs) -> MixtureLoader:
    """A MixtureLoader from a table {name: {"weight": w} or {"epochs": e}} and
    the tokenized sources {name: Documents}; a name in the table that is not
    a source raises."""
    components = []
    for name, spec in table.items():
        if name not in sources:
            raise KeyError(f"build_mixture: unknown component {name!r}; known: {', '.join(sorted(sources))}")
        unknown = set(spec) - {"weight", "epochs"}
        if unknown:
            raise ValueError(f"build_mixture: component {name!r}: unknown keys {sorted(unknown)}")
        components.append(Component(name, sources[name], spec.get("weight"), spec.get("epochs")))
    return MixtureLoader(components, seq_len, batch_size, **kwargs)
