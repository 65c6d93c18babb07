"""Document streams: the synthetic retrieval corpus and files on disk.

Everything here is a generator, so a corpus of any size is read in bounded memory.
Non-UTF-8 input fails with the file and line named: silently skipping bytes would change
what the teacher and student see without anyone noticing.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path
from typing import Iterator

from pipeline.config import DataConfig, PeriodicConfig, SyntheticConfig
from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity, file_identity
from pipeline.locate import OBJECT_STORE_SCHEMES, hub_ref, hub_wanted, local_path, ref_identity

SUFFIXES = (".jsonl", ".parquet", ".txt")


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


def resolve_files(source: str) -> list[Path]:
    """Expand a path, directory of files, glob, or Hugging Face dataset id (``org/name[@revision]``:
    its .jsonl/.parquet/.txt files, like a local directory of them) into a sorted list of data files."""
    if hub_ref(source, "dataset") is not None:
        return _hub_files(source)
    p = local_path(source, "data.source", "dataset") if source.startswith(OBJECT_STORE_SCHEMES) else Path(source)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return [p]
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UserError(f"data.source: no .jsonl/.parquet/.txt files or saved dataset at '{source}'")
    for f in files:
        if f.is_file() and f.suffix not in SUFFIXES:
            raise UserError(f"data.source: {f} has unsupported suffix '{f.suffix}' (use .jsonl, .parquet or .txt)")
        try:
            if f.is_file():
                open(f, "rb").close()
        except OSError as err:
            raise UserError(f"data.source: cannot read {f}: {err.strerror}") from None
    return files


def _hub_files(source: str) -> list[Path]:
    root = local_path(source, "data.source", "dataset")
    files = sorted(f for f in root.rglob("*") if f.is_file() and hub_wanted(f.relative_to(root).as_posix(), "dataset"))
    if not files:
        raise UserError(f"data.source: the Hugging Face dataset '{source}' (commit {root.name[:12]}) has no "
                        ".jsonl/.parquet/.txt files")
    for f in files:
        try:
            open(f, "rb").close()
        except OSError as err:
            raise UserError(f"data.source: cannot read {f}: {err.strerror}") from None
    return files


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"data.source: {path} line {lineno} is not valid UTF-8") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"data.source: {path} line {lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"data.text_field: '{field}' not found in {path} line {lineno} (keys: {keys})")
            text = obj[field]
            if not isinstance(text, str):
                raise UserError(f"data.text_field: '{field}' in {path} line {lineno} is not a string")
            yield text


def _txt(path: Path) -> Iterator[str]:
    """One document per non-empty line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise UserError(f"data.source: {path} line {lineno} is not valid UTF-8") from None
            if line.strip():
                yield line


def _parquet(path: Path, field: str) -> Iterator[str]:
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
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _saved_dataset(path: Path, field: str) -> Iterator[str]:
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
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        for text in batch[field]:
            if text:
                yield text


def iter_documents(data: DataConfig, doc_len: tuple[int, int], seed: int) -> Iterator[str]:
    if data.source == "periodic":
        raise UserError("data.source: 'periodic' documents are token ids, usable only as training data to pack "
                        "(a train phase's data), not as text")
    if data.source == "synthetic":
        yield from synthetic_documents(data.synthetic, doc_len, seed)
        return
    for path in resolve_files(data.source):
        if path.is_dir():
            yield from _saved_dataset(path, data.text_field)
        elif path.suffix == ".jsonl":
            yield from _jsonl(path, data.text_field)
        elif path.suffix == ".txt":
            yield from _txt(path)
        else:
            yield from _parquet(path, data.text_field)


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
