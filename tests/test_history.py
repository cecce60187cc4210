"""A session's history: the CLI's recorded transcripts replayed over HTTP, ownership, and no path escape."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from shared.keys import Keys
from shared.settings import Settings
from shared.transcript import transcript_path
from tests.support import cookie_headers, make_cookie

TRANSCRIPTS = Path(__file__).parent / "data" / "transcripts"  # recorded by the real CLI (shared/reference)
K = Keys("agent:")


def as_user(user: str) -> dict[str, str]:
    return cookie_headers({"session": make_cookie(user)})


def transcript_file(settings: Settings, session_id: str) -> Path:
    """Where the CLI writes a session run in `claude_cwd`: every non-alphanumeric of the cwd becomes '-'."""
    folder = re.sub(r"[^A-Za-z0-9]", "-", str(settings.claude_cwd.resolve()))
    path = settings.claude_config_dir / "projects" / folder / f"{session_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def new_session(client: TestClient, user: str = "alice") -> str:
    session_id: str = client.post("/agent/sessions/new", headers=as_user(user)).json()["session_id"]
    return session_id


def history(client: TestClient, session_id: str, user: str = "alice") -> list[tuple[str, str]]:
    reply = client.get(f"/agent/sessions/{session_id}/history", headers=as_user(user))
    assert reply.status_code == 200, reply.text
    return [(m["role"], m["text"]) for m in reply.json()["messages"]]


def race_reply(n: int, had: int, race: int) -> str:
    return f"STUB REPLY #{n} (request had {had} messages). You said: race {race} " + "x" * 193


EXPECTED: dict[str, list[tuple[str, str]]] = {
    "sample-v2.1.332-transcript-2turns.jsonl": [
        ("user", "My name is Alice."),
        ("assistant", "STUB REPLY #1 (request had 2 messages). You said: My name is Alice."),
        ("user", "What is my name?"),
        ("assistant", "STUB REPLY #2 (request had 4 messages). You said: What is my name?"),
    ],
    # tool_use lines and the user lines carrying tool_result are left out
    "sample-v2.1.332-transcript-tooluse.jsonl": [
        ("user", "make a file"),
        ("assistant", 'Tool said: "(Bash completed with no output)"'),
    ],
    # the text line and the tool_use line share message.id: one entry
    "sample-v2.1.332-transcript-text-plus-tooluse.jsonl": [
        ("user", "say hi via shell"),
        ("assistant", "Let me run a command."),
        ("assistant", 'Tool said: "hi"'),
    ],
    # the isMeta "Continue from where you left off." and the synthetic "No response requested." are left out
    "sample-v2.1.197-transcript-after-sigterm-and-resume.jsonl": [
        ("user", "first message"),
        ("user", "second message"),
        ("assistant", "STUB REPLY #1 (request had 4 messages). You said: second message"),
    ],
    # the synthetic API-error line is left out
    "sample-v2.1.197-transcript-api-error-500.jsonl": [("user", "hello")],
    "sample-v2.1.197-transcript-concurrent-race.jsonl": [
        ("user", "turn one"),
        ("assistant", "STUB REPLY #1 (request had 2 messages). You said: turn one"),
        ("user", "concurrent turn B"),
        ("user", "concurrent turn A"),
        ("assistant", "STUB REPLY #2 (request had 4 messages). You said: concurrent turn B"),
        ("assistant", "STUB REPLY #3 (request had 4 messages). You said: concurrent turn A"),
        ("user", "third turn, after the race"),
        ("assistant", "STUB REPLY #4 (request had 6 messages). You said: third turn, after the race"),
        *[("user", f"race {n} <100000 x chars trimmed>") for n in (2, 5, 4, 6, 1, 3)],
        ("assistant", race_reply(5, 8, 2)),
        ("assistant", race_reply(6, 8, 5)),
        ("assistant", race_reply(7, 8, 4)),
        ("assistant", race_reply(8, 10, 6)),
        ("assistant", race_reply(9, 10, 1)),
        ("assistant", race_reply(10, 8, 3)),
    ],
}


def test_every_recorded_transcript_has_an_expected_replay() -> None:
    assert {p.name for p in TRANSCRIPTS.glob("*.jsonl")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_transcript_replays_as_exact_messages(client: TestClient, settings: Settings, name: str) -> None:
    session_id = new_session(client)
    shutil.copy(TRANSCRIPTS / name, transcript_file(settings, session_id))
    assert history(client, session_id) == EXPECTED[name]


def test_two_turn_history_carries_each_lines_timestamp(client: TestClient, settings: Settings) -> None:
    session_id = new_session(client)
    shutil.copy(TRANSCRIPTS / "sample-v2.1.332-transcript-2turns.jsonl", transcript_file(settings, session_id))
    reply = client.get(f"/agent/sessions/{session_id}/history", headers=as_user("alice"))
    assert [m["timestamp"] for m in reply.json()["messages"]] == [
        "2026-12-03T18:15:50.873Z", "2026-12-03T18:15:50.989Z", "2026-12-03T18:15:51.536Z", "2026-12-03T18:15:51.626Z",
    ]
    assert all(set(m) == {"role", "text", "timestamp"} for m in reply.json()["messages"])


def _two_turn_lines() -> list[str]:
    return (TRANSCRIPTS / "sample-v2.1.332-transcript-2turns.jsonl").read_text().splitlines()


def test_assistant_response_split_over_lines_sharing_a_message_id_is_merged(
    client: TestClient, settings: Settings
) -> None:
    lines = _two_turn_lines()
    index = next(i for i, line in enumerate(lines) if "msg_stub_1_" in line and '"type":"assistant"' in line)
    record = json.loads(lines[index])
    text = record["message"]["content"][0]["text"]
    parts = []
    tool_use = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}
    for content in ([{"type": "text", "text": text[:10]}], [tool_use], [{"type": "text", "text": text[10:]}]):
        part = json.loads(lines[index])
        part["message"]["content"] = content
        parts.append(json.dumps(part))
    lines[index:index + 1] = parts
    session_id = new_session(client)
    transcript_file(settings, session_id).write_text("\n".join(lines) + "\n")
    assert history(client, session_id) == EXPECTED["sample-v2.1.332-transcript-2turns.jsonl"]


def test_half_written_last_line_is_tolerated(client: TestClient, settings: Settings) -> None:
    lines = _two_turn_lines()
    last_reply = max(i for i, line in enumerate(lines) if '"type":"assistant"' in line)
    cut = lines[:last_reply] + [lines[last_reply][: len(lines[last_reply]) // 2]]
    session_id = new_session(client)
    transcript_file(settings, session_id).write_text("\n".join(cut))  # no final newline: still being written
    assert history(client, session_id) == EXPECTED["sample-v2.1.332-transcript-2turns.jsonl"][:3]


def test_undecodable_bytes_and_foreign_lines_are_tolerated(client: TestClient, settings: Settings) -> None:
    session_id = new_session(client)
    path = transcript_file(settings, session_id)
    shutil.copy(TRANSCRIPTS / "sample-v2.1.197-transcript-api-error-500.jsonl", path)
    with path.open("ab") as handle:
        handle.write(b"\xff\xfe\x00garbage\n[1, 2]\n\"text\"\n{\"type\": \"user\", \"message\": \"not a dict\"}\n\n")
    assert history(client, session_id) == [("user", "hello")]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_transcript_is_an_empty_history(client: TestClient, settings: Settings, content: str) -> None:
    session_id = new_session(client)
    transcript_file(settings, session_id).write_text(content)
    assert client.get(f"/agent/sessions/{session_id}/history", headers=as_user("alice")).json() == {"messages": []}


def test_session_with_no_transcript_yet_is_an_empty_history(client: TestClient) -> None:
    session_id = new_session(client)
    assert client.get(f"/agent/sessions/{session_id}/history", headers=as_user("alice")).json() == {"messages": []}


# --- ownership ---------------------------------------------------------------------------------------------------


def test_another_users_session_history_is_404_and_shows_nothing(client: TestClient, settings: Settings) -> None:
    session_id = new_session(client, "alice")
    shutil.copy(TRANSCRIPTS / "sample-v2.1.332-transcript-2turns.jsonl", transcript_file(settings, session_id))
    reply = client.get(f"/agent/sessions/{session_id}/history", headers=as_user("bob"))
    assert reply.status_code == 404
    assert reply.json() == {"detail": "no such session", "code": "not_found"}
    assert "Alice" not in reply.text


def test_session_never_issued_is_claimed_by_its_first_user_then_404_for_another(
    client: TestClient, settings: Settings, rconn: redis.Redis
) -> None:
    session_id = str(uuid.uuid4())
    # a transcript from before this service (no owner on record)
    shutil.copy(TRANSCRIPTS / "sample-v2.1.197-transcript-api-error-500.jsonl", transcript_file(settings, session_id))
    assert history(client, session_id, "alice") == [("user", "hello")]
    assert rconn.get(K.session_owner(session_id)) == b"alice"
    assert 0 < rconn.pttl(K.session_owner(session_id)) <= settings.session_owner_ttl_s * 1000

    for reply in (
        client.get(f"/agent/sessions/{session_id}/history", headers=as_user("bob")),
        client.post("/agent/ask", json={"session_id": session_id, "message": "mine now?"}, headers=as_user("bob")),
    ):
        assert (reply.status_code, reply.json()) == (404, {"detail": "no such session", "code": "not_found"})
    assert rconn.get(K.session_owner(session_id)) == b"alice"
    assert client.post("/agent/ask", json={"session_id": session_id, "message": "hi"},
                       headers=as_user("alice")).status_code == 202


def test_session_never_issued_and_without_transcript_is_claimed_by_first_ask(
    client: TestClient, rconn: redis.Redis
) -> None:
    session_id = str(uuid.uuid4())
    assert client.post("/agent/ask", json={"session_id": session_id, "message": "hi"},
                       headers=as_user("bob")).status_code == 202
    assert rconn.get(K.session_owner(session_id)) == b"bob"
    reply = client.get(f"/agent/sessions/{session_id}/history", headers=as_user("alice"))
    assert reply.status_code == 404


# --- no path escape -----------------------------------------------------------------------------------------------


@pytest.fixture
def secrets_outside(settings: Settings, tmp_path: Path) -> list[Path]:
    """Transcript-shaped files outside the project folder that a traversal would have to reach."""
    line = json.dumps({"type": "user", "message": {"role": "user", "content": "TOP SECRET"}}) + "\n"
    paths = [settings.claude_config_dir / "projects" / "secret.jsonl", settings.claude_config_dir / "secret.jsonl",
             tmp_path / "secret.jsonl"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line)
    transcript_file(settings, str(uuid.uuid4()))  # the project folder exists too
    return paths


@pytest.mark.parametrize(
    "raw",
    [
        "..%2Fsecret",
        "..%2F..%2Fsecret",
        "%2e%2e%2f%2e%2e%2fsecret",
        "..%252F..%252Fsecret",
        "..%5C..%5Csecret",
        "secret",
        "secret.jsonl",
        "..",
        "%2e%2e",
        "00000000-0000-0000-0000-000000000000%2F..%2F..%2Fsecret",
        "00000000-0000-0000-0000-000000000000.jsonl",
        "00000000-0000-0000-0000-000000000000%00",
        "not-a-uuid",
    ],
)
def test_history_path_cannot_escape_the_project_folder(
    client: TestClient, secrets_outside: list[Path], raw: str
) -> None:
    reply = client.get(f"/agent/sessions/{raw}/history", headers=as_user("alice"))
    assert reply.status_code in (404, 422), reply.text
    assert "TOP SECRET" not in reply.text
    assert reply.json()["code"] in ("not_found", "invalid_request")


@pytest.mark.parametrize("form", ["upper", "hex", "braces", "urn"])
def test_non_canonical_uuid_forms_read_the_canonical_sessions_transcript(
    client: TestClient, settings: Settings, form: str
) -> None:
    session_id = new_session(client)
    shutil.copy(TRANSCRIPTS / "sample-v2.1.197-transcript-api-error-500.jsonl", transcript_file(settings, session_id))
    spelled = {"upper": session_id.upper(), "hex": uuid.UUID(session_id).hex, "braces": f"{{{session_id}}}",
               "urn": f"urn:uuid:{session_id}"}[form]
    reply = client.get(f"/agent/sessions/{spelled}/history", headers=as_user("alice"))
    assert reply.status_code == 200
    assert [m["text"] for m in reply.json()["messages"]] == ["hello"]


NIL = "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("session_id", ["../secret", "..", "x/../../secret", f"urn:uuid:{NIL}", f"{NIL}/../x", ""])
def test_transcript_path_refuses_anything_but_a_canonical_uuid(settings: Settings, session_id: str) -> None:
    with pytest.raises(ValueError):
        transcript_path(settings.claude_config_dir, settings.claude_cwd, session_id)


def test_transcript_path_is_the_encoded_cwd_folder_under_projects(settings: Settings) -> None:
    session_id = str(uuid.uuid4())
    path = transcript_path(settings.claude_config_dir, settings.claude_cwd, session_id)
    assert path == transcript_file(settings, session_id)
    assert transcript_path(settings.claude_config_dir, settings.claude_cwd, session_id.upper()) == path
