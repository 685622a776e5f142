"""Full-text search in the store (rolechat.store_search): the FTS5 trigram indexes stay in step
with every write a conversation goes through (checked against the rows themselves by FTS5's
integrity check), Chinese text and short queries are found, FTS5 syntax is searched as text,
owners are kept apart, and a store of the previous schema is indexed when it is upgraded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rolechat.conversation import Conversation
from rolechat.errors import InvalidInput
from rolechat.store import MIGRATIONS, Store
from rolechat.store_search import MAX_QUERY, SearchHit


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "rolechat.db")


def in_step(store: Store) -> None:
    """FTS5's own check of both indexes against the tables they index."""
    for table in ("messages_fts", "titles_fts"):
        store._db.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")


def found(store: Store, q: str, **kwargs: object) -> list[tuple[int, int | None]]:
    """(conversation id, message id) of each hit, in order."""
    return [(h.conversation_id, h.message_id) for h in store.search(q, **kwargs)]  # type: ignore[arg-type]


def marked(hit: SearchHit) -> list[str]:
    return [text for text, match in hit.parts if match]


def test_the_index_follows_every_write(store: Store) -> None:
    cid = store.create(title="Planning")
    user = store.begin_turn(cid, "Where does the zeppelin land?")
    in_step(store)
    assert found(store, "zeppelin") == [(cid, user)]  # pending: shown, so searchable
    reply = store.complete_turn(cid, user, "On the mooring mast.", 5, {}).id
    assert found(store, "mooring") == [(cid, reply)]
    longer = store.extend_last_reply(cid, " Then the crew walks down.", 6, {}, turn=reply).id
    assert found(store, "crew walks") == [(cid, longer)] == found(store, "mooring")
    in_step(store)

    late = store.begin_turn(cid, "And the albatross?")
    store.interrupt_turn(late, "The albatross is a bird")
    cut = found(store, "albatross")
    assert (cid, late) in cut and len(cut) == 2  # the message and the reply so far
    in_step(store)

    second = store.begin_turn(cid, "What about gondolas?")
    answer = store.complete_turn(cid, second, "Gondolas hang below.", 4, {}).id
    dropped = store.drop_last_turn(cid, answer)  # undo
    assert dropped is not None and found(store, "gondola") == []
    store.put_back_turn(cid, dropped.user, dropped.reply)  # a retry that did not complete
    assert sorted(found(store, "gondola")) == [(cid, second), (cid, answer)]
    in_step(store)

    store.update(cid, title="Airships and zeppelins")
    assert (cid, None) not in found(store, "zeppelin")  # its message is a hit: the title is not
    assert found(store, "airship") == [(cid, None)]
    store.update(cid, title="Renamed")
    assert found(store, "airship") == []
    in_step(store)

    store.delete(cid)
    assert found(store, "zeppelin") == found(store, "renamed") == []
    in_step(store)

    imported = store.import_conversation(
        Conversation.from_tuples([("Tell me about quokkas.", "Quokkas smile.")]))
    assert {m for _, m in found(store, "quokka")} == {
        m.id for m in store.messages(imported)}
    in_step(store)


def test_chinese_words_and_short_queries(store: Store) -> None:
    cooking = store.create(title="做饭")
    store.complete_turn(cooking, store.begin_turn(cooking, "我想做家常菜，有什么推荐？"),
                        "试试番茄炒蛋，这是一道经典的家常菜。", 5, {})
    other = store.create(title="Models")
    store.complete_turn(other, store.begin_turn(other, "Is AI just big_data at 100%?"),
                        "No.", 1, {})

    hits = store.search("家常菜")
    assert [h.conversation_id for h in hits] == [cooking, cooking]
    assert all(marked(h) == ["家常菜"] for h in hits)
    assert {h.role for h in hits} == {"user", "assistant"}
    # One or two characters: trigrams cannot find them, the LIKE scan does.
    assert {h.conversation_id for h in store.search("菜")} == {cooking}
    assert {h.conversation_id for h in store.search("家常")} == {cooking}
    assert {h.conversation_id for h in store.search("饭")} == {cooking}  # the title
    assert marked(store.search("饭")[0]) == ["饭"] and store.search("饭")[0].message_id is None
    assert found(store, "ai") == found(store, "AI") != []  # ASCII without case
    # Every term, long and short together; LIKE's own wildcards are text.
    assert [h.conversation_id for h in store.search("番茄 蛋")] == [cooking]
    assert [h.conversation_id for h in store.search("big_data 0%")] == [other]
    assert store.search("g_d") != [] and store.search("1_0") == [] and store.search("%") != []
    assert store.search("AI 家常菜") == []


HOSTILE = ['"', '""', '"""', "'", "*", "a*", "-", "--", "-x", "AND", "OR", "NOT", "x AND y",
           "NEAR(a b)", "NEAR", "(", ")", "()", "^", ":", "col:x", "content:AI", "{a b}", "+",
           "\\", "%", "_", "[", "a OR b*", '" OR 1=1 --', "'; DROP TABLE messages; --"]


@pytest.mark.parametrize("query", HOSTILE)
def test_fts_syntax_is_searched_as_text(store: Store, query: str) -> None:
    cid = store.create(title="syntax")
    text = f"before {query} after"
    uid = store.begin_turn(cid, text)
    decoy = store.create(title="decoy")
    store.begin_turn(decoy, "nothing special here at all")
    hits = store.search(query)
    assert (cid, uid) in [(h.conversation_id, h.message_id) for h in hits]
    for hit in hits:
        if hit.message_id == uid:
            assert hit.snippet == text and marked(hit)
    assert store.version == len(MIGRATIONS) and len(store.messages(cid)) == 1


def test_owners_are_kept_apart(store: Store) -> None:
    mine = store.create(title="mine", owner="alice")
    theirs = store.create(title="theirs", owner="bob")
    nobody = store.create(title="nobody's")
    for cid in (mine, theirs, nobody):
        store.begin_turn(cid, "the shared secret word is periwinkle")
    assert {c for c, _ in found(store, "periwinkle", owner="alice")} == {mine}
    assert {c for c, _ in found(store, "periwinkle", owner="bob")} == {theirs}
    assert {c for c, _ in found(store, "periwinkle", owner=None)} == {nobody}
    assert {c for c, _ in found(store, "pe", owner="alice")} == {mine}  # the LIKE scan too
    assert {c for c, _ in found(store, "periwinkle")} == {mine, theirs, nobody}
    assert found(store, "periwinkle", owner="carol") == []


def test_order_limits_and_snippets(store: Store) -> None:
    old = store.create(title="old")
    for i in range(5):
        store.complete_turn(old, store.begin_turn(old, f"marmalade question {i}"),
                            f"marmalade answer {i}", 1, {})
    new = store.create(title="new")
    filler = "word " * 60
    reply = store.complete_turn(new, store.begin_turn(new, "hello"),
                                f"{filler}then\nthe marmalade\n\nline {filler}", 1, {}).id

    hits = store.search("marmalade")
    assert len(hits) == 4 and [h.conversation_id for h in hits].count(old) == 3  # 3 a conversation
    assert len(store.search("marmalade", limit=2)) == 2
    assert len(store.search("marmalade", per_conversation=10)) == 11
    long_hit = next(h for h in hits if h.message_id == reply)
    assert long_hit.snippet.startswith("…") and long_hit.snippet.endswith("…")
    assert "then the marmalade line" in long_hit.snippet and "\n" not in long_hit.snippet
    assert len(long_hit.snippet) <= 130 and marked(long_hit) == ["marmalade"]
    # Short queries: newest conversation first, its newest message first.
    short = found(store, "ma", per_conversation=2)
    assert [c for c, _ in short] == [new, old, old]
    assert short[1][1] is not None and short[2][1] is not None and short[1][1] > short[2][1]
    assert store.search("marmalade line")[0].message_id == reply


@pytest.mark.parametrize("query", ["", "   ", "\n\t", "x" * (MAX_QUERY + 1)])
def test_a_blank_or_long_query_is_refused(store: Store, query: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        store.search(query)
    assert refused.value.field == "q"


def test_upgrading_the_previous_schema_indexes_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "rolechat.db"
    db = sqlite3.connect(path, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:-1]):
        db.executescript(f"{script}; PRAGMA user_version = {version + 1};")
    db.execute("INSERT INTO conversations (title, created_at, updated_at, owner) VALUES "
               "('Old cooking', 't', 't', 'alice')")
    db.executemany("INSERT INTO messages (conversation_id, seq, role, content, status, "
                   "created_at) VALUES (1, ?, ?, ?, 'complete', 't')",
                   [(0, "user", "怎么做家常菜?"), (1, "assistant", "Start with rice.")])
    db.close()

    reader = Store(path, read_only=True)  # brought up to date, then read
    assert reader.version == len(MIGRATIONS)
    assert found(reader, "家常菜", owner="alice") == [(1, 1)]
    assert found(reader, "rice") == [(1, 2)] and found(reader, "cooking") == [(1, None)]
    reader.close()
    store = Store(path)
    in_step(store)
    store.complete_turn(1, store.begin_turn(1, "And then?"), "Add the eggs.", 1, {})
    assert found(store, "eggs") == [(1, 4)]
