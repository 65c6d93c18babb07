"""Document streams: the synthetic retrieval corpus and files on disk.

Everything here is a generator, so a corpus of any size is read in bounded memory.
Non-UTF-8 input fails with the file and line named: silently skipping bytes would change
what the teacher and student see without anyone noticing.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import itertools
import json
import random
import re
import sys
import zlib
from pathlib import Path
from typing import IO, Callable, Iterator

from pipeline.config import DataConfig, PeriodicConfig, SyntheticConfig
from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity, file_identity
from pipeline.locate import OBJECT_STORE_SCHEMES, hub_ref, hub_wanted, local_path, ref_identity
from stages.jsonstream import Chars, more, record


# ----------------------------------------------------------------------------- synthetic


def _random_string(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# The eval's retrieval formats (stages/evaluate/tasks.py builds its probes from these too).
KEY_LEN = 8
VALUE_LEN = 8
PASSKEY_DIGITS = 5
PASSKEY_PREFIX = "pass key: "


def retrieval_document(rng: random.Random, cfg: SyntheticConfig, length: int) -> str:
    """A document in one of the eval's formats, asked again at its end, the fact at a uniform
    distance: needle = key + value amid synthetic text, then the key + value again; passkey =
    ``pass key: NNNNN.`` amid a repeated sentence of random words, then the same again. The
    eval's own filler sentence is never used, so the probes stay unseen."""
    if rng.random() < 0.5:
        fact = _random_string(rng, cfg.alphabet, KEY_LEN) + _random_string(rng, cfg.alphabet, VALUE_LEN)
        hay = ""
        while len(hay) < length:
            hay += synthetic_document(rng, cfg.model_copy(update={"retrieval_fraction": 0.0}), length)
    else:
        fact = f"{PASSKEY_PREFIX}{rng.randrange(10 ** PASSKEY_DIGITS):0{PASSKEY_DIGITS}d}."
        words = [_random_string(rng, cfg.alphabet, rng.randint(2, 7)) for _ in range(rng.randint(3, 8))]
        sentence = " ".join(words) + ". "
        hay = sentence * (length // len(sentence) + 1)
    room = max(length - 2 * len(fact), 0)
    at = rng.randint(0, room)
    return hay[:at] + fact + hay[at:room] + fact


def synthetic_document(rng: random.Random, cfg: SyntheticConfig, length: int) -> str:
    """One document of ~``length`` characters that rewards retrieving earlier content.

    copy:      a random segment repeated to fill the document (predicting any character
               after the first period needs looking back one period: an induction pattern).
    facts:     ``key=value;`` pairs, then queries ``key?value`` that restate earlier pairs.
    retrieval: (``retrieval_fraction`` of them) the eval's formats, see ``retrieval_document``.
    """
    if cfg.retrieval_fraction > 0 and rng.random() < cfg.retrieval_fraction:
        return retrieval_document(rng, cfg, length)
    if rng.random() < cfg.copy_fraction:
        lo, hi = cfg.segment_len
        seg = _random_string(rng, cfg.alphabet, rng.randint(lo, max(lo, min(hi, length // 2))))
        return (seg * (length // len(seg) + 1))[:length]
    pairs: list[tuple[str, str]] = []
    out = ""
    while len(out) < length // 2:
        k, v = _random_string(rng, cfg.alphabet, 4), _random_string(rng, cfg.alphabet, 4)
        pairs.append((k, v))
        out += f"{k}={v};"
    while len(out) < length:
        k, v = rng.choice(pairs)
        out += f"{k}?{v};"
    return out[:length]


def periodic_documents(cfg: PeriodicConfig, doc_len: tuple[int, int], seed: int) -> Iterator[list[int]]:
    """Token-id documents (no tokenizer involved): a random segment repeated to the length."""
    rng = random.Random(seed)
    for _ in range(cfg.num_docs):
        length = rng.randint(doc_len[0], doc_len[1])
        p = rng.randint(cfg.period[0], min(cfg.period[1], length))
        seg = [rng.randrange(cfg.alphabet_size) for _ in range(p)]
        yield (seg * (length // p + 1))[:length]


def synthetic_documents(cfg: SyntheticConfig, doc_len: tuple[int, int], seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(cfg.num_docs):
        yield synthetic_document(rng, cfg, rng.randint(doc_len[0], doc_len[1]))


# ----------------------------------------------------------------------------- files

# The formats a data file may have (matched case-insensitively on the name's end).
SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".txt")
_SAVED = ("dataset_info.json", "dataset_dict.json")  # what marks a datasets.save_to_disk directory
_LINE_BLOCK = 1 << 20  # a line longer than this is read (and its text handed on) in blocks
_SURROGATE = re.compile("[\ud800-\udfff]")
_warned: set[str] = set()


def data_format(path: Path) -> str | None:
    """The suffix in ``SUFFIXES`` that ``path``'s name ends with (any case), else None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / m).exists() for m in _SAVED)


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(data files and saved-dataset directories, other files) under ``root``, recursively, in
    sorted path order, so the corpus order never depends on the file system's."""
    found: list[Path] = []
    other: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            if _is_saved_dataset(entry):
                found.append(entry)
            else:
                sub, rest = _walk(entry)
                found += sub
                other += rest
        elif entry.is_file():
            (found if data_format(entry) else other).append(entry)
    return found, other


def _warn_skipped(source: str, root: Path, skipped: list[Path]) -> None:
    """One warning per source and process naming the files a directory holds that are not data."""
    if not skipped or source in _warned:
        return
    _warned.add(source)
    names = [str(p.relative_to(root)) for p in skipped]
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    print(f"warning: data.source: skipped {len(names)} file(s) under {root} that are not "
          f"{'/'.join(SUFFIXES)}: {', '.join(names[:10])}{more}", file=sys.stderr)


def resolve_files(source: str) -> list[Path]:
    """Expand a path, directory of files, glob, or Hugging Face dataset id (``org/name[@revision]``:
    its .jsonl/.parquet/.txt files, like a local directory of them) into a sorted list of data files
    (and ``save_to_disk`` directories). Under a directory every file of a known format is read,
    subdirectories included; the others are named in one warning."""
    if hub_ref(source, "dataset") is not None:
        return _hub_files(source)
    p = local_path(source, "data.source", "dataset") if source.startswith(OBJECT_STORE_SCHEMES) else Path(source)
    if p.is_dir():
        if _is_saved_dataset(p):
            return [p]
        files, skipped = _walk(p)
        _warn_skipped(source, p, skipped)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UserError(f"data.source: no .jsonl/.parquet/.txt files or saved dataset at '{source}' "
                        "(nor .jsonl.gz or .json files)")
    for f in files:
        if f.is_file() and data_format(f) is None:
            raise UserError(f"data.source: {f} has unsupported suffix '{f.suffix}' (use {', '.join(SUFFIXES)})")
    _check_readable(files)
    return files


def _check_readable(files: list[Path]) -> None:
    for f in files:
        try:
            if f.is_file():
                open(f, "rb").close()
        except OSError as err:
            raise UserError(f"data.source: cannot read {f}: {err.strerror}") from None


def _hub_files(source: str) -> list[Path]:
    root = local_path(source, "data.source", "dataset")
    files = sorted(f for f in root.rglob("*") if f.is_file() and hub_wanted(f.relative_to(root).as_posix(), "dataset"))
    if not files:
        raise UserError(f"data.source: the Hugging Face dataset '{source}' (commit {root.name[:12]}) has no "
                        ".jsonl/.parquet/.txt files")
    _check_readable(files)
    return files


Drops = dict[str, int]  # reason ("null_text", "empty_text") -> rows dropped for it


def _count(drops: Drops, reason: str) -> None:
    drops[reason] = drops.get(reason, 0) + 1


def _reader(f: IO[bytes], path: Path) -> Callable[[], bytes]:
    """``readline(limit)`` of an open file; a damaged gzip stream is one line naming the file,
    wherever in the file the damage is."""
    def read() -> bytes:
        try:
            return f.readline(_LINE_BLOCK)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise UserError(f"data.source: {path} is not a valid gzip file ({err})") from None
        except OSError as err:
            raise UserError(f"data.source: cannot read {path}: {err.strerror or err}") from None
    return read


def _rest(read: Callable[[], bytes]) -> Iterator[bytes]:
    """The further blocks of a line whose first block had no line end."""
    while block := read():
        yield block
        if block.endswith(b"\n"):
            return


def _lines(path: Path) -> Iterator[tuple[int, bytes, Iterator[bytes] | None]]:
    """(line number, line or its first block, the line's further blocks when it is long),
    gunzipped for .jsonl.gz."""
    with (gzip.open if data_format(path) == ".jsonl.gz" else open)(path, "rb") as f:
        read = _reader(f, path)
        for lineno in itertools.count(1):
            head = read()
            if not head:
                return
            if head.endswith(b"\n") or len(head) < _LINE_BLOCK:
                yield lineno, head, None
                continue
            rest = _rest(read)
            yield lineno, head, rest
            for _ in rest:  # the reader stopped early: skip to the next line
                pass


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data.source: {path} line {lineno} is not valid UTF-8") from None


def _decoded(blocks: Iterator[bytes], path: Path, lineno: int) -> Iterator[str]:
    """Blocks of one line decoded as UTF-8 (a character split between blocks is kept whole)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        for raw in blocks:
            yield dec.decode(raw)
        yield dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"data.source: {path} line {lineno} is not valid UTF-8") from None


def _small_record(obj: object, field: str, place: Callable[[], str], drops: Drops) -> str | None:
    """The text of one parsed record; None (counted) for a null or empty one. ``place()``
    names the record for an error (only then worked out: it may cost a scan of the buffer)."""
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"data.text_field: '{field}' not found in {place()} (keys: {keys})")
    text = obj[field]
    if text is None or text == "":
        _count(drops, "null_text" if text is None else "empty_text")
        return None
    if not isinstance(text, str):
        raise UserError(f"data.text_field: '{field}' in {place()} is not a string")
    bad = _SURROGATE.search(text)
    if bad:
        raise UserError(f"data.source: {place()} holds a lone surrogate \\u{ord(bad.group()):04x}, which is not "
                        "Unicode text")
    return text


def _once(raw: str, start: int, end: int, field: str, place: Callable[[], str]) -> None:
    """Refuse a record (``raw[start:end]``) whose top level names the text field twice:
    ``json.loads`` would keep the last silently, and a streamed record cannot."""
    if raw.count(f'"{field}"', start, end) < 2:  # the common case costs one count
        return
    top = json.loads(raw[start:end], object_pairs_hook=_Pairs)
    if isinstance(top, _Pairs) and sum(k == field for k, _ in top) > 1:
        raise UserError(f"data.text_field: '{field}' appears twice in {place()}")


class _Pairs(list):
    """An object's (key, value) pairs as ``json.loads`` read them, duplicates kept."""


def _loads(line: str, field: str, where: str) -> object:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"data.source: {where} is not valid JSON ({err.msg})") from None
    _once(line, 0, len(line), field, lambda: where)
    return obj


def _jsonl(path: Path, field: str, drops: Drops) -> Iterator[Iterator[str]]:
    for lineno, head, rest in _lines(path):
        where = f"{path} line {lineno}"
        if rest is None:
            if not head.strip():
                continue
            text = _small_record(_loads(_utf8(head, path, lineno), field, where), field, lambda: where, drops)
            if text is not None:
                yield iter((text,))
            continue
        c = Chars(_decoded(itertools.chain([head], rest), path, lineno), lineno)
        c.skip_ws()
        if not c.peek():
            continue
        yield from record(c, field, lambda _c: where, drops)
        c.skip_ws()
        if c.peek():
            raise UserError(f"data.source: {where} is not valid JSON (Extra data)")


def _json(path: Path, field: str, drops: Drops) -> Iterator[Iterator[str]]:
    """A JSON array of objects, or JSON lines (one object per line) under a .json name."""
    blocks = _file_text(path)
    c = Chars(blocks)
    c.skip_ws()
    if c.peek() != "[":
        blocks.close()
        yield from _jsonl(path, field, drops)
        return

    index = 0

    def where(c: Chars) -> str:
        line, col = c.position()
        return f"{path} element {index} (line {line} column {col})"
    c.i += 1
    c.skip_ws()
    if c.peek() == "]":
        c.i += 1
    else:
        decoder = json.JSONDecoder()
        for index in itertools.count():
            c.skip_ws()
            c.fill(_LINE_BLOCK)
            try:
                obj, end = decoder.raw_decode(c.buf, c.i)
            except json.JSONDecodeError:  # larger than what is read ahead, or not JSON: parse it as it comes
                yield from record(c, field, where, drops)
            else:
                _once(c.buf, c.i, end, field, lambda: where(c))
                text = _small_record(obj, field, lambda: where(c), drops)
                c.i = end
                if text is not None:
                    yield iter((text,))
            if not more(c, "]", lambda c: f"{path} line {c.position()[0]} column {c.position()[1]}"):
                break
    c.skip_ws()
    if c.peek():
        line, col = c.position()
        raise UserError(f"data.source: {path} line {line} column {col} is not valid JSON (Extra data)")


def _file_text(path: Path) -> Iterator[str]:
    """The whole file decoded as UTF-8, in blocks; an error names the line."""
    dec = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as f:
        while True:
            raw = f.read(_LINE_BLOCK)
            try:
                yield dec.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                line = lines + raw[:max(err.start, 0)].count(b"\n")
                raise UserError(f"data.source: {path} line {line} is not valid UTF-8") from None
            if not raw:
                return
            lines += raw.count(b"\n")


def _txt(path: Path) -> Iterator[Iterator[str]]:
    """One document per non-empty line (a line of whitespace is no document)."""
    for lineno, head, rest in _lines(path):
        if rest is None:
            line = _utf8(head, path, lineno).rstrip("\r\n")
            if line.strip():
                yield iter((line,))
            continue
        doc = _long_line(_decoded(itertools.chain([head], rest), path, lineno))
        first = next(doc, None)
        if first is not None:
            yield itertools.chain([first], doc)
            for _ in doc:
                pass


def _long_line(parts: Iterator[str]) -> Iterator[str]:
    """A long .txt line's text as read, without its line end; nothing if it is all whitespace
    (leading whitespace is held until the line shows text)."""
    lead: list[str] = []
    end = ""  # a run of \r / \n that may be the line's end
    started = False
    for part in parts:
        part = end + part
        text = part.rstrip("\r\n")
        end = part[len(text):]
        if started:
            if text:
                yield text
        elif text.strip():
            started = True
            yield "".join(lead) + text
            lead = []
        else:
            lead.append(text)


def _parquet(path: Path, field: str, drops: Drops) -> Iterator[Iterator[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise UserError(f"data.source: {path} is not a readable Parquet file ({err})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"data.text_field: '{field}' not found in {path} (columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"data.text_field: column '{field}' of {path} holds {kind}, not text")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            column = batch.column(0)
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:
                bad = next(i for i, v in enumerate(column) if v.is_valid and not _valid_utf8(v.as_buffer()))
                raise UserError(f"data.source: {path} row {row + bad} of column '{field}' is not valid UTF-8") from None
            yield from _rows(column.to_pylist(), drops)
            row += len(batch)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"data.source: {path} is not a readable Parquet file ({err})") from None


def _valid_utf8(buf: object) -> bool:
    try:
        bytes(buf).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _rows(texts: list[str | None], drops: Drops) -> Iterator[Iterator[str]]:
    for text in texts:
        if text:
            yield iter((text,))
        else:
            _count(drops, "null_text" if text is None else "empty_text")


def _saved_dataset(path: Path, field: str, drops: Drops) -> Iterator[Iterator[str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"data.source: {path} is not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if field not in ds.column_names:
        raise UserError(f"data.text_field: '{field}' not found in {path} (columns: {', '.join(ds.column_names)})")
    kind = getattr(ds.features[field], "dtype", None)
    if kind not in ("string", "large_string"):
        raise UserError(f"data.text_field: column '{field}' of {path} holds {ds.features[field]}, not text")
    # Arrow-backed and memory-mapped: iterating column batches does not load the corpus.
    batches = ds.select_columns([field]).iter(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except UnicodeDecodeError:
            raise UserError(f"data.source: column '{field}' of the saved dataset {path} is not valid UTF-8") from None
        if batch is None:
            return
        yield from _rows(batch[field], drops)


def iter_texts(data: DataConfig, doc_len: tuple[int, int], seed: int,
               drops: Drops | None = None) -> Iterator[Iterator[str]]:
    """Every document as an iterator of its text's pieces, so a document of any length is
    read in bounded memory; read each before asking for the next. Rows dropped for a null or
    empty text are counted in ``drops``."""
    if data.source == "periodic":
        raise UserError("data.source: 'periodic' documents are token ids, usable only as training data to pack "
                        "(a train phase's data), not as text")
    if data.source == "synthetic":
        yield from (iter((d,)) for d in synthetic_documents(data.synthetic, doc_len, seed))
        return
    drops = {} if drops is None else drops
    for path in resolve_files(data.source):
        kind = None if path.is_dir() else data_format(path)
        if kind is None:
            yield from _saved_dataset(path, data.text_field, drops)
        elif kind in (".jsonl", ".jsonl.gz"):
            yield from _jsonl(path, data.text_field, drops)
        elif kind == ".json":
            yield from _json(path, data.text_field, drops)
        elif kind == ".txt":
            yield from _txt(path)
        else:
            yield from _parquet(path, data.text_field, drops)


def iter_documents(data: DataConfig, doc_len: tuple[int, int], seed: int) -> Iterator[str]:
    """Every document's text whole (for readers that keep a bounded pool of short documents)."""
    for doc in iter_texts(data, doc_len, seed):
        yield "".join(doc)


def source_identity(data: DataConfig) -> object:
    """What about the input data changes the packed windows (content, not paths or mtimes)."""
    if data.source == "synthetic":
        return {"synthetic": data.synthetic.model_dump(mode="json"), "version": 1}
    if data.source == "periodic":
        return {"periodic": data.periodic.model_dump(mode="json"), "version": 1}
    idents = []
    for path in resolve_files(data.source):
        idents.append({"dataset": dir_identity(path)} if path.is_dir() else file_identity(path))
    # A Hub dataset adds its repository and resolved commit; a local source's identity is unchanged.
    return {"files": idents, "text_field": data.text_field, **ref_identity(data.source, "data.source", "dataset")}
