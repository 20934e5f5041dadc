"""The quick start's pieces: the loss-spike warning, the trained BPE
tokenizer, model directories that carry their tokenizer, the gzip/xz
baselines and tokenizer-independent bits per byte."""
from __future__ import annotations

import gzip
import json
import logging
import lzma
import math
import shutil
import subprocess

import pytest
import torch

from mixkit import models
from mixkit.cli import main
from mixkit.data import stdlib_documents
from mixkit.evaluation import compression_baselines, evaluate
from mixkit.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from mixkit.train import TrainConfig
from mixkit.train.spikes import SpikeDetector
from mixkit.train.trainer import Trainer

pytest.importorskip("tokenizers")


# ---- loss spikes ---------------------------------------------------------------------------------------------------

def test_spike_detector_rule():
    det = SpikeDetector(factor=1.3, window=4, start=6)
    smooth = [5.0, 4.0, 3.5, 3.2, 3.0, 2.9, 2.85, 2.8, 2.9, 2.75, 2.8, 2.7]
    assert [det.check(i, v) for i, v in enumerate(smooth)] == [None] * len(smooth)
    assert det.check(12, 2.8 * 1.31) == pytest.approx(2.775)  # 1.3 x the median of 2.9, 2.75, 2.8, 2.7
    det = SpikeDetector(factor=1.3, window=4, start=6)
    # during warmup a jump is not flagged, and a non-finite loss is neither flagged nor remembered
    assert [det.check(i, v) for i, v in enumerate([3.0, 3.0, 3.0, 3.0, 9.0, math.nan])] == [None] * 6
    assert list(det.recent) == [3.0, 3.0, 3.0, 9.0]
    with pytest.raises(ValueError, match="factor"):
        SpikeDetector(factor=1.0)


def _trainer(**cfg):
    args = models.CONFIGS["tiny-llama"].replace(vocab_size=64, n_layers=1, dim=64, head_dim=32, hidden_dim=128)
    model = models.Transformer(args).init_weights(0)
    cfg = TrainConfig(model_name="tiny-llama", model=dataclass_dict(args), lr=1e-2, warmup_steps=5,
                      max_steps=40, precision="fp32", spike_window=8, **cfg)
    return Trainer(model, cfg)


def dataclass_dict(args):
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}


def _batch(tokens: torch.Tensor) -> dict:
    return {"input_ids": tokens[None, :-1], "labels": tokens[None, 1:]}


def test_trainer_warns_on_a_planted_spike_and_not_on_a_smooth_run(caplog):
    easy = torch.arange(129) % 8  # a cycle the model learns within a few steps
    noise = torch.randint(0, 64, (129,), generator=torch.Generator().manual_seed(0))
    caplog.set_level(logging.WARNING, logger="mixkit.train")

    smooth = _trainer()
    rows = [smooth.train_step([_batch(easy)]) for _ in range(30)]
    assert not any(r["spike"] for r in rows) and "loss spike" not in caplog.text
    assert rows[-1]["loss"] < rows[0]["loss"] / 2

    for skip in (False, True):
        caplog.clear()
        spiky = _trainer(skip_spikes=skip)
        rows = [spiky.train_step([_batch(easy)]) for _ in range(29)]
        before = {k: v.clone() for k, v in spiky.model.state_dict().items()}
        planted = spiky.train_step([_batch(noise)])  # step 30 in the log's numbering
        assert planted["spike"] and not any(r["spike"] for r in rows)
        assert "step 30: loss spike" in caplog.text
        after = spiky.model.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert unchanged == skip and planted["skipped"] == skip
        assert spiky.skipped == int(skip)


def test_spike_settings_are_checked():
    from mixkit.train import ConfigError

    with pytest.raises(ConfigError, match="spike_factor"):
        TrainConfig(spike_factor=0.9)
    assert TrainConfig(spike_factor=0).spike_factor == 0  # 0 turns the check off


# ---- tokenizers ----------------------------------------------------------------------------------------------------

def test_byte_tokenizer_saved_as_tokenizer_json_is_the_same_tokenizer(tmp_path):
    ByteTokenizer().save(tmp_path)
    tok, ref = load_tokenizer(tmp_path), ByteTokenizer()
    assert isinstance(tok, HFTokenizer) and (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    texts = ["", "naïve café — 日本語 🤖 \U0010FFFF", "tabs\tand\nnewlines\r\n  x", "\x00 <s> </s> literal",
             bytes(range(1, 128)).decode("ascii")]
    for text in texts:
        assert tok.encode(text) == ref.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.decode([256, *ref.encode("hi"), 257]) == "hi"


@pytest.mark.slow
def test_bpe_round_trips_every_quickstart_file():
    """The quick start's BPE (trained on its training split) encodes and
    decodes every training and held-out file exactly, special-token spellings
    such as "</s>" in the sources included."""
    from mixkit.train.quickstart import quickstart_config

    _, dcfg = quickstart_config()
    train = [d.text for d in stdlib_documents("train", max_bytes=dcfg.stdlib_bytes)]
    heldout = [d.text for d in stdlib_documents("heldout", max_bytes=None)]
    tok = train_bpe(train, dcfg.tokenizer["train_bpe"])
    assert tok.vocab_size == dcfg.tokenizer["train_bpe"] and (tok.bos_id, tok.eos_id) == (0, 1)
    for text in train + heldout:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    n_bytes = sum(len(t.encode()) for t in heldout)
    assert n_bytes / sum(len(tok.encode(t)) for t in heldout) > 2.5  # merges learned: bytes per token


def test_train_bpe_special_spellings_and_errors(tmp_path):
    tok = train_bpe(["def f(x):\n    return x  # </s> <s>\n"] * 20, 300)
    text = "x = '<s>' + '</s>'\n"
    assert tok.decode(tok.encode(text)) == text and tok.bos_id not in tok.encode(text)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)  # split_special_tokens comes back from tokenizer_config.json
    assert again.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], 100)


# ---- model directories from mixkit train -----------------------------------------------------------------------------

DOCS = ["import os\n\ndef add(a, b):\n    return a + b\n" * 3, "class A:\n    pass\n" * 5,
        "import os\nprint(os.sep)\n" * 4] * 6


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("tokenizer, vocab", [('"byte"', 258), ("{train_bpe = 300}", 300)])
def test_generate_and_eval_on_a_trained_model_directory(tmp_path, capsys, tokenizer, vocab):
    data = _jsonl(tmp_path / "code.jsonl", DOCS)
    val = _jsonl(tmp_path / "val.jsonl", ["import os\nprint(os.sep)\n"])
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
model_name = "tiny-mistral"
max_steps = 3
warmup_steps = 1
precision = "fp32"
[model]
vocab_size = {vocab}
[data]
tokenizer = {tokenizer}
seq_len = 64
batch_size = 2
out_dir = "{tmp_path / 'run'}"
[data.components.code]
paths = ["{data}"]
weight = 1.0
[data.heldout]
code = ["{val}"]
""")
    assert main(["train", "--config", str(cfg), "--quiet", "--resume", "never"]) == 0
    model_dir = tmp_path / "run" / "model"
    tok = load_tokenizer(model_dir)
    assert tok.vocab_size == vocab if vocab == 258 else 258 < tok.vocab_size <= vocab  # merges: as many as the text has
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", "import os", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("import os")
    assert main(["eval", "--model", str(model_dir), "--data", str(val), "--seq-len", "32",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["val"]
    assert result["bytes"] == len("import os\nprint(os.sep)\n") and 0 < result["bits_per_byte"] < 20


def test_quickstart_rejects_a_bad_tokenizer(capsys):
    assert main(["quickstart", "--tokenizer", "big"]) == 2
    assert main(["quickstart", "--tokenizer", "100"]) == 2
    assert "258" in capsys.readouterr().err


def test_bad_tokenizer_spec_is_a_config_error(tmp_path):
    from mixkit.train import ConfigError
    from mixkit.train.run import DataConfig

    comps = {"c": {"paths": ["x.jsonl"]}}
    for bad in ({"train_bpe": 10}, {"train_bpe": 300, "vocab": 3}, {"bpe": 300}, 5):
        with pytest.raises(ConfigError, match="tokenizer"):
            DataConfig(tokenizer=bad, components=comps)


# ---- baselines and bits per byte -------------------------------------------------------------------------------------

def test_compression_baselines_equal_a_direct_computation():
    texts = [d.text for d in stdlib_documents("heldout", max_files=3)] + ["x = 'é'\n"]
    got = compression_baselines(texts)
    raw = sum(len(t.encode()) for t in texts)
    gz = sum(len(gzip.compress(t.encode(), 9)) for t in texts)
    xz = sum(len(lzma.compress(t.encode(), preset=9 | lzma.PRESET_EXTREME)) for t in texts)
    assert got == {"gzip -9": 8 * gz / raw, "xz -9e": 8 * xz / raw}
    if shutil.which("xz"):  # the command-line tool gives the very same bytes (same liblzma, same container)
        cli = sum(len(subprocess.run(["xz", "-9e", "-c"], input=t.encode(), capture_output=True, check=True).stdout)
                  for t in texts)
        assert cli == xz
    with pytest.raises(ValueError, match="no bytes"):
        compression_baselines([""])


class _FixedLogits(torch.nn.Module):
    """Every position predicts the same distribution: softmax(logits)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)
        self.args = type("Args", (), {"vocab_size": len(logits)})()

    def forward(self, tokens, cu_seqlens=None, max_seqlen=None):
        return self.logits.expand(1, tokens.shape[1], -1)


def test_bits_per_byte_do_not_depend_on_the_tokenizer():
    """A model with known per-byte loss. Byte-level: uniform over the 256
    bytes gives exactly 8 bits per byte. BPE: p(token) = 256^-len(token) / Z
    (uniform per byte, renormalised over the vocabulary) costs 8 bits per
    byte plus log2(Z) per token; both come out of `evaluate` as the formula says,
    with the UTF-8 bytes as the denominator."""
    texts = [d.text for d in stdlib_documents("heldout", max_files=2)] + ["naïve café — 日本語\n"]
    n_bytes = sum(len(t.encode()) for t in texts)

    byte_logits = torch.zeros(258)
    byte_logits[256:] = -math.inf  # BOS/EOS never predicted
    r = evaluate(_FixedLogits(byte_logits), ByteTokenizer(), texts, seq_len=64)["documents"]
    assert r.bytes == n_bytes and r.bits_per_byte == pytest.approx(8.0, rel=1e-6)

    bpe = train_bpe([d.text for d in stdlib_documents("train", max_files=20)], 400)
    # a byte-level token's string has one character per byte (GPT-2's byte alphabet)
    lengths = torch.tensor([math.inf if i in (bpe.bos_id, bpe.eos_id) else len(bpe._tok.id_to_token(i))
                            for i in range(bpe.vocab_size)], dtype=torch.float64)
    logits = (-lengths * math.log(256)).double()
    log_z = torch.logsumexp(logits, 0).item()
    r = evaluate(_FixedLogits(logits.float()), bpe, texts, seq_len=64)["documents"]
    expected = 8.0 + r.tokens * log_z / math.log(2) / n_bytes
    assert r.bytes == n_bytes and r.tokens == sum(len(bpe.encode(t)) for t in texts)
    assert r.bits_per_byte == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_quickstart_keeps_heldout_text_from_the_tokenizer_and_saves_it(tmp_path, monkeypatch, capsys):
    import mixkit.tokenizer as tokenizer_module
    from mixkit.train.quickstart import quickstart

    seen: list[str] = []
    real = tokenizer_module.train_bpe

    def spy(texts, vocab_size, **kw):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, vocab_size, **kw)

    monkeypatch.setattr(tokenizer_module, "train_bpe", spy)
    summary = quickstart(steps=2, device="cpu", out_dir=str(tmp_path), train_bytes=120_000, heldout_bytes=20_000,
                         quiet=True, tokenizer=400, model={"n_layers": 1}, batch_size=2)
    heldout = {d.text for d in stdlib_documents("heldout", max_bytes=None)}
    assert seen and not heldout.intersection(seen)
    out = capsys.readouterr().out
    assert "gzip -9" in out and "xz -9e" in out and "sample:\nclass Stack:\n    def __init__(self):\n" in out
    assert summary["gzip_bpb"] > 0 and summary["spikes"] == [] and math.isfinite(summary["bpb_after"])
    tok = load_tokenizer(tmp_path / "model")
    assert 258 < tok.vocab_size <= 400 and tok.decode(tok.encode("import os\n")) == "import os\n"
    assert (tmp_path / "loss.png").exists() and (tmp_path / "summary.json").exists()


def test_quickstart_precision_follows_the_cpu(monkeypatch):
    """bf16 (2000 steps) where the CPU multiplies bf16 natively, else float32
    (900 steps); --precision chooses; anything else is a clear error."""
    from mixkit.train import quickstart as qs
    from mixkit.train.config import ConfigError

    for native, precision, steps in ((True, "bf16", 2000), (False, "fp32", 900)):
        monkeypatch.setattr(qs, "cpu_has_native_bf16", lambda native=native: native)
        tcfg, _ = qs.quickstart_config("cpu")
        assert (tcfg.precision, tcfg.max_steps, tcfg.eval_every) == (precision, steps, steps)
    assert qs.quickstart_config("cpu", "bf16")[0].max_steps == 2000
    assert qs.quickstart_config("cuda")[0].precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        qs.quickstart_config("cpu", "fp16")
