"""The drop-in API refuses what torch.nn.LSTM / LSTMCell refuse, with the same error types.
Oracle: torch itself, run on every case of the table."""
import pytest
import torch

import lstm_export

CONSTRUCT = [
    dict(bias=0), dict(bias=1), dict(bias="True"), dict(batch_first=0), dict(batch_first="False"),
    dict(input_size=0), dict(hidden_size=0), dict(num_layers=0), dict(dropout=2),
    dict(dropout=-0.1), dict(input_size=2.5),
]


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # the type is what is compared
        return type(e)
    return None


@pytest.mark.parametrize("kwargs", CONSTRUCT, ids=[str(k) for k in CONSTRUCT])
def test_lstm_constructor_checks_match_torch(kwargs):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    want = _outcome(lambda: torch.nn.LSTM(**args))
    assert want is not None
    assert _outcome(lambda: lstm_export.LSTM(**args)) is want


@pytest.mark.parametrize("kwargs", [dict(bias=1), dict(input_size=0), dict(hidden_size=0)])
def test_cell_constructor_accepts_what_torch_accepts(kwargs):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    assert _outcome(lambda: lstm_export.LSTMCell(**args)) is _outcome(lambda: torch.nn.LSTMCell(**args))


CELL_CALLS = {  # input, state: torch broadcasts none of these
    "batch-1 state for batch 3": (torch.zeros(3, 3), (torch.zeros(1, 4), torch.zeros(1, 4))),
    "4-D state": (torch.zeros(3, 3), (torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))),
    "1-D state for a 2-D input": (torch.zeros(3, 3), (torch.zeros(4), torch.zeros(4))),
    "wrong hidden size": (torch.zeros(3, 3), (torch.zeros(3, 5), torch.zeros(3, 5))),
    "float64 input": (torch.zeros(3, 3, dtype=torch.float64), None),
    "unbatched": (torch.zeros(3), (torch.zeros(4), torch.zeros(4))),
}


@pytest.mark.parametrize("case", CELL_CALLS)
def test_cell_call_checks_match_torch(case):
    x, hx = CELL_CALLS[case]
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(3, 4)
    ours = lstm_export.LSTMCell(3, 4)
    ours.load_state_dict(theirs.state_dict())
    want = _outcome(lambda: theirs(x, hx))
    assert _outcome(lambda: ours(x, hx)) is want
    if want is None:
        torch.testing.assert_close(ours(x, hx), theirs(x, hx))


def test_a_dtype_mismatch_says_how_to_convert():
    with pytest.raises(ValueError, match=r"Convert input: input.to\(torch.float32\)"):
        lstm_export.LSTM(3, 4)(torch.zeros(2, 1, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"Convert input"):  # torch's LSTMCell: matmul's RuntimeError
        lstm_export.LSTMCell(3, 4)(torch.zeros(2, 3, dtype=torch.float64))
