"""The command line's argument boundary: every bad numeric flag is one line on stderr, exit 2, and
nothing is written; parsed in-process (argparse runs before any command touches a file)."""
import pytest

from lstm_export.cli.main import main

BAD = [
    ("train", "--lr", "inf"),
    ("train", "--lr", "nan"),
    ("train", "--lr", "0"),
    ("train", "--lr", "-1"),
    ("train", "--clip", "nan"),
    ("train", "--clip", "0"),
    ("train", "--hidden", "1e9"),
    ("train", "--embed", "1e9"),
    ("train", "--hidden", "1000000000"),
    ("train", "--weight-decay", "-1"),
    ("train", "--seed", str(2**70)),
    ("train", "--seed", "-1"),
    ("train", "--dropout", "1.5"),
    ("train", "--minutes", "-1"),
    ("train", "--layers", "0"),
    ("train", "--bptt", "x"),
    ("train", "--steps", "0"),
    ("sample", "ck", "--temperature", "nan"),
    ("sample", "ck", "--temperature", "1e-45"),
    ("sample", "ck", "--temperature", "0"),
    ("sample", "ck", "--chars", "-1"),
    ("demo", "--minutes", "-1"),
    ("demo", "--minutes", "0"),
    ("demo", "--minutes", "nan"),
    ("serve", "m.onnx", "--max-batch", "0"),
    ("serve", "m.onnx", "--max-batch", "-1"),
    ("serve", "m.onnx", "--body-timeout-s", "0"),
    ("serve", "m.onnx", "--max-body-bytes", "-1"),
    ("serve", "m.onnx", "--port", "99999"),
    ("serve", "m.onnx", "--port", "-1"),
    ("serve", "m.onnx", "--max-wait-ms", "nan"),
    ("serve", "m.onnx", "--idle-timeout-s", "-5"),
    ("compile", "m.onnx", "--out", "OUT", "--threads", "0"),
    ("compile", "m.onnx", "--out", "OUT", "--trials", "0"),
    ("bench", "--threads", "0"),
    ("bench", "--min-s", "0"),
    ("bench", "--rounds", "0"),
    ("compare", "m.onnx", "--atol", "-1"),
    ("compare", "m.onnx", "--atol", "nan"),
    ("compare", "m.onnx", "--long", "-5"),
    ("run", "m.onnx", "--outputs", "OUT", "--seed", "-1"),
    ("export", "ck", "--out", "OUT", "--opset", "3"),
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    flag = next(a for a in argv if a.startswith("--") and a not in ("--out", "--outputs"))
    assert f"argument {flag}:" in lines[0] and "--help" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even an output folder


@pytest.mark.parametrize("argv,attr,value", [
    (("train", "--lr", "0.5"), "lr", 0.5), (("train", "--seed", str(2**32 - 1)), "seed", 2**32 - 1),
    (("train", "--minutes", "0"), "minutes", 0.0), (("serve", "m.onnx", "--max-wait-ms", "0"), "max_wait_ms", 0.0),
    (("sample", "ck", "--temperature", "0.001"), "temperature", 0.001),
    (("compare", "m.onnx", "--atol", "0"), "atol", 0.0),
])
def test_good_values_at_the_bounds_are_accepted(argv, attr, value):
    from lstm_export.cli.main import build_parser
    assert getattr(build_parser().parse_args(list(argv)), attr) == value


def test_compile_refuses_to_replace_an_artifact_without_force(tmp_path, capsys):
    """A folder that already holds a compiled model is not overwritten unless --force; a file is
    not a folder. Both are found before the model is even read (it does not exist here)."""
    out = tmp_path / "art"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    assert main(["compile", str(tmp_path / "none.onnx"), "--out", str(out)]) == 2
    assert "already holds a compiled model; pass --force" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["compile", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (out / "meta.json").read_text() == "{}" and (tmp_path / "f").read_text() == "x"
    # with --force it goes on to the model, which is missing
    assert main(["compile", str(tmp_path / "none.onnx"), "--out", str(out), "--force"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- NAME=VALUE flags (cli/types.py) -------------------------------------------------------------

def test_name_value_flags_parse_what_the_docs_show():
    from lstm_export.cli.types import parse_dims, parse_input_shapes, parse_input_values
    assert parse_dims(["batch=4", " seq = 16"]) == {"batch": 4, "seq": 16}
    assert parse_input_shapes(["input=1x512", "h0=2,1,64"]) == {"input": (1, 512), "h0": (2, 1, 64)}
    assert parse_input_values(["sr=16000", "scale=0.5"]) == {"sr": 16000, "scale": 0.5}
    assert isinstance(parse_input_values(["sr=16000"])["sr"], int)


@pytest.mark.parametrize("flag,item", [("--dim", "batch=0"), ("--dim", "batch"), ("--input-shape", "input=1xA"),
                                       ("--input-shape", "=1x2"), ("--input-value", "sr=fast")])
def test_a_bad_name_value_flag_is_one_line_naming_the_flag(flag, item):
    from lstm_export.cli.types import parse_dims, parse_input_shapes, parse_input_values
    from lstm_export.common.errors import UserError
    parse = {"--dim": parse_dims, "--input-shape": parse_input_shapes, "--input-value": parse_input_values}[flag]
    with pytest.raises(UserError) as e:
        parse([item])
    assert flag in str(e.value) and repr(item) in str(e.value) and "\n" not in str(e.value)
