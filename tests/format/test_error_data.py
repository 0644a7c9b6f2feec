"""thaw_format.sdk.error_data: an exception as plain data and back; whatever a peer sends, rebuilt returns an
exception to raise, and as_data never raises."""

from thaw_format import CorruptSnapshotError, mover
from thaw_format.sdk import error_data


class Unprintable(Exception):
    def __str__(self):
        raise ValueError("no text")


def test_an_exception_whose_text_raises_is_sent_by_its_class_name():
    assert error_data.as_data(Unprintable(1, 2)) == ("Unprintable", "<unprintable Unprintable>")


def test_a_long_message_is_cut_to_its_head_keeping_a_refusal():
    refusal = mover.RemoteReadError(1, 1234, 0x1000, 64)
    long = type(refusal)(1, 1234, 0x1000, 64)
    long.args = (str(refusal) + "x" * (4 * error_data.MESSAGE_HEAD),)
    kind, message = error_data.as_data(long)
    assert len(message) == error_data.MESSAGE_HEAD
    assert mover.RemoteReadError.REFUSED in message


def test_malformed_data_becomes_a_runtime_error():
    for kind, message in ((None, "text"), ("ValueError", 3), (["x"], {"y": 1})):
        rebuilt = error_data.rebuilt(kind, message, where="rank 1: ")
        assert type(rebuilt) is RuntimeError and str(rebuilt) == "rank 1: malformed error data"


def test_a_builtin_not_built_from_one_message_becomes_a_runtime_error():
    rebuilt = error_data.rebuilt("UnicodeDecodeError", "bad byte", where="rank 1: ")
    assert type(rebuilt) is RuntimeError and str(rebuilt) == "rank 1: UnicodeDecodeError: bad byte"


def test_a_snapshot_error_and_a_builtin_keep_their_class():
    assert type(error_data.rebuilt("CorruptSnapshotError", "chunk 0")) is CorruptSnapshotError
    assert type(error_data.rebuilt("KeyError", "k")) is KeyError
