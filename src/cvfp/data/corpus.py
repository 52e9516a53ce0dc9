"""The corpus: documents in the UltraChat schema, read through HuggingFace `datasets`.

A document is `{"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}`,
the schema of `HuggingFaceH4/ultrachat_200k`; one conversation is one document. Sources
(`data.source`):

- `chitchat`: the `chitchat_dataset` package (7,168 conversations); turn i is spoken by the
  user when i is even and by the assistant when i is odd.
- `hub`: `datasets.load_dataset(data.hub_name, split=data.hub_split)`, keeping `messages`;
  `hub_name` may also be a local folder laid out like the hub repository.
- `files`: `.txt` (one file = one document, its content one user message) and `.jsonl`
  (rows with `messages`, or with `text` -> one user message).

Text rules. A `.txt` or `.jsonl` file that is not valid UTF-8 is refused, naming the file and
the byte offset of its first invalid byte; a document more than half of whose characters are
control characters (Unicode category Cc other than tab, newline and carriage return) is refused,
naming the file and line or the document: such inputs are not text. Lone UTF-16 surrogates (a
JSON escape like "\\ud800", or a hub string) are replaced by U+FFFD when a document is read. The
cleaned text is what the tokenizer sees and what `document_bytes` counts, so the two always agree.

Held-out rule (`split_documents`): the tail of the selected documents, by UTF-8 content bytes,
is validation and then test; it is decided before any token exists, so the tokenizer stage
trains on the training documents alone and carve cuts the token stream at the same documents.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

from cvfp.errors import ArtifactError, StageError
from cvfp.io import read_json, write_json, write_text
from cvfp.params import DataParams

BOUNDARY_TOKEN = "<|endoftext|>"
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
SPECIAL_TOKENS = (BOUNDARY_TOKEN, *ROLE_TOKENS.values())
CHITCHAT_ROLES = ("user", "assistant")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
REPLACEMENT_CHAR = "\ufffd"
# Lone UTF-16 surrogates cannot be encoded as UTF-8 (and the Rust tokenizer refuses them).
_SURROGATES = re.compile("[\ud800-\udfff]")
# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; tab, newline and carriage return are text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Selection:
    """The documents a run uses: `num_samples` of them, in the seeded order."""

    documents: list[dict[str, Any]]
    skipped: int            # documents passed over because they hold no content (0 bytes)
    corpus_documents: int   # documents in the whole source corpus
    origin: str             # human description of the source, for messages


def clean_text(text: str) -> str:
    """Replace lone surrogates by U+FFFD so the text is valid UTF-8 (see the module's text rule)."""
    return _SURROGATES.sub(REPLACEMENT_CHAR, text)


def render(document: dict[str, Any]) -> str:
    """The text the tokenizer sees for one document: each message's role token, then its content.

    The boundary token is not part of a document; the cache puts it after every document.
    """
    return "".join(ROLE_TOKENS[m["role"]] + clean_text(m["content"]) for m in document["messages"])


def document_bytes(document: dict[str, Any]) -> int:
    """UTF-8 bytes of a document: the sum over its message contents (special tokens count 0 bytes)."""
    return sum(len(clean_text(m["content"]).encode("utf-8")) for m in document["messages"])


def control_problem(text: str) -> str | None:
    """Why `text` is not text (more than half of its characters are control characters), or None."""
    controls = len(text) - len(_CONTROL.sub("", text))
    if 2 * controls <= len(text):
        return None
    return (f"{controls} of {len(text)} characters are control characters (Unicode Cc other than tab, "
            f"newline and carriage return): not text")


def require_text(contents: Iterable[Any], where: str) -> None:
    """Refuse a document whose message contents (the strings among them) are mostly control characters."""
    problem = control_problem("".join(text for text in contents if isinstance(text, str)))
    if problem:
        raise StageError(f"{where}: {problem}")


def read_utf8(path: Path) -> str:
    """A file's text; bytes that are not valid UTF-8 are a StageError naming the file and the offending offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise StageError(f"data.files: {path}: not valid UTF-8: byte offset {err.start} (line {line}) starts an "
                         f"invalid sequence {data[err.start:err.end]!r} ({err.reason}); "
                         f"only UTF-8 text is read") from None


@dataclass(frozen=True)
class DocumentSplit:
    """The held-out rule's answer for the selected documents, in order: train | val | test.

    Written by the tokenizer stage as data/tokenizer/split.json, checked again by carve.
    """

    train_documents: int
    val_documents: int
    test_documents: int
    val_fraction: float
    test_fraction: float

    @property
    def val_start(self) -> int:
        """Index of the first validation document."""
        return self.train_documents

    @property
    def test_start(self) -> int:
        """Index of the first test document."""
        return self.train_documents + self.val_documents

    @property
    def documents(self) -> int:
        return self.train_documents + self.val_documents + self.test_documents

    def parts(self) -> dict[str, range]:
        """Document indices of each part: {"train": range(0, v), "val": range(v, t), "test": range(t, D)}."""
        return {"train": range(0, self.val_start), "val": range(self.val_start, self.test_start),
                "test": range(self.test_start, self.documents)}

    def describe(self) -> str:
        return (f"{self.train_documents} training, {self.val_documents} validation and {self.test_documents} test "
                f"documents (carve.val_fraction={self.val_fraction}, carve.test_fraction={self.test_fraction})")


def split_documents(doc_bytes: Sequence[int], val_fraction: float, test_fraction: float) -> DocumentSplit:
    """The one held-out rule, shared by the tokenizer stage and carve: the tail by UTF-8 content bytes.

    doc_bytes: (D,) bytes of each document (`document_bytes`; the cache's doc_bytes). With B their
    total and document k starting at byte offset s_k = doc_bytes[0] + ... + doc_bytes[k-1],
    validation starts at the first document with s_k >= (1 - val_fraction - test_fraction) * B
    and test at the first with s_k >= (1 - test_fraction) * B. The fractions are taken as the
    decimals written in params.yaml (0.7 of 10 bytes is exactly 3, not 3.0000000000000004).
    A part left without documents is a StageError.
    """
    starts = [0]
    for size in doc_bytes:
        starts.append(starts[-1] + int(size))
    count, total = len(starts) - 1, starts[-1]
    val, test = Fraction(repr(val_fraction)), Fraction(repr(test_fraction))
    val_start = bisect_left(starts, (1 - val - test) * total, 0, count)
    test_start = bisect_left(starts, (1 - test) * total, 0, count)
    split = DocumentSplit(val_start, test_start - val_start, count - test_start, val_fraction, test_fraction)
    if not (split.train_documents and split.val_documents and split.test_documents):
        raise StageError(f"the held-out rule leaves an empty split: {split.describe()}, of {count} documents "
                         f"({total} bytes); use more data.num_samples or other fractions")
    return split


def write_document_split(path: str | Path, split: DocumentSplit) -> None:
    """Write split.json: {train_documents, val_documents, test_documents, val_fraction, test_fraction}."""
    write_json(path, asdict(split))


def read_document_split(path: str | Path) -> DocumentSplit:
    """Read split.json; a missing or damaged file is an ArtifactError naming the tokenizer stage."""
    raw = read_json(path, "tokenizer")
    counts = ("train_documents", "val_documents", "test_documents")
    try:
        if set(raw) != {*counts, "val_fraction", "test_fraction"}:
            raise ValueError(f"keys {sorted(raw)}")
        if not all(type(raw[key]) is int and raw[key] >= 0 for key in counts):
            raise ValueError("document counts must be integers >= 0")
        if not all(type(raw[key]) in (int, float) for key in ("val_fraction", "test_fraction")):
            raise ValueError("fractions must be numbers")
        return DocumentSplit(**raw)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: not a document split ({err}); "
                            f"rerun the 'tokenizer' stage (dvc repro -f tokenizer)") from None


def message_contents(documents: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Every message content in document order: the tokenizer's training text."""
    for document in documents:
        for message in document["messages"]:
            yield message["content"]


def normalize_document(raw_messages: Any, where: str) -> dict[str, Any]:
    """Keep only role and content of each message, check the role, clean the text."""
    if not isinstance(raw_messages, list):
        raise StageError(f"{where}: 'messages' must be a list of {{role, content}}, got {type(raw_messages).__name__}")
    messages = []
    for position, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise StageError(f"{where}: message {position} is not a mapping with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise StageError(f"{where}: message {position} has role {role!r}; allowed: {', '.join(ROLE_TOKENS)}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise StageError(f"{where}: message {position} content must be text, got {type(content).__name__}")
        messages.append({"role": role, "content": clean_text(content)})
    return {"messages": messages}


def chitchat_corpus():
    """The chitchat-dataset conversations as a `datasets.Dataset` with a `messages` column.

    A turn is one speaker's consecutive utterances joined by a space (the package's default).
    """
    # lazy: `datasets` takes ~1 s to import and only reading a corpus (the tokenizer stage) needs it
    import chitchat_dataset
    from datasets import Dataset

    rows = []
    for conversation in chitchat_dataset.ConversationDataset():
        turns = list(conversation)
        rows.append({"messages": [
            {"role": CHITCHAT_ROLES[i % len(CHITCHAT_ROLES)], "content": turn} for i, turn in enumerate(turns)
        ]})
    return Dataset.from_list(rows)


def hub_corpus(name: str, split: str):
    """`load_dataset(name, split=split)` (a hub id or a local folder of that layout), `messages` only."""
    # lazy: `datasets` takes ~1 s to import and only reading a corpus (the tokenizer stage) needs it
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (not found, offline, bad split)
        raise StageError(f"data.hub_name={name!r}, data.hub_split={split!r}: cannot load "
                         f"({type(err).__name__}: {err})") from None
    if "messages" not in dataset.column_names:
        raise StageError(f"data.hub_name={name!r}: no 'messages' column (columns: {', '.join(dataset.column_names)})")
    return dataset.select_columns(["messages"])


def files_corpus(paths: list[str]):
    """`.txt` and `.jsonl` files, read through `datasets`, concatenated in the listed order."""
    # lazy: `datasets` takes ~1 s to import and only reading a corpus (the tokenizer stage) needs it
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise StageError(f"data.files: {name}: file not found")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            read_utf8(path)  # refuse invalid bytes with their offset, before `datasets` reads the file
            texts = _load_file("text", path, sample_by="document")["text"]
            for text in texts:
                require_text([text], f"data.files: {path}")
            rows.extend({"messages": [{"role": "user", "content": text}]} for text in texts)
        elif suffix in JSONL_SUFFIXES:
            rows.extend(_jsonl_rows(path))
        else:
            raise StageError(f"data.files: {name}: unknown extension {path.suffix!r}; "
                             f"allowed: {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"messages": []})


def _load_file(builder: str, path: Path, **options: Any):
    # lazy: `datasets` takes ~1 s to import and only reading a corpus (the tokenizer stage) needs it
    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files=[str(path)], split="train", **options)
    except Exception as err:  # a generation error wraps the parser's own error
        cause = err.__cause__ or err
        raise StageError(f"data.files: {path}: cannot read as {builder} ({type(cause).__name__}: {cause})") from None


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    text = read_utf8(path)  # refuse invalid bytes with their offset, before any parser replaces them
    # Both readers skip blank lines, so row k comes from the k-th line that is not blank.
    lines = [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        return []
    try:
        dataset = _load_file("json", path)
        columns, column = dataset.column_names, dataset.__getitem__
    except StageError:
        # Arrow's JSON parser refuses escaped lone surrogates ("\ud800") that Python's json accepts;
        # such rows are read here and cleaned by the text rule (U+FFFD) like every other document
        rows = _python_json_rows(path, text)
        columns = sorted({key for row in rows for key in row})
        column = lambda name: [row.get(name) for row in rows]  # noqa: E731
    if "messages" in columns:
        documents = [{"messages": messages} for messages in column("messages")]
    elif "text" in columns:
        documents = [{"messages": [{"role": "user", "content": text}]} for text in column("text")]
    else:
        raise StageError(f"data.files: {path}: rows need a 'messages' or a 'text' field (found: {', '.join(columns)})")
    for row, document in enumerate(documents):
        line = f":{lines[row]}" if len(lines) == len(documents) else f", row {row + 1}"
        where = f"data.files: {path}{line}"
        messages = document["messages"] if isinstance(document["messages"], list) else []
        require_text((m.get("content") for m in messages if isinstance(m, dict)), where)
    return documents


def _python_json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(f"data.files: {path}: line {number} is not JSON ({err})") from None
        if not isinstance(row, dict):
            raise StageError(f"data.files: {path}: line {number} is not a JSON object")
        rows.append(_clean_strings(row))
    return rows


def _clean_strings(value: Any) -> Any:
    """Apply the text rule to every string of a parsed JSON value (Arrow cannot hold lone surrogates)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_strings(item) for item in value]
    if isinstance(value, dict):
        return {key: _clean_strings(item) for key, item in value.items()}
    return value


def load_corpus(data: DataParams):
    """The whole source corpus as a `datasets.Dataset` with a `messages` column, in source order."""
    if data.source == "chitchat":
        return chitchat_corpus()
    if data.source == "hub":
        return hub_corpus(data.hub_name, data.hub_split)
    return files_corpus(list(data.files))


def describe_source(data: DataParams) -> str:
    if data.source == "hub":
        return f"hub dataset {data.hub_name!r} (split {data.hub_split!r})"
    if data.source == "files":
        return f"data.files ({len(data.files)} files)"
    return "the chitchat corpus"


def take_documents(corpus, num_samples: int, seed: int, origin: str = "the corpus") -> Selection:
    """The first `num_samples` documents with content, in the order of `corpus.shuffle(seed)`.

    Documents of 0 bytes are passed over and counted; only the documents needed are read and
    normalised, so a large hub corpus is never materialised.
    """
    total = len(corpus)
    if total == 0:
        raise StageError(f"{origin} is empty: 0 documents exist")
    if num_samples > total:
        raise StageError(f"data.num_samples={num_samples} but {origin} has only {total} documents")
    # keep_in_memory: the permutation is small and must not land in the datasets cache folder.
    shuffled = corpus.shuffle(seed=seed, keep_in_memory=True)
    documents: list[dict[str, Any]] = []
    skipped = 0
    for position, row in enumerate(shuffled):
        where = f"{origin}, document {position} in seeded order"
        document = normalize_document(row["messages"], where)
        require_text((m["content"] for m in document["messages"]), where)
        if document_bytes(document) == 0:
            skipped += 1
            continue
        documents.append(document)
        if len(documents) == num_samples:
            break
    if len(documents) < num_samples:
        raise StageError(f"data.num_samples={num_samples} but {origin} has only {len(documents)} documents with "
                         f"content ({total} in total, {skipped} empty)")
    return Selection(documents, skipped, total, origin)


def select_documents(data: DataParams, seed: int) -> Selection:
    """Load the configured corpus and take `data.num_samples` documents in the seeded order."""
    return take_documents(load_corpus(data), data.num_samples, seed, describe_source(data))


def write_documents(path: str | Path, documents: list[dict[str, Any]]) -> None:
    """Write documents as JSON lines, atomically (one document per line, in order)."""
    lines = [json.dumps(document, ensure_ascii=False) for document in documents]
    write_text(path, "".join(line + "\n" for line in lines))


def read_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read a file written by `write_documents`; a missing or damaged file is an ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the 'tokenizer' stage (dvc repro tokenizer)")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 ({err}); "
                            f"rerun the 'tokenizer' stage (dvc repro -f tokenizer)") from None
    documents = []
    # Split on "\n" only: JSON escapes it inside strings, unlike other line breaks (U+2028, ...).
    for number, line in enumerate(lines[:-1] if lines[-1] == "" else lines, start=1):
        try:
            document = json.loads(line)
            documents.append(normalize_document(document["messages"], f"{path}:{number}"))
        except (json.JSONDecodeError, KeyError, TypeError, StageError) as err:
            raise ArtifactError(f"{path}:{number}: not a document ({err}); "
                                f"rerun the 'tokenizer' stage (dvc repro -f tokenizer)") from None
    return documents
