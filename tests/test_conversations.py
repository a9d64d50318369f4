"""Saved conversations: per-user storage, the named API endpoints, exports and imports."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from core import conversations as saved
from core.errors import InvalidRequest, NotFound
from tests.conftest import ACCESS_KEY, Served


def a_chat(*texts: str) -> saved.Conversation:
    messages = []
    for text in texts:
        messages += [
            saved.Message(role="user", content=text),
            saved.Message(role="assistant", content=f"Echo: {text}", prompt_tokens=3,
                          completion_tokens=4),
        ]  # fmt: skip
    return saved.Conversation(
        model="gpt-4.1-mini",
        settings=saved.Settings(system="Be brief.", temperature=0.2, stop=["END"]),
        messages=messages,
    )


@pytest.fixture
def store(running_app: Served) -> saved.ConversationStore:
    return running_app.server.config.app.state.core.conversations


def test_each_user_sees_only_their_own_and_the_newest_first(store) -> None:
    first = store.save("conv-ann", a_chat("What is a prime number?\nExplain briefly."))
    second = store.save("conv-ann", a_chat("Tell me about llamas"))
    other = store.save("conv-ben", a_chat("Ben's secret question"))
    assert first.title == "What is a prime number?"  # the first line of the first question
    assert [c.id for c in store.list("conv-ann")] == [second.id, first.id]
    assert [c.title for c in store.list("conv-ann", search="LLAMA")] == ["Tell me about llamas"]
    assert store.list("conv-ann", search="secret") == []
    for action in (lambda: store.get("conv-ann", other.id),
                   lambda: store.delete("conv-ann", other.id),
                   lambda: store.rename("conv-ann", other.id, "mine now")):  # fmt: skip
        with pytest.raises(NotFound):
            action()
    assert store.get("conv-ben", other.id).title == "Ben's secret question"

    renamed = store.rename("conv-ann", first.id, "  Primes,   briefly ")
    assert renamed.title == "Primes, briefly" and renamed.messages == first.messages
    with pytest.raises(InvalidRequest):
        store.rename("conv-ann", first.id, "   ")
    again = store.save("conv-ann", renamed.model_copy(update={"messages": first.messages[:2]}))
    assert again.id == first.id and again.title == "Primes, briefly"  # a rename sticks


def test_json_export_imports_back_and_markdown_reads_well(store) -> None:
    chat = store.save("conv-cat", a_chat("hello", "and again"))
    chat.messages[-1].stopped = True
    chat = store.save("conv-cat", chat)
    exported = saved.export_json(chat)
    assert exported["messages"][0] == {"role": "system", "content": "Be brief."}
    assert exported["messages"][2]["completion_tokens"] == 4
    assert exported["model"] == "gpt-4.1-mini" and exported["settings"]["stop"] == ["END"]
    imported = store.import_json("conv-dan", exported)
    assert imported.id != chat.id and imported.messages == chat.messages
    assert imported.settings == chat.settings and imported.title == chat.title
    markdown = saved.export_markdown(chat)
    assert markdown.startswith("# hello\n") and "**System**\n\nBe brief." in markdown
    assert "**Assistant** *(stopped)*" in markdown
    for bad in ([], {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": "x", "extra": 1}]}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            store.import_json("conv-dan", bad)


def test_a_conversation_too_long_to_save_is_refused(store, monkeypatch) -> None:
    monkeypatch.setattr(saved, "MAX_CONVERSATION_BYTES", 1_000)
    with pytest.raises(InvalidRequest, match="too long to save"):
        store.save("conv-eve", a_chat("x" * 2_000))
    store.save("conv-eve", a_chat("x" * 100))  # what fits is saved


def test_a_question_is_refused_when_its_reply_would_not_fit(monkeypatch) -> None:
    monkeypatch.setattr(saved, "MAX_CONVERSATION_BYTES", 1_000)
    monkeypatch.setattr(saved, "REPLY_ROOM", 500)
    small = [saved.Message(role="user", content="x" * 100)]
    saved.check_room(small)
    big = [saved.Message(role="user", content="x" * 600)]
    with pytest.raises(InvalidRequest, match="reply to this message would not fit"):
        saved.check_room(big)
    saved.check_room(big, room=0)  # it could still be saved as it is


def test_images_have_room_of_their_own(monkeypatch) -> None:
    """A photo or two (4 MB each as data: URLs) fit a chat whose text is small."""
    photo = "data:image/png;base64," + "A" * 5_400_000
    two = [saved.Message(role="user", content="what is this?", images=[photo, photo])]
    saved.check_room(two)
    monkeypatch.setattr(saved, "MAX_CONVERSATION_IMAGE_BYTES", 10_000_000)
    with pytest.raises(InvalidRequest, match=r"images take 10\.8 MB"):
        saved.check_room(two)


def test_the_named_api_endpoints(running_app: Served, store) -> None:
    mine = store.save("conv-api", a_chat("API question"))
    theirs = store.save("conv-other", a_chat("not yours"))
    client = Client(running_app.url, auth=("conv-api", ACCESS_KEY), verbose=False)
    listed = client.predict(api_name="/conversations")
    assert [c["id"] for c in listed] == [mine.id]
    assert client.predict(search="nothing like it", api_name="/conversations") == []
    whole = client.predict(id=mine.id, api_name="/conversation")
    assert whole["messages"][1] == {"role": "user", "content": "API question"}
    text = client.predict(id=mine.id, api_name="/conversation_markdown")
    assert "**You**\n\nAPI question" in text
    for name in ("/conversation", "/conversation_markdown", "/delete_conversation"):
        with pytest.raises(AppError, match="No conversation"):
            client.predict(id=theirs.id, api_name=name)
    assert client.predict(id=mine.id, api_name="/delete_conversation") == mine.id
    assert client.predict(api_name="/conversations") == []
    assert store.get("conv-other", theirs.id)  # untouched


def test_search_matches_the_text_as_typed_and_counts_without_reading(store) -> None:
    cafe = store.save("conv-search", a_chat("Un café au lait, s'il vous plaît"))
    store.save("conv-search", a_chat("100% sure"))
    assert [c.id for c in store.list("conv-search", search="café")] == [cafe.id]
    assert [c.title for c in store.list("conv-search", search="0%")] == ["100% sure"]
    assert store.list("conv-search", search="s_r") == []  # _ is not a wildcard ("sur" would be)
    assert {c.messages for c in store.list("conv-search")} == {2}


def test_an_import_is_bounded_in_every_field(store) -> None:
    for bad in (
        {"model": "m" * 300, "messages": []},
        {"messages": [], "settings": {"system": "s" * 300_000}},
        {"messages": [], "settings": {"stop": ["x" * 2_000]}},
        {"messages": 5},
    ):
        with pytest.raises(InvalidRequest):
            store.import_json("conv-bounds", bad)


def test_a_rename_survives_the_next_reply_and_two_tabs_lose_nothing(store) -> None:
    chat = store.save("conv-tabs", a_chat("First"))
    store.rename("conv-tabs", chat.id, "My name for it")
    # The next reply saves without a title (the chat tab does): the rename stays.
    again = store.save("conv-tabs", chat.model_copy(update={"title": ""}), seen=None)
    assert again.title == "My name for it"
    # Two tabs read the same version; the first saves; the second would overwrite it.
    seen = again.updated_at
    first = store.save(
        "conv-tabs",
        again.model_copy(update={"title": ""}).model_copy(
            update={"messages": [*again.messages, *a_chat("tab one").messages]}
        ),
        seen=seen,
    )
    second = store.save(
        "conv-tabs",
        again.model_copy(update={"title": ""}).model_copy(
            update={"messages": [*again.messages, *a_chat("tab two").messages]}
        ),
        seen=seen,
    )
    assert first.id == chat.id and second.id != chat.id  # kept as a copy, not overwritten
    assert "tab one" in store.get("conv-tabs", chat.id).messages[2].content
    assert second.title == "My name for it (another copy)"
    assert "tab two" in second.messages[2].content
