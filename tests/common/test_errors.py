"""common/errors.py: the one place an exception's message is cut to a line."""
from lstm_export.common.errors import describe, first_line


class _Noisy(Exception):
    pass


def test_first_line_keeps_the_first_line_of_a_multi_line_message():
    e = RuntimeError("  TVMError: cannot import\n  File x.cc, line 12\n  stack ...")
    assert first_line(e) == "TVMError: cannot import"
    assert first_line(e, 8) == "TVMError"


def test_an_empty_message_reads_as_its_type():
    assert first_line(_Noisy()) == "_Noisy"
    assert first_line(_Noisy("   \n  ")) == "_Noisy"
    assert describe(_Noisy()) == "_Noisy: _Noisy"


def test_describe_names_the_type_and_the_first_line():
    assert describe(ValueError("bad shape (2, 3)\nmore detail")) == "ValueError: bad shape (2, 3)"
