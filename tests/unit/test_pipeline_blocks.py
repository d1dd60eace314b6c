from dataclasses import dataclass

from stream_app.pipeline import split_block


@dataclass
class Msg:
    off: int

    def offset(self) -> int:
        return self.off


def msgs(*offs: int) -> list:
    return [Msg(o) for o in offs]


def test_block_ends_before_the_next_multiple_of_the_batch_size() -> None:
    assert split_block(msgs(5, 6, 7, 8, 9, 10, 11), 5, 10, caught_up=False) == 5


def test_incomplete_block_waits_unless_caught_up() -> None:
    assert split_block(msgs(5, 6, 7), 5, 10, caught_up=False) == 0
    assert split_block(msgs(5, 6, 7), 5, 10, caught_up=True) == 3


def test_offset_gaps_do_not_stall_a_block() -> None:
    assert split_block(msgs(8, 12), 8, 10, caught_up=False) == 1


def test_a_log_whose_head_was_deleted_still_splits() -> None:
    # asked for offset 0, but retention removed everything before 5003
    assert split_block(msgs(5003, 5004, 6000), 0, 1000, caught_up=False) == 2
