"""`lstm-export demo`: benches the model it trained, from the artifact `compile` wrote."""
import hashlib
import json

import pytest

from lstm_export import checkpoint as ckpt_io


@pytest.mark.slow
def test_demo_benches_its_own_trained_model_from_the_compiled_folder(cli, tmp_path):
    pytest.importorskip("tvm")
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--minutes", "0.05", "--quiet", timeout=600,
            env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = ckpt_io.load(out / "ckpt.pt").model_config
    label = (f"this char LM (vocab {cfg.vocab_size}, embed {cfg.embed}, hidden {cfg.hidden}, "
             f"{cfg.layers} layers), T=64 B=1")
    bench = r.stdout[r.stdout.index("== bench:"):]
    assert label in bench and str(out / "tvm") in bench.splitlines()[0]
    rows = [line for line in bench.splitlines() if line.startswith(label[:30])]
    assert {line.split()[-1] for line in rows} == {"ok"} and any("tvm-llvm" in line for line in rows)
    assert (out / "tvm" / "model.so").is_file() and (out / "tvm" / "model.onnx").is_file()
    # the native model was compiled once, by `compile`: no cache entry holds it (the other graphs' do)
    native = hashlib.sha256((out / "model.native.onnx").read_bytes()).hexdigest()
    cached = [json.loads(m.read_text()) for m in (tmp_path / "cache").glob("lstm-export/tvm/*/meta.json")]
    assert cached and native not in {m["onnx_sha256"] for m in cached}
    assert f"[native: {out / 'tvm'}]" in r.stdout
    # a folder the demo did not make is never deleted
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("data")
    r = cli("demo", "--out", other, "--minutes", "0.05", "--quiet")
    assert r.returncode == 2 and "not made by the demo" in r.stderr and (other / "keep.txt").exists()
