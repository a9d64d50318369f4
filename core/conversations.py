"""Saved chats: each user's conversations, in the project's database, and their exports.

A conversation is OpenAI-shaped messages (each reply with its own token usage) plus the model
and settings it ran with. A user sees, changes and exports only their own: every method takes
the user and looks rows up by (user, id), so another user's id is simply not found.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Engine

from core import db
from core.errors import InvalidRequest, NotFound
from core.schemas import MAX_PROMPT_CHARS, MODEL_NAME_PATTERN, describe_validation_error

MAX_CONVERSATIONS = 1_000  # per user; the oldest goes when a new one would pass it
# What one saved conversation may hold: its text (the messages as JSON, without their
# images) and, apart, its attached images (as data: URLs), so that a few photos fit.
# Text and images together stay under the dashboard's 20 MB upload limit, so that what
# Export writes, Import takes back.
MAX_CONVERSATION_BYTES = 4_000_000
MAX_CONVERSATION_IMAGE_BYTES = 14_000_000
# A question is refused before it is sent when the chat, with it, leaves less than this for
# the reply: a reply is never written only to find that it cannot be saved.
REPLY_ROOM = 400_000
MAX_TITLE = 120
IMAGE_URL = r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$"


class Settings(BaseModel):
    """What a chat ran with, besides its model."""

    model_config = ConfigDict(extra="forbid")
    system: Annotated[str, Field(max_length=200_000)] = ""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    max_tokens: Annotated[int, Field(ge=0)] = 0
    stop: Annotated[list[Annotated[str, Field(max_length=1_000)]], Field(max_length=4)] = []


class Message(BaseModel):
    """One message: OpenAI's role and text; a reply also has its usage and whether Stop cut
    it short."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    # Images attached to a question, as data: URLs (what OpenAI's image_url parts take).
    images: Annotated[list[Annotated[str, Field(pattern=IMAGE_URL)]], Field(max_length=4)] = []
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stopped: bool = False


class Conversation(BaseModel):
    id: str = ""
    title: str = ""
    model: str | None = None
    settings: Settings = Settings()
    messages: list[Message] = []
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Summary(BaseModel):
    id: str
    title: str
    model: str | None
    messages: int
    updated_at: datetime


def check_room(messages: list[Message], *, room: int | None = None) -> None:
    """Refuse (InvalidRequest) messages a saved chat cannot hold with `room` bytes to spare
    for what comes next; the message says how big the chat is and what to do."""
    room = REPLY_ROOM if room is None else room
    # Counted as saved: the messages as JSON (escapes included), without their images.
    text = len(
        json.dumps(
            [m.model_dump(exclude_defaults=True, exclude={"images"}) for m in messages],
            ensure_ascii=False,
        ).encode()
    )
    pictures = sum(len(url) for m in messages for url in m.images)
    if text + room > MAX_CONVERSATION_BYTES:
        what = "the reply to this message would not fit" if room else "it is too long to save"
        raise InvalidRequest(
            f"This chat holds {_size(text)} of text, and {what} (a saved chat holds "
            f"{_size(MAX_CONVERSATION_BYTES)}). Start a new chat: Export keeps this one.",
            param="messages",
        )
    if pictures > MAX_CONVERSATION_IMAGE_BYTES:
        raise InvalidRequest(
            f"This chat's images take {_size(pictures)}, more than a saved chat holds "
            f"({_size(MAX_CONVERSATION_IMAGE_BYTES)}). Start a new chat for more images.",
            param="messages",
        )


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count:,} bytes"


def title_of(messages: list[Message]) -> str:
    """A title from the first user message: its first line, cut at a word."""
    first = next((m.content for m in messages if m.role == "user" and m.content.strip()), "")
    line = " ".join(first.strip().split("\n", 1)[0].split())
    if len(line) <= 60:
        return line or "New chat"
    return line[:60].rsplit(" ", 1)[0] + "…"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class ConversationStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list(self, user: str, *, search: str = "", limit: int = 200) -> list[Summary]:
        """The user's conversations, newest first; `search` matches titles and messages."""
        c = db.conversations.c
        # How many messages, counted in the database without reading them out: each message
        # has one "role" key (a quote inside a text is escaped, so it cannot fake one).
        key = '"role"'
        count = sa.func.length(c.messages) - sa.func.length(sa.func.replace(c.messages, key, ""))
        query = sa.select(
            c.id, c.title, c.model, (count / len(key)).label("count"), c.updated_at
        ).where(c.user == user)
        if search.strip():
            # The words as typed: % and _ are not wildcards.
            escaped = re.sub(r"([\\%_])", r"\\\1", search.strip().lower())
            like = f"%{escaped}%"
            query = query.where(
                sa.or_(
                    sa.func.lower(c.title).like(like, escape="\\"),
                    sa.func.lower(c.messages).like(like, escape="\\"),
                )
            )
        query = query.order_by(c.updated_at.desc(), c.id).limit(limit)
        with db.reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [
            Summary(
                id=r.id,
                title=r.title,
                model=r.model,
                messages=int(r.count),
                updated_at=_aware(r.updated_at),
            )
            for r in rows
        ]

    def get(self, user: str, conversation_id: str) -> Conversation:
        c = db.conversations.c
        with db.reading(self.engine) as conn:
            row = conn.execute(
                sa.select(db.conversations).where(c.user == user, c.id == conversation_id)
            ).first()
        if row is None:
            raise NotFound(f"No conversation {conversation_id[:40]!r} of yours.")
        return Conversation(
            id=row.id,
            title=row.title,
            model=row.model,
            settings=Settings.model_validate_json(row.settings),
            messages=[Message.model_validate(m) for m in json.loads(row.messages)],
            created_at=_aware(row.created_at),
            updated_at=_aware(row.updated_at),
        )

    def save(
        self, user: str, conversation: Conversation, *, seen: datetime | None = None
    ) -> Conversation:
        """Insert or update one of the user's conversations; returns it with its id, title
        (from the first message, unless renamed: an update without a title keeps the one it
        has) and times. `seen`: when the caller last read it; if it changed since (another tab
        or device), nothing is overwritten: this copy is saved as a new conversation."""
        check_room(conversation.messages, room=0)
        # Not ASCII-escaped: searches match the text as typed, and the size cap counts the
        # bytes a person wrote rather than escapes.
        messages = json.dumps(
            [m.model_dump(exclude_defaults=True) for m in conversation.messages],
            ensure_ascii=False,
        )
        now = _now()
        title = (conversation.title or title_of(conversation.messages))[:MAX_TITLE]
        values = {
            "title": title,
            "model": conversation.model,
            "settings": conversation.settings.model_dump_json(),
            "messages": messages,
            "updated_at": now,
        }
        c = db.conversations.c
        with self.engine.begin() as conn:
            done = 0
            if conversation.id:
                where = [c.user == user, c.id == conversation.id]
                if seen is not None:
                    where.append(c.updated_at == seen)
                update = {k: v for k, v in values.items() if k != "title" or conversation.title}
                done = conn.execute(
                    db.conversations.update().where(*where).values(**update)
                ).rowcount
                if not done and seen is not None:
                    mine = sa.select(c.title).where(c.user == user, c.id == conversation.id)
                    if (previous := conn.execute(mine).scalar()) is not None:
                        values["title"] = f"{previous} (another copy)"[:MAX_TITLE]
            if not done:
                conversation_id = secrets.token_hex(8)
                conn.execute(
                    db.conversations.insert().values(
                        id=conversation_id, user=user, created_at=now, **values
                    )
                )
                self._trim(conn, user)
            else:
                conversation_id = conversation.id
        return self.get(user, conversation_id)

    def _trim(self, conn: sa.Connection, user: str) -> None:
        c = db.conversations.c
        keep = (
            sa.select(c.id)
            .where(c.user == user)
            .order_by(c.updated_at.desc())
            .limit(MAX_CONVERSATIONS)
            .scalar_subquery()
        )
        conn.execute(db.conversations.delete().where(c.user == user, c.id.not_in(keep)))

    def rename(self, user: str, conversation_id: str, title: str) -> Conversation:
        title = " ".join((title or "").split())[:MAX_TITLE]
        if not title:
            raise InvalidRequest("A title cannot be empty.", param="title")
        c = db.conversations.c
        with self.engine.begin() as conn:
            done = conn.execute(
                db.conversations.update()
                .where(c.user == user, c.id == conversation_id)
                .values(title=title)
            ).rowcount
        if not done:
            raise NotFound(f"No conversation {conversation_id[:40]!r} of yours.")
        return self.get(user, conversation_id)

    def delete(self, user: str, conversation_id: str) -> None:
        c = db.conversations.c
        with self.engine.begin() as conn:
            done = conn.execute(
                db.conversations.delete().where(c.user == user, c.id == conversation_id)
            ).rowcount
        if not done:
            raise NotFound(f"No conversation {conversation_id[:40]!r} of yours.")

    # ---- exports and imports --------------------------------------------------------------

    def import_json(self, user: str, data: Any) -> Conversation:
        """A conversation exported as JSON (export_json's shape), saved as a new one."""
        if not isinstance(data, dict) or not isinstance(data.get("messages") or [], list):
            raise InvalidRequest("An imported conversation must be a JSON object with messages.")
        try:
            messages = [
                Message.model_validate(_from_parts(m))
                for m in data.get("messages") or []
                if not (isinstance(m, dict) and m.get("role") == "system")
            ]
            settings = Settings.model_validate(data.get("settings") or {})
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None
        system = next(
            (m.get("content") for m in data.get("messages") or []
             if isinstance(m, dict) and m.get("role") == "system"),
            None,
        )  # fmt: skip
        if isinstance(system, str) and not settings.system:
            settings = settings.model_copy(update={"system": system})
        model = data.get("model") if isinstance(data.get("model"), str) else None
        if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
            raise InvalidRequest("The imported model name is not a model id.", param="model")
        title = data.get("title") if isinstance(data.get("title"), str) else ""
        conversation = Conversation(title=title, model=model, settings=settings, messages=messages)
        return self.save(user, conversation)


def _from_parts(message: Any) -> Any:
    """An exported message whose content is OpenAI parts (text and images) as a Message's
    fields; anything else as it is, for validation to judge."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = [p for p in message["content"] if isinstance(p, dict)]
    text = "\n".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")
    images = [(p.get("image_url") or {}).get("url") for p in parts if p.get("type") == "image_url"]
    return {**message, "content": text, "images": images}


def export_json(conversation: Conversation) -> dict[str, Any]:
    """OpenAI messages (the system prompt first, as the model saw it) with the model and
    settings, and each reply's usage: import_json reads it back."""
    messages: list[dict[str, Any]] = []
    if conversation.settings.system:
        messages.append({"role": "system", "content": conversation.settings.system})
    for m in conversation.messages:
        message = m.model_dump(exclude_defaults=True, exclude={"images"})
        if m.images:
            message["content"] = [{"type": "text", "text": m.content}] + [
                {"type": "image_url", "image_url": {"url": url}} for url in m.images
            ]
        messages.append(message)
    return {
        "title": conversation.title,
        "model": conversation.model,
        "settings": conversation.settings.model_dump(),
        "messages": messages,
        "created_at": conversation.created_at.isoformat() if conversation.created_at else None,
        "updated_at": conversation.updated_at.isoformat() if conversation.updated_at else None,
    }


def export_markdown(conversation: Conversation) -> str:
    lines = [f"# {conversation.title}", ""]
    if conversation.model:
        lines += [f"Model: `{conversation.model}`", ""]
    if conversation.settings.system:
        lines += ["**System**", "", conversation.settings.system, ""]
    for m in conversation.messages:
        who = "You" if m.role == "user" else "Assistant"
        lines += [f"**{who}**" + (" *(stopped)*" if m.stopped else ""), "", m.content, ""]
        if m.images:
            lines += [f"*({len(m.images)} image(s) attached)*", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---- presets: a named system prompt with its model and settings, per user ---------------------

MAX_PRESETS = 200  # per user
PRESET_NAME = 80


class Preset(BaseModel):
    name: str
    model: str | None = None
    settings: Settings = Settings()


class PresetStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list(self, user: str) -> list[Preset]:
        p = db.presets.c
        with db.reading(self.engine) as conn:
            rows = conn.execute(
                sa.select(p.name, p.model, p.settings).where(p.user == user).order_by(p.name)
            ).all()
        return [
            Preset(name=r.name, model=r.model, settings=Settings.model_validate_json(r.settings))
            for r in rows
        ]

    def get(self, user: str, name: str) -> Preset:
        found = next((p for p in self.list(user) if p.name == name), None)
        if found is None:
            raise NotFound(f"No preset {name[:PRESET_NAME]!r} of yours.")
        return found

    def save(self, user: str, preset: Preset) -> Preset:
        """Save under its name, replacing the user's preset of that name."""
        name = " ".join(preset.name.split())[:PRESET_NAME]
        if not name:
            raise InvalidRequest("Give the preset a name.", param="name")
        p = db.presets.c
        values = {
            "model": preset.model,
            "settings": preset.settings.model_dump_json(),
            "updated_at": _now(),
        }
        with self.engine.begin() as conn:
            done = conn.execute(
                db.presets.update().where(p.user == user, p.name == name).values(**values)
            ).rowcount
            if not done:
                count = conn.execute(
                    sa.select(sa.func.count()).select_from(db.presets).where(p.user == user)
                ).scalar_one()
                if count >= MAX_PRESETS:
                    raise InvalidRequest(f"You have {MAX_PRESETS} presets; delete one first.")
                conn.execute(db.presets.insert().values(user=user, name=name, **values))
        return self.get(user, name)

    def delete(self, user: str, name: str) -> None:
        p = db.presets.c
        with self.engine.begin() as conn:
            done = conn.execute(db.presets.delete().where(p.user == user, p.name == name)).rowcount
        if not done:
            raise NotFound(f"No preset {name[:PRESET_NAME]!r} of yours.")
