"""`mixkit quickstart`: train a small Mistral-style model on this machine's
Python standard-library sources (no download) and show that it compresses
held-out code better than gzip.

The steps, each printed: the corpus (stdlib .py files; the held-out split is
the path hash's, stdlib_corpus.py), a byte-level BPE trained in seconds on the
training split only, gzip -9 and xz -9e on the held-out files, the model's
held-out bits per UTF-8 byte before and after training, a sample, and the run
directory: log.jsonl, loss.png (with the gzip level as a line),
summary.json and model/ (weights, config.json and the tokenizer, so that
`mixkit generate --model runs/quickstart/model` and `mixkit eval` need no
other flag).

The shapes and schedule come from `quickstart_config()`, which the CPU
training benchmark uses too. They are sized for about 4.5 minutes of wall
time on 2 idle CPU cores, evaluation included (the goal is at most 6): on a
CPU with native bf16 (AVX512-BF16 or AMX), 2000 steps of 8 x 256 tokens
(4.1M tokens, about one epoch of 12 MB of stdlib sources) in bf16 over
float32 master weights at about 17k tokens/s; elsewhere 900 float32 steps at
about 8k tokens/s. Measured on 2 idle cores of an AMD EPYC (AVX512-BF16),
held-out bits per byte against gzip -9's 1.683 and xz -9e's 1.575 on the
same files: 900 float32 steps 1.802 (250 s); 1800 bf16 steps 1.449 (240 s).
What did not help at 900 float32 steps: peak lr 6e-3 (1.908), a linear
decay to 0 (1.803), rows of 512 tokens with window 256 (4 x 512: 1.971).
Evaluation windows longer than 256 tokens change nothing (the model sees 128
tokens per layer), so the eval stays at 256 with stride 128.

Why the earlier quick start (byte-level, 8 x 256-byte batches, peak lr 3e-3)
spiked at step 178, from 2.1 to 5.5 nats: packed sequences were read in
order, so a batch was 8 consecutive pieces of one file, and from step 178 on
the batches were the start of test/test_plistlib.py, about 20 KB of base64
(6 bits of entropy per character: no model goes below 4.2 nats per byte on
it). With the weights from before the spike (step 176) those batches already
scored 4.37, 5.75 and 5.41 nats against 2.1-2.8 for the batches before, so the
jump itself was the data, not the update or the optimizer. What made it
costly was training on a dozen all-base64 batches in a row at lr 2e-3 with
gradient norms of 2 to 4.5 (clipped to 1): by step 186 the loss on the
ordinary batches of steps 170-176 had risen from 2.1-2.8 to 2.7-4.1 nats.
The fix is the data order: sequences are read in a shuffled order across the
epoch (shuffle_sequences, as Megatron and OLMo shuffle samples, not only
documents), so such a file is one row in many batches; warmup is 1/8 of the
run. With that, the peak lr can stay at 3e-3: at equal token counts, 8 x 256
batches at 3e-3 beat 16 x 256 at 2e-3 (held-out 2.77 bits per byte after
270k tokens against 2.88 after 410k; neither flagged a spike). The Trainer
warns on any spike left (train/spikes.py).
Adam's eps and beta2 were not involved: the loss was high before any update
from those batches.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .run import DataConfig, RunLog, _device, claim_run_dir

# Held-out text: the first held-out files in hash order up to this many
# UTF-8 bytes (a dozen files; compression ratios of single files vary from
# 1.2 to 2.4 bits per byte with gzip, so a handful would be a noisy yardstick).
HELDOUT_BYTES = 200_000


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or
    AMX-BF16 in /proc/cpuinfo's flags). There, bf16 matmuls through oneDNN
    run the quick start's training step about twice as fast as float32
    (18.8k against 9.3k tokens/s on a 2-core AMD EPYC); without them bf16 is
    emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def quickstart_config(device: str = "cpu", precision: str | None = None) -> tuple[TrainConfig, DataConfig]:
    """The quickstart's model, optimizer, schedule and data settings, as a
    `mixkit train` run would take them (the stdlib as its one component).

    precision: default bf16 (float32 master weights) on a GPU and on a CPU
    with native bf16 (cpu_has_native_bf16), else fp32. CPU: sized for about
    4.5 minutes on 2 cores, evaluation included: 2000 steps in bf16, 900 in
    float32 (half the speed). GPU: the same model, 3000 steps. The peak
    learning rate, warmup, batch and shuffled sequence order follow from the
    spike investigation (module docstring)."""
    cpu = torch.device(device).type == "cpu"
    if precision is None:
        precision = "bf16" if not cpu or cpu_has_native_bf16() else "fp32"
    steps = 3000 if not cpu else 2000 if precision == "bf16" else 900
    model = dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=2048,
                 sliding_window=128, max_seq_len=4096)
    tcfg = TrainConfig(model_name="tiny-mistral", model=model, lr=3e-3, warmup_steps=steps // 8, max_steps=steps,
                       weight_decay=0.1, precision=precision, eval_every=steps, loss_chunk_size=2048)
    # 12 MB of stdlib sources: about 4M tokens, one epoch of the bf16 run
    dcfg = DataConfig(tokenizer={"train_bpe": model["vocab_size"]}, seq_len=256, batch_size=8,
                      out_dir="runs/quickstart", components={"stdlib": {"stdlib": True, "weight": 1.0}}, eval_seq_len=256,
                      stdlib_bytes=12_000_000, shuffle_sequences=True)
    return tcfg, dcfg


def _capped(texts: list[str], max_bytes: int) -> list[str]:
    """Whole documents up to max_bytes of UTF-8 (at least part of the first)."""
    out, total = [], 0
    for t in texts:
        n = len(t.encode("utf-8"))
        if total + n > max_bytes:
            if not out:
                out.append(t.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            break
        out.append(t)
        total += n
    return out


def quickstart(steps: int | None = None, device: str | None = None, out_dir: str = "runs/quickstart",
               train_bytes: int | None = None, heldout_bytes: int = HELDOUT_BYTES, seed: int = 0,
               quiet: bool = False, tokenizer: str | int | None = None, overwrite: bool = False,
               **overrides) -> dict:
    """Run the quick start; returns its summary (also in out_dir/summary.json).
    An out_dir holding another run's outputs raises ConfigError unless
    overwrite (they are then removed first).

    steps, train_bytes: default quickstart_config()'s. tokenizer: "byte" or a
    BPE vocabulary size (default the config's). overrides: TrainConfig
    fields (precision: see quickstart_config), `model` (a dict merged into
    the model's), seq_len, batch_size, eval_seq_len and shuffle_sequences."""
    from .. import models
    from ..data import Component, MixtureLoader, stdlib_documents, tokenize_texts
    from ..evaluation import compression_baselines, evaluate
    from ..tokenizer import ByteTokenizer, train_bpe
    from .run_tokenizer import save_model_tokenizer
    from .trainer import Trainer

    t_start = time.time()
    dev = _device(device)
    tcfg, dcfg = quickstart_config(dev.type, overrides.pop("precision", None))
    seq_len = overrides.pop("seq_len", dcfg.seq_len)
    batch = overrides.pop("batch_size", dcfg.batch_size)
    shuffle = overrides.pop("shuffle_sequences", dcfg.shuffle_sequences)
    eval_seq_len = overrides.pop("eval_seq_len", dcfg.eval_seq_len) or seq_len
    model_over = {**tcfg.model, **overrides.pop("model", {})}
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"quickstart: steps must be an integer >= 1, got {steps!r}")
    steps = tcfg.max_steps if steps is None else steps
    if steps != tcfg.max_steps:  # the schedule scales with the run
        overrides = {"warmup_steps": max(1, steps * tcfg.warmup_steps // tcfg.max_steps),
                     "eval_every": steps, **overrides}
    tcfg = tcfg.replace(model=model_over, max_steps=steps, seed=seed, **overrides)
    vocab = tokenizer if tokenizer is not None else dcfg.tokenizer["train_bpe"]
    if vocab != "byte" and (not isinstance(vocab, int) or vocab < 258):
        raise ValueError(f"quickstart: tokenizer must be 'byte' or a BPE vocabulary size >= 258, got {vocab!r}")

    run_dir = Path(out_dir)
    removed = claim_run_dir(run_dir, "--out", overwrite=overwrite)  # a fresh run, never over another one
    if removed:
        print(f"starting over: removed {', '.join(removed)} from {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    train_texts = [d.text for d in stdlib_documents("train", max_bytes=train_bytes or dcfg.stdlib_bytes)]
    heldout_texts = _capped([d.text for d in stdlib_documents("heldout", max_bytes=None)], heldout_bytes)
    heldout_bytes_total = sum(len(t.encode("utf-8")) for t in heldout_texts)
    train_bytes_total = sum(len(t.encode("utf-8")) for t in train_texts)

    t0 = time.time()
    if vocab == "byte":
        tok = ByteTokenizer()
    else:  # trained on the training split only: no held-out text reaches it
        tok = train_bpe(train_texts, int(vocab))
    docs = tokenize_texts(train_texts, tok, name="stdlib")
    tok_seconds = time.time() - t0
    kind = "byte-level" if vocab == "byte" else f"byte-level BPE, {tok.vocab_size} tokens"
    print(f"corpus: {len(train_texts)} stdlib files ({train_bytes_total:,} bytes) for training; "
          f"held out: {len(heldout_texts)} files ({heldout_bytes_total:,} bytes)")
    print(f"tokenizer: {kind}, {train_bytes_total / docs.n_tokens:.2f} bytes per token, "
          f"{docs.n_tokens:,} training tokens ({tok_seconds:.1f} s)")
    baselines = compression_baselines(heldout_texts)
    print("held-out bits per byte of " + ", ".join(f"{k}: {v:.3f}" for k, v in baselines.items()) +
          " (each file compressed on its own)")

    args = tcfg.model_args().replace(vocab_size=tok.vocab_size)
    tcfg = tcfg.replace(model={**tcfg.model, "vocab_size": args.vocab_size})
    torch.manual_seed(seed)
    model = models.Transformer(args).init_weights(seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    loader = MixtureLoader([Component("stdlib", docs, weight=1.0)], seq_len, batch, seed=seed, bos_id=tok.bos_id,
                           eos_id=tok.eos_id, shuffle_sequences=shuffle)
    held = {"stdlib": heldout_texts}

    def eval_fn(trainer) -> dict:
        with trainer._compute_dtype_context():
            r = evaluate(trainer.model, tok, held, eval_seq_len, batch_size=8)["stdlib"]
        return {"stdlib/loss": r.loss, "stdlib/bpb": r.bits_per_byte, "stdlib/tokens": r.tokens}

    trainer = Trainer(model, tcfg, data=loader, eval_fn=eval_fn)
    print(f"model: {n_params / 1e6:.2f}M parameters ({args.n_layers} layers, dim {args.dim}, window "
          f"{args.sliding_window}, GQA {args.n_heads}/{args.n_kv_heads}); {steps} steps of {batch} x {seq_len} "
          f"tokens, peak lr {tcfg.lr:g}, {tcfg.precision}; on {dev}")
    before = eval_fn(trainer)
    print(f"held-out bits per byte before training: {before['stdlib/bpb']:.3f}")
    trainer.log_fn = log = RunLog(run_dir, steps, quiet)
    t_train = time.time()
    history = trainer.fit()
    train_seconds = time.time() - t_train
    after = history[-1] if "stdlib/bpb" in history[-1] else eval_fn(trainer)  # fit's last eval is the final one
    # The gzip level in the plot's units: nats per held-out token.
    per_token = heldout_bytes_total * math.log(2) / after["stdlib/tokens"]
    plot = log.close(levels={"gzip -9 (held out)": baselines["gzip -9"] * per_token})
    spikes = [h["step"] for h in history if h.get("spike")]
    bpb = after["stdlib/bpb"]
    verdict = ("below gzip -9" + (" and xz -9e" if bpb < baselines["xz -9e"] else "")
               if bpb < baselines["gzip -9"] else "not below gzip -9")
    print(f"held-out bits per byte after {steps} steps: {bpb:.3f}  ({verdict}: gzip -9 {baselines['gzip -9']:.3f}, "
          f"xz -9e {baselines['xz -9e']:.3f}; 8 = no compression)")
    if spikes:
        print(f"loss spikes at steps {spikes} (see the warnings above)")

    prompt = "class Stack:\n    def __init__(self):\n"
    with trainer._compute_dtype_context():
        new = models.generate(model.eval(), [tok.bos_id] + tok.encode(prompt), 100, temperature=0.6, top_k=20,
                              stop=[tok.eos_id], seed=seed)[0]
    print("sample:\n" + prompt + tok.decode(new))
    models.save(model, run_dir / "model")
    save_model_tokenizer(tok, run_dir / "model")
    summary = {"steps": steps, "params": n_params, "tokenizer": kind, "bpb_before": before["stdlib/bpb"],
               "bpb_after": bpb, "gzip_bpb": baselines["gzip -9"], "xz_bpb": baselines["xz -9e"],
               "heldout_files": len(heldout_texts), "heldout_bytes": heldout_bytes_total, "spikes": spikes,
               "train_seconds": train_seconds, "seconds": time.time() - t_start, "device": str(dev)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {run_dir}/log.jsonl, summary.json, model/" + (f", {plot.name}" if plot else "") +
          f"  ({summary['seconds']:.0f} s)")
    print(f"next: mixkit generate --model {run_dir / 'model'} --prompt \"import os\"")
    if not math.isfinite(bpb):
        raise RuntimeError("quickstart: the held-out loss is not finite")
    return summary
