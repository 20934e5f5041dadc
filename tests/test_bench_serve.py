"""`mixkit bench serve` runs end to end on a tiny model (a wiring check:
numbers from this machine are not for quoting)."""
import json

import pytest

from mixkit import models
from mixkit.cli import main
from mixkit.tokenizer import ByteTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.mark.slow
def test_bench_serve_runs_and_writes_rows(tmp_path):
    d = tmp_path / "model"
    models.save(models.Transformer(models.CONFIGS["tiny-mistral"].replace(vocab_size=258)).init_weights(0), d)
    ByteTokenizer().save(d)
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", str(d), "--no-mixtral", "--clients", "1,3", "--requests", "1",
                 "--prompt-lengths", "5,20", "--output-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    impls = {(r["impl"], r["clients"]) for r in res["rows"]}
    assert ("mixkit serve", 3) in impls and ("HF generate (static batches)", 3) in impls
    served = [r for r in res["rows"] if r["impl"] == "mixkit serve"]
    assert all(r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0 for r in served)
    assert set(res["overhead"]["quickstart"]["ms_per_step"]) == {"schedule", "prepare", "forward", "sample",
                                                                   "detokenize"}
    assert out.with_suffix(".md").read_text().startswith("| model |")


def test_bench_serve_bad_arguments_exit_2(capsys):
    assert main(["bench", "serve", "--clients", "x"]) == 2
    assert main(["bench", "serve", "--clients", "0"]) == 2
    assert "error" in capsys.readouterr().err
