"""SFT records -> megatron-core IndexedDataset files of token ids and answer masks, plus a JSON sidecar.

Inputs: .jsonl, .jsonl.gz, .json (a list), Parquet, or a Hugging Face datasets directory (data/sources.py), in any
of the record formats of data/formats.py, detected per record from its keys (or forced with --format); a record
holding part of a format's keys is read in its file's format (its first record's), naming what is missing.

Outputs for `--output-prefix P`:
  P_tokens.bin / .idx        token ids, one sequence per sample (megatron-core IndexedDataset)
  P_answer_mask.bin / .idx   uint8, 1 where that token is an answer token (the loss mask before the shift:
                             the label at position t is token t + 1, trained when answer_mask[t + 1] == 1)
  P.json                     sidecar: tokenizer identity, template, settings, counts, fingerprint

Sample i of the output is the i-th record kept, reading the inputs in order, whatever the worker count. The
files are written under temporary names and renamed only once everything succeeded, sidecar last (an old
sidecar is removed first), so a crash never leaves a dataset that loads.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from minorsft_megatron.errors import UserError
from minorsft_megatron import paths
from minorsft_megatron.data import sources
from minorsft_megatron.data.formats import FORMATS, detect_format, record_messages, select_columns
from minorsft_megatron.data.records import RecordError, parse_json_record
from minorsft_megatron.data.templates import ChatTemplate, resolve_template, tokenize_conversation
from minorsft_megatron.data.tokenizer import SFTTokenizer, TokenizerError, load_tokenizer

FORMAT_VERSION = 2  # 2: record formats and containers recorded per input
TRUNCATE_MODES = ("answer", "drop")
WORKERS_PER_CPU = 4
CHUNK_LINES = 256
MAX_LISTED_BAD_RECORDS = 100


class PreprocessError(UserError):
    """Input or settings that stop preprocessing; the message is one line, FILE:LINE first where known."""


@dataclass
class PreprocessSettings:
    inputs: list[str]
    """Record files or datasets directories (data/sources.py), read in this order."""
    tokenizer: str
    """SentencePiece .model, Hugging Face tokenizer directory, or tiktoken vocabulary .json."""
    output_prefix: str
    """Output path prefix (see the module docstring for the files)."""
    chat_template: str | None = None
    """'auto', 'none', 'chatml', 'llama3'; None: 'auto' if the tokenizer has a template, else 'none'."""
    seq_length: int | None = None
    """Model positions per row: a sample of seq_length + 1 tokens fills them. None: no limit."""
    truncate: str = "answer"
    """Samples over seq_length + 1 tokens: 'answer' cuts their end, 'drop' leaves them out. Both counted."""
    workers: int = 1
    """Tokenizing processes. Does not change a byte of the output."""
    skip_bad_records: bool = False
    """Count and skip bad records (with a warning each) instead of stopping at the first."""
    record_format: str | None = None
    """A format of data/formats.py for every record; None: detected per record from its keys."""
    columns: dict[str, str] = field(default_factory=dict)
    """Format key -> the column holding it (e.g. {"messages": "chosen"}), for files with other names or
    several sets of text columns."""
    split: str | None = None
    """The split to read from Hugging Face DatasetDict directories (needed when one holds several)."""


def check_settings(s: PreprocessSettings) -> None:
    if not s.inputs:
        raise PreprocessError("--input: no input files given")
    if s.record_format is not None and s.record_format not in FORMATS:
        raise PreprocessError(f"--format {s.record_format!r} is not one of auto, {', '.join(FORMATS)}")
    keys = {key for f in FORMATS.values() for key in f.keys} | {"system", "input", "history"}
    unknown = sorted(set(s.columns) - keys)
    if unknown:
        raise PreprocessError(f"--columns: {', '.join(unknown)} is not a record key (known: {', '.join(sorted(keys))})")
    if s.truncate not in TRUNCATE_MODES:
        raise PreprocessError(f"--truncate {s.truncate!r} is not one of {', '.join(TRUNCATE_MODES)}")
    if s.seq_length is not None and s.seq_length < 1:
        raise PreprocessError(f"--seq-length must be at least 1, got {s.seq_length}")
    if s.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {s.workers}")
    if s.workers > max_workers():
        raise PreprocessError(f"--workers {s.workers}: at most {max_workers()} on this machine ({WORKERS_PER_CPU} per "
                              "CPU core; more only fight over the cores)")
    check_outputs(s)


def max_workers() -> int:
    return WORKERS_PER_CPU * (os.cpu_count() or 1)


def check_outputs(s: PreprocessSettings) -> None:
    """The output files can be written (their directory is created if missing) and replace no input."""
    try:
        paths.check_writable_dir(os.path.dirname(os.path.abspath(s.output_prefix)), "--output-prefix")
        outputs = {f"--output-prefix's {os.path.basename(path)}": path for path in output_paths(s.output_prefix).values()}
        paths.check_apart(outputs, {**{f"--input {path}": path for path in s.inputs}, "--tokenizer": s.tokenizer})
    except paths.PathError as err:
        raise PreprocessError(str(err))


def output_paths(prefix: str) -> dict[str, str]:
    return {
        "tokens_bin": f"{prefix}_tokens.bin", "tokens_idx": f"{prefix}_tokens.idx",
        "mask_bin": f"{prefix}_answer_mask.bin", "mask_idx": f"{prefix}_answer_mask.idx",
        "sidecar": f"{prefix}.json",
    }


def open_sources(s: PreprocessSettings) -> list[sources.Source]:
    try:
        return [sources.open_source(path, s.split) for path in s.inputs]
    except sources.SourceError as err:
        raise PreprocessError(str(err))


def fingerprint(input_hashes: list[str], formats: list[dict], tokenizer: SFTTokenizer,
                template: ChatTemplate, s) -> str:
    """Hash of everything that decides the output bytes: inputs and how they were read (record formats, forced or
    not, columns), tokenizer files, template text, settings."""
    identity = {
        "format_version": FORMAT_VERSION, "inputs": input_hashes, "record_formats": formats,
        "forced_format": s.record_format, "columns": s.columns, "tokenizer": [tokenizer.library, tokenizer.sha256],
        "chat_template": template.sha256,
        "seq_length": s.seq_length, "truncate": s.truncate,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# ---- per-record work (runs in worker processes) ------------------------------------------------------------

@dataclass
class _Job:
    tokenizer: SFTTokenizer
    template: ChatTemplate
    seq_length: int | None
    truncate: str
    inputs: list[sources.Source]
    formats: list[str | None]
    """Per input: its first record's format, for records holding only part of a format's keys (None: no record
    of it has a known format); with `forced`, the format of every record."""
    forced: bool
    columns: dict[str, str]


_JOB: _Job | None = None


def fit_to_length(ids: np.ndarray, mask: np.ndarray, seq_length: int | None, truncate: str):
    """(ids, mask, status): status 'ok', 'truncated' (end cut to seq_length + 1 tokens) or 'dropped'.

    A cut that leaves no answer token to predict (mask[1:] all 0) drops the sample instead.
    """
    if seq_length is None or len(ids) <= seq_length + 1:
        return ids, mask, "ok"
    if truncate == "drop":
        return ids, mask, "dropped"
    ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
    return ids, mask, ("truncated" if mask[1:].any() else "dropped")


def process_record(record, file_index: int):
    """('sample', ids, mask, status, format) | ('blank',) | ('bad', message) for one record (JSON text or a
    row)."""
    job = _JOB
    try:
        obj = parse_json_record(record) if isinstance(record, bytes) else record
        if obj is None:
            return ("blank",)
        name, messages = record_messages(obj, job.formats[file_index], job.columns, job.tokenizer.special_tokens,
                                         job.forced)
        ids, mask = tokenize_conversation(messages, job.template, job.tokenizer)
    except RecordError as err:
        return ("bad", str(err))
    return ("sample", *fit_to_length(ids, mask, job.seq_length, job.truncate), name)


def process_chunk(chunk):
    return [(where, process_record(record, where[0])) for where, record in chunk]


def read_chunks(inputs: list[sources.Source]):
    """Lists of ((file_index, line or row number), record), CHUNK_LINES at a time, in input order."""
    chunk = []
    for file_index, source in enumerate(inputs):
        for number, record in sources.records(source):
            chunk.append(((file_index, number), record))
            if len(chunk) == CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def processed_records(inputs: list[sources.Source], workers: int):
    """((file_index, number), result) for every record, in input order, computed by `workers` processes."""
    if workers == 1:
        for chunk in read_chunks(inputs):
            yield from process_chunk(chunk)
        return
    context = multiprocessing.get_context("fork")  # workers inherit the loaded tokenizer (_JOB)
    with context.Pool(workers) as pool:
        for results in pool.imap(process_chunk, read_chunks(inputs), chunksize=1):
            yield from results


def file_format(source: sources.Source, columns: dict[str, str]) -> str | None:
    """The format of a file's first record that has one (records before it are bad; they are reported as such
    when processed); None when none has."""
    for _, record in sources.records(source):
        try:
            obj = parse_json_record(record) if isinstance(record, bytes) else record
            if obj is not None:
                return detect_format(select_columns(obj, columns))
        except RecordError:
            continue
    return None


# ---- writing --------------------------------------------------------------------------------------------------

@dataclass
class Counts:
    records: int = 0
    samples: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    bad_records: int = 0
    max_sample_tokens: int = 0
    bad_record_list: list = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    """(input index, record format) -> samples."""


class _Writers:
    """megatron-core IndexedDatasetBuilders for tokens and answer masks, under temporary names."""

    def __init__(self, paths: dict[str, str], token_dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.tmp = {k: f"{v}.tmp{os.getpid()}" for k, v in paths.items()}
        self.tokens = IndexedDatasetBuilder(self.tmp["tokens_bin"], dtype=token_dtype)
        self.mask = IndexedDatasetBuilder(self.tmp["mask_bin"], dtype=np.uint8)

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.tokens.add_document(ids, [len(ids)])
        self.mask.add_document(mask, [len(mask)])

    def finalize(self) -> None:
        self.tokens.finalize(self.tmp["tokens_idx"])
        self.mask.finalize(self.tmp["mask_idx"])

    def close(self) -> None:
        for builder in (self.tokens, self.mask):
            builder.data_file.close()

    def remove_temporaries(self) -> None:
        try:
            self.close()
        except OSError:  # a full disk fails the last flush too; the files go anyway
            pass
        for path in self.tmp.values():
            if os.path.exists(path):
                os.remove(path)


def commit(tmp: dict[str, str], final: dict[str, str]) -> None:
    """Rename temporaries into place: old sidecar first out, new sidecar last in."""
    if os.path.exists(final["sidecar"]):
        os.remove(final["sidecar"])
    for key in ("tokens_bin", "tokens_idx", "mask_bin", "mask_idx", "sidecar"):
        os.replace(tmp[key], final[key])


def _record_result(result, where, counts: Counts, writers: _Writers, s: PreprocessSettings, warn) -> None:
    kind = result[0]
    if kind == "blank":
        return
    counts.records += 1
    location = _JOB.inputs[where[0]].place(where[1])
    if kind == "bad":
        if not s.skip_bad_records:
            raise PreprocessError(f"{location}: {result[1]}")
        counts.bad_records += 1
        if len(counts.bad_record_list) < MAX_LISTED_BAD_RECORDS:
            counts.bad_record_list.append(f"{location}: {result[1]}")
            warn(f"{location}: warning: skipped: {result[1]}")
        return
    _, ids, mask, status, name = result
    counts.formats[where[0], name] = counts.formats.get((where[0], name), 0) + 1
    if status == "dropped":
        counts.dropped_too_long += 1
        return
    counts.truncated += status == "truncated"
    writers.add(ids, mask)
    counts.samples += 1
    counts.tokens += len(ids)
    counts.answer_tokens += int(mask.sum())
    counts.max_sample_tokens = max(counts.max_sample_tokens, len(ids))


def sidecar(s, job: _Job, input_hashes, counts: Counts, token_dtype, prefix) -> dict:
    listed = counts.bad_record_list
    numbers = {k: v for k, v in asdict(counts).items() if k not in ("bad_record_list", "formats")}
    tokenizer, template = job.tokenizer, job.template
    formats_read = [{name: n for (i, name), n in sorted(counts.formats.items()) if i == index}
                    for index in range(len(job.inputs))]  # per input: samples read in each record format
    return {
        "format": "minorsft-megatron SFT dataset", "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(input_hashes, formats_read, tokenizer, template, s),
        "inputs": [{"path": os.path.abspath(source.path), "container": source.container, "split": source.split,
                    "record_formats": read, "bytes": sources.size(source), "sha256": h}
                   for source, read, h in zip(job.inputs, formats_read, input_hashes)],
        "forced_format": s.record_format, "columns": s.columns,
        "tokenizer": tokenizer.identity,
        "chat_template": {"name": template.name, "sha256": template.sha256},
        "settings": {"seq_length": s.seq_length, "truncate": s.truncate},
        "counts": numbers,
        "bad_records_listed": listed,
        "files": {"tokens": f"{os.path.basename(prefix)}_tokens", "answer_mask": f"{os.path.basename(prefix)}_answer_mask"},
        "token_dtype": np.dtype(token_dtype).name,
    }


def new_job(s: PreprocessSettings) -> _Job:
    """The inputs opened, the tokenizer loaded, the template resolved, each input's fallback format found."""
    inputs = open_sources(s)
    try:
        tokenizer = load_tokenizer(s.tokenizer)
        template = resolve_template(s.chat_template, tokenizer)
    except TokenizerError as err:
        raise PreprocessError(str(err))
    formats = [s.record_format or file_format(source, s.columns) for source in inputs]
    return _Job(tokenizer, template, s.seq_length, s.truncate, inputs, formats, s.record_format is not None,
                s.columns)


def preprocess(s: PreprocessSettings, log=print, warn=None) -> dict:
    """Run the whole conversion; returns the sidecar dict. Raises PreprocessError (nothing left written)."""
    global _JOB
    from megatron.core.datasets.indexed_dataset import DType

    warn = warn or (lambda message: print(message, file=sys.stderr))
    check_settings(s)
    _JOB = new_job(s)
    inputs, template = _JOB.inputs, _JOB.template
    input_hashes = [sources.sha256(source) for source in inputs]
    token_dtype = DType.optimal_dtype(_JOB.tokenizer.vocab_size)
    final = output_paths(s.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(s.output_prefix)), exist_ok=True)
    for path in final.values():
        paths.remove_stale_temporaries(path)
    counts, start = Counts(), time.perf_counter()
    writers = _Writers(final, token_dtype)
    try:
        with progress_bar(inputs) as bar:
            for where, result in processed_records(inputs, s.workers):
                _record_result(result, where, counts, writers, s, warn)
                bar.update(1)
        if counts.samples == 0:
            raise PreprocessError(
                f"{', '.join(s.inputs)}: no samples ({counts.records} records: {counts.bad_records} bad, "
                f"{counts.dropped_too_long} too long)"
            )
        writers.finalize()
        meta = sidecar(s, _JOB, input_hashes, counts, token_dtype, s.output_prefix)
        with open(writers.tmp["sidecar"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        commit(writers.tmp, final)
    except BaseException:
        writers.remove_temporaries()
        raise
    finally:
        _JOB = None
    seconds = time.perf_counter() - start
    log(summary(counts, seconds, template, final))
    return meta


def progress_bar(inputs: list[sources.Source]):
    """A tqdm bar of records processed, on a terminal only (stderr); a silent counter elsewhere."""
    from tqdm import tqdm

    label = inputs[0].label if len(inputs) == 1 else f"{len(inputs)} inputs"
    return tqdm(desc=f"preprocessing {label}", unit=" records", disable=not sys.stderr.isatty(), leave=False,
                mininterval=0.5)


def summary(c: Counts, seconds: float, template: ChatTemplate, final: dict[str, str]) -> str:
    rate = max(seconds, 1e-9)
    return (
        f"{c.records} records -> {c.samples} samples, {c.tokens} tokens ({c.answer_tokens} answer tokens); "
        f"truncated {c.truncated}, dropped (too long) {c.dropped_too_long}, bad records skipped "
        f"{c.bad_records}; template {template.name}; {seconds:.2f} s, {c.samples / rate:.0f} samples/s, "
        f"{c.tokens / rate:.0f} tokens/s\nwrote {final['tokens_bin'][:-len('_tokens.bin')]}"
        "_{tokens,answer_mask}.{bin,idx} and .json"
    )


# ---- command line -------------------------------------------------------------------------------------------

class _Parser:
    """The command line, with one-line errors (cli.ArgumentParser; usage on --help only)."""

    def __new__(cls):
        import argparse

        from minorsft_megatron.cli import ArgumentParser

        p = ArgumentParser(prog="preprocess_sft_data.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help=".jsonl, .jsonl.gz, .json (a list), .parquet files or datasets save_to_disk directories, in "
                            "order; any mix of record formats")
        p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                       help="the record format of every record (default: detected per record from its keys)")
        p.add_argument("--columns", default=None, type=columns_argument, metavar="KEY=COLUMN[,KEY=COLUMN]",
                       help="read a format's key from another column, e.g. messages=chosen or "
                            "prompt=question,response=answer")
        p.add_argument("--split", default=None, metavar="NAME",
                       help="the split of a datasets DatasetDict directory (needed when it holds several)")
        p.add_argument("--tokenizer", required=True, metavar="PATH",
                       help="SentencePiece .model, Hugging Face tokenizer directory, or tiktoken vocabulary .json")
        p.add_argument("--output-prefix", required=True, metavar="PREFIX")
        p.add_argument("--chat-template", default=None, metavar="NAME",
                       help="auto | none | chatml | llama3 (default: auto if the tokenizer has one, else none)")
        p.add_argument("--seq-length", type=int, default=None, metavar="N",
                       help="model positions per row; samples over N + 1 tokens follow --truncate")
        p.add_argument("--truncate", default="answer", choices=TRUNCATE_MODES)
        p.add_argument("--workers", type=int, default=1, metavar="K")
        p.add_argument("--skip-bad-records", action="store_true",
                       help="skip bad records with a counted warning instead of stopping")
        return p


def columns_argument(text: str) -> dict[str, str]:
    """`KEY=COLUMN[,KEY=COLUMN]` -> {KEY: COLUMN}."""
    import argparse

    pairs = [item.partition("=") for item in text.split(",")]
    if any(not key or not sep or not column for key, sep, column in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=COLUMN[,KEY=COLUMN], got {text!r}")
    return {key.strip(): column.strip() for key, _, column in pairs}


def argv_prefix(argv) -> str | None:
    """The --output-prefix of a command line, for messages about errors that name no file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[argv.index("--output-prefix") + 1] if "--output-prefix" in argv[:-1] else None


def main(argv=None) -> int:
    """Command line entry; returns the exit status (0, or 1 with one line on stderr)."""
    import warnings

    from minorsft_megatron.compat import check_megatron_version

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # import-time notes about Apex/TE
    try:
        check_megatron_version()
        args = _Parser().parse_args(argv)
        settings = PreprocessSettings(
            inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
            chat_template=args.chat_template, seq_length=args.seq_length, truncate=args.truncate,
            workers=args.workers, skip_bad_records=args.skip_bad_records, columns=args.columns or {},
            record_format=None if args.format == "auto" else args.format, split=args.split,
        )
        preprocess(settings)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a vanished directory: nothing was left written
        where = err.filename or (argv_prefix(argv) or "the output")
        print(f"error: {where}: {err.strerror or err}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
