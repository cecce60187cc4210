"""The worker and the history endpoint find the transcript where the CLI writes it (pinned against the
fake, which tests/test_real_cli_contract.py pins against the real CLI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shared.transcript import encode_cwd, transcript_path
from tests.support import FAKE_CLAUDE


def _fake_encoder() -> object:
    spec = importlib.util.spec_from_file_location("fake_claude", FAKE_CLAUDE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.encode_project_dir


@pytest.mark.parametrize("cwd", ["/srv/overlord/work", "/home/erik/MosswartOverlord", "/tmp/é😀 dir",
                                 "/tmp/" + "x" * 300, "/tmp/long/" + "ü" * 250])
def test_project_dir_name_matches_the_cli(cwd: str) -> None:
    encoder = _fake_encoder()
    assert callable(encoder)
    assert encode_cwd(cwd) == encoder(cwd)


def test_short_and_long_names() -> None:
    assert encode_cwd("/home/erik/MosswartOverlord") == "-home-erik-MosswartOverlord"
    assert encode_cwd("/a/😀") == "-a---"
    long_name = encode_cwd("/" + "a" * 300)
    assert len(long_name) > 200 and long_name[200] == "-" and long_name[:200] == "-" + "a" * 199


def test_transcript_path_refuses_anything_but_a_uuid(tmp_path: Path) -> None:
    sid = "0b6f3c7e-4a53-4d0e-9c58-1d5a9a3f2b11"
    assert transcript_path(tmp_path, tmp_path, sid).name == f"{sid}.jsonl"
    for bad in ("../../etc/passwd", "0b6f3c7e4a534d0e9c581d5a9a3f2b11", f"{sid}/../x", ""):
        with pytest.raises(ValueError):
            transcript_path(tmp_path, tmp_path, bad)
