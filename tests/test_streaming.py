from __future__ import annotations

from rolechat.streaming import ReplyText


def feed(reply: ReplyText, pieces: list[bytes]) -> list[str]:
    out = [reply.push(p) for p in pieces]
    out.append(reply.finish())
    return out


def test_never_half_a_character() -> None:
    data = "火候é".encode()
    chunks = feed(ReplyText(), [bytes([b]) for b in data])
    assert "".join(chunks) == "火候é"
    assert all(c in ("", "火", "候", "é") for c in chunks)


def test_unfinished_character_at_the_end_is_dropped() -> None:
    assert "".join(feed(ReplyText(), [b"ok", b"\xe7\x81"])) == "ok"


def test_invalid_bytes_become_replacement() -> None:
    assert "".join(feed(ReplyText(), [b"a\xff", b"b"])) == "a\ufffdb"


def test_stop_sequence_split_across_tokens() -> None:
    reply = ReplyText(stop=["END"])
    chunks = feed(reply, [b"hello E", b"N", b"D and more"])
    assert "".join(chunks) == "hello "
    assert reply.stopped and reply.text == "hello "
    assert "E" not in "".join(chunks)


def test_held_prefix_released_when_not_a_stop() -> None:
    reply = ReplyText(stop=["END"])
    assert reply.push(b"an E") == "an "
    assert reply.push(b"X") == "EX"
    assert reply.finish() == ""
    assert reply.text == "an EX" and not reply.stopped


def test_prefix_held_until_the_end_is_released() -> None:
    reply = ReplyText(stop=["\n\n"])
    assert reply.push(b"line\n") == "line"
    assert reply.finish() == "\n"
    assert reply.text == "line\n"


def test_earliest_of_several_stops() -> None:
    reply = ReplyText(stop=["bb", "a"])
    assert "".join(feed(reply, [b"xxbbya"])) == "xx"
