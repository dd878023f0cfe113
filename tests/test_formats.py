"""Record formats and containers: each gives the same token ids and answer masks as the equivalent record in
this package's own format; bad records in each are one line naming their place; mixed inputs in one run."""

import gzip
import json
import os

import numpy as np
import pytest
from tests.tokenizers_for_tests import SENTENCEPIECE_MODEL

from minorsft_megatron.data.dataset import SFTDataset
from minorsft_megatron.data.preprocess import PreprocessSettings, main, preprocess

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "What is 1 plus 1?", "2.", "And 2 plus 2?", "4."

# (record in the format, the same conversation in this package's own format)
EQUIVALENT = {
    "prompt_response": ({"prompt": Q1, "response": A1, "system": SYSTEM},
                        {"prompt": Q1, "response": A1, "system": SYSTEM}),
    "messages": ({"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                               {"role": "user", "content": [{"type": "text", "text": "What is"},
                                                            {"type": "text", "text": "1 plus 1?"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": A1}]}]},
                 {"prompt": "What is\n1 plus 1?", "response": A1, "system": SYSTEM}),
    "sharegpt": ({"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                                    {"from": "gpt", "value": A1}]},
                 {"prompt": Q1, "response": A1, "system": SYSTEM}),
    "alpaca": ({"instruction": "Add the numbers.", "input": "1 and 1", "output": A1, "system": SYSTEM},
               {"prompt": "Add the numbers.\n1 and 1", "response": A1, "system": SYSTEM}),
    "prompt_completion": ({"prompt": Q1, "completion": A1}, {"prompt": Q1, "response": A1}),
}
CONTAINERS = ("jsonl", "json", "jsonl.gz", "parquet", "hf_dataset")


def write(path, records, container):
    """`records` written in `container` at `path` (+ its extension); returns the input path."""
    if container == "hf_dataset":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_list(records).save_to_disk(str(path))
        return str(path)
    target = f"{path}.{container}"
    if container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), target)
    elif container == "json":
        with open(target, "w") as f:
            json.dump(records, f, indent=2)  # one object over several lines
    else:
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        with (gzip.open if container == "jsonl.gz" else open)(target, "wb") as f:
            f.write(text)
    return target


def samples(prefix):
    data = SFTDataset(prefix)
    return [(data.tokens(i).tolist(), data.answer_mask(i).tolist()) for i in range(len(data))]


def run(tmp_path, inputs, name="out", **settings):
    prefix = str(tmp_path / name)
    meta = preprocess(PreprocessSettings(inputs=inputs, tokenizer=SENTENCEPIECE_MODEL, output_prefix=prefix,
                                         chat_template="chatml", **settings), log=lambda *_: None)
    return meta, samples(prefix)


def test_every_format_in_every_container_gives_the_tokens_and_masks_of_its_own_format_equivalent(tmp_path):
    """One file per (format, container) in a single mixed run; the sidecar names each file's format."""
    inputs, expected, formats = [], [], []
    for container in CONTAINERS:
        for name, (record, ours) in EQUIVALENT.items():
            second = dict(record)  # a second record per file, so detection and row numbers are exercised
            inputs.append(write(tmp_path / f"{name}_{container.replace('.', '_')}", [record, second], container))
            expected += [ours, ours]
            formats.append(name)
    ours_path = write(tmp_path / "ours", expected, "jsonl")
    _, reference = run(tmp_path, [ours_path], "reference")
    meta, got = run(tmp_path, inputs, "nested/new/dir/mixed")  # the output directory is created
    assert got == reference
    assert [i["record_formats"] for i in meta["inputs"]] == [{name: 2} for name in formats]
    assert [i["container"] for i in meta["inputs"]] == [c for c in CONTAINERS for _ in EQUIVALENT]


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path):
    """TRL's prompt-completion with lists of messages: assistant turns in the prompt are context, not answers."""
    conversation = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                    {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    pc = write(tmp_path / "pc", [{"prompt": conversation[:3], "completion": conversation[3:]}], "jsonl")
    full = write(tmp_path / "full", [{"messages": conversation}], "jsonl")
    _, [(ids, mask)] = run(tmp_path, [pc], "pc")
    _, [(full_ids, full_mask)] = run(tmp_path, [full], "full")
    assert ids == full_ids
    spans = np.flatnonzero(np.diff(np.r_[0, full_mask, 0]))  # [start, end) of each answer
    assert len(spans) == 4
    expected = np.zeros(len(ids), dtype=int)
    expected[spans[2]:spans[3]] = 1  # only the second (the completion's) answer
    assert mask == expected.tolist()


def test_one_file_may_mix_formats(tmp_path):
    """Each record's keys decide its format (this package's files have always mixed prompt_response and
    messages); a record with part of a format's keys is read in its file's first record's format."""
    mixed = write(tmp_path / "mixed", [record for record, _ in EQUIVALENT.values()], "jsonl")
    ours = write(tmp_path / "ours", [ours for _, ours in EQUIVALENT.values()], "jsonl")
    meta, got = run(tmp_path, [mixed], "mixed")
    assert got == run(tmp_path, [ours], "ours")[1]
    assert meta["inputs"][0]["record_formats"] == {name: 1 for name in sorted(EQUIVALENT)}


def test_alpaca_history_and_an_empty_input_are_joined_as_llama_factory_does(tmp_path):
    alpaca = write(tmp_path / "a", [{"instruction": Q2, "input": "", "output": A2, "history": [[Q1, A1]]}], "jsonl")
    ours = write(tmp_path / "o", [{"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                                                {"role": "user", "content": Q2},
                                                {"role": "assistant", "content": A2}]}], "jsonl")
    assert run(tmp_path, [alpaca], "a")[1] == run(tmp_path, [ours], "o")[1]


def test_columns_and_splits_select_what_is_read(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    rows = [{"question": Q1, "answer": A1, "chosen": [{"role": "user", "content": Q2},
                                                      {"role": "assistant", "content": A2}]}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    _, by_columns = run(tmp_path, [str(tmp_path / "dd")], "c", split="train",
                        columns={"prompt": "question", "response": "answer"})
    _, reference = run(tmp_path, [write(tmp_path / "r", [{"prompt": Q1, "response": A1}], "jsonl")], "r")
    assert by_columns == reference
    _, chosen = run(tmp_path, [str(tmp_path / "dd")], "m", split="test", columns={"messages": "chosen"})
    _, reference = run(tmp_path, [write(tmp_path / "q", [{"prompt": Q2, "response": A2}], "jsonl")], "q")
    assert chosen == reference


GOOD = {"prompt": Q1, "response": A1}
GOOD_PC = {"prompt": [{"role": "user", "content": Q2}], "completion": [{"role": "assistant", "content": A2}]}
GOOD_MESSAGES = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]}
BAD_RECORDS = {  # (a good first record, which sets the file's format; the bad second record; what the error says)
    "image part": (GOOD_MESSAGES,
                   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": A1}]}]},
                   "messages[0].content[0]: a 'image_url' part; only text parts can be trained on"),
    "sharegpt speaker": ({"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]},
                         {"conversations": [{"from": "human", "value": Q1}, {"from": "function_call", "value": "f"}]},
                         "conversations[1].from is 'function_call', expected one of"),
    "alpaca without instruction": ({"instruction": Q1, "output": A1}, {"input": Q1, "output": A1},
                                   "'instruction' is missing"),
    "completion of the wrong type": (GOOD_PC, {"prompt": Q1, "completion": [{"role": "assistant", "content": A1}]},
                                     "'prompt' and 'completion' must be two strings or two lists of messages"),
    "completion by the user": (GOOD_PC, {"prompt": [{"role": "user", "content": Q1}],
                                         "completion": [{"role": "user", "content": A1}]},
                               "completion[0].role is 'user', expected one of assistant"),
    "two formats": (GOOD, {"prompt": Q1, "completion": A1, "response": A1}, "holds the keys of several formats"),
    "no format": (GOOD, {"question": Q1, "answer": A1}, "no known record format in its keys (answer, question)"),
    "duplicate keys": (GOOD, '{"prompt": "a", "response": "b", "response": "c"}', "the key 'response' appears twice"),
}


@pytest.mark.parametrize("container", ["jsonl", "json"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_of_every_format_are_one_line_naming_file_and_line(tmp_path, capsys, container, case):
    good, bad, message = BAD_RECORDS[case]
    text = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / f"in.{container}"
    path.write_text(json.dumps(good) + "\n" + text + "\n" if container == "jsonl" else
                    "[\n" + json.dumps(good) + ",\n\n" + text + "\n]\n")
    status = main(["--input", str(path), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                   str(tmp_path / "out"), "--chat-template", "chatml"])
    err = capsys.readouterr().err.strip()
    place = f"{path}:2" if container == "jsonl" else f"{path}:4"
    assert status == 1 and err.startswith(f"error: {place}: ") and message in err and "\n" not in err, err
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("container", ["parquet", "hf_dataset"])
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, capsys, container):
    _, image, message = BAD_RECORDS["image part"]
    cases = [([GOOD, {"prompt": Q1, "response": " "}], "row 1: 'response' is empty"),
             ([image, image], f"row 0: {message}")]
    for i, (rows, expected) in enumerate(cases):
        path = write(tmp_path / f"in{i}", rows, container)
        status = main(["--input", path, "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                       str(tmp_path / "out"), "--chat-template", "chatml"])
        err = capsys.readouterr().err.strip()
        assert status == 1 and err == f"error: {path}: {expected}"
        assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]


def test_skip_bad_records_works_for_rows(tmp_path, capsys):
    path = write(tmp_path / "rows", [GOOD, {"prompt": Q1, "response": " "}, GOOD], "parquet")
    meta, got = run(tmp_path, [path], skip_bad_records=True)
    assert meta["counts"]["bad_records"] == 1 and len(got) == 2
    assert meta["bad_records_listed"] == [f"{path}: row 1: 'response' is empty"]


@pytest.mark.parametrize("content,message", [
    ("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "\n", "{p}:3: malformed JSON list"),
    ("[\n" + json.dumps(GOOD) + " " + json.dumps(GOOD) + "]", "{p}:2: malformed JSON list: expected ',' or ']'"),
])
def test_a_broken_json_list_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "list.json"
    path.write_text(content)
    assert main(["--input", str(path), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(p=path)) and "\n" not in err, err


def test_unreadable_containers_and_bad_options_are_one_line(tmp_path, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b not gzip")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "plain_dir" / "x").write_text("x")
    import datasets

    datasets.disable_progress_bars()
    datasets.DatasetDict({"a": datasets.Dataset.from_list([GOOD]), "b": datasets.Dataset.from_list([GOOD])}
                         ).save_to_disk(str(tmp_path / "dd"))
    cases = {
        (str(tmp_path / "broken.parquet"),): "broken.parquet: not a readable Parquet file",
        (str(tmp_path / "broken.jsonl.gz"),): "broken.jsonl.gz: cannot be read",
        (str(tmp_path / "plain_dir"),): "plain_dir: a directory, but not one written by datasets' save_to_disk",
        (str(tmp_path / "dd"),): "dd: choose a split with --split (a, b)",
        (str(tmp_path / "dd"), "--split", "c"): "dd: --split c: no such split (a, b)",
        (str(tmp_path / "dd"), "--split", "a", "--columns", "answer"): "expected KEY=COLUMN",
        (str(tmp_path / "dd"), "--split", "a", "--columns", "reply=x"): "--columns: reply is not a record key",
        (str(tmp_path / "dd"), "--split", "a", "--format", "csv"): "argument --format: invalid choice: 'csv'",
        (str(tmp_path / "dd"), "--split", "a", "--columns", "prompt=q"): "the column(s) q named by --columns",
    }
    for (path, *options), message in cases.items():
        status = main(["--input", path, *options, "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                       str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert status == 1 and message in err and "\n" not in err and err.startswith("error: "), (message, err)


def test_what_editors_and_exporters_write_is_read(tmp_path):
    """A UTF-8 byte-order mark; pandas' to_json nulls for another format's columns; OpenAI's weight 0 (context)
    and 1 (answer); a column for an optional key that is null in some Parquet rows."""
    ours = write(tmp_path / "ours", [{"prompt": Q1, "response": A1}, {"prompt": Q2, "response": A2, "system": SYSTEM}],
                 "jsonl")
    _, reference = run(tmp_path, [ours], "reference")
    bom_jsonl, bom_json = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    records = [{"prompt": Q1, "response": A1, "messages": None},
               {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q2},
                             {"role": "assistant", "content": A2}], "prompt": None, "response": None}]
    bom_jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert run(tmp_path, [str(bom_jsonl)], "a")[1] == reference
    assert run(tmp_path, [str(bom_json)], "b")[1] == reference
    rows = write(tmp_path / "rows", [{"q": Q1, "a": A1, "sys": None}, {"q": Q2, "a": A2, "sys": SYSTEM}], "parquet")
    assert run(tmp_path, [rows], "c", columns={"prompt": "q", "response": "a", "system": "sys"})[1] == reference
    weighted = write(tmp_path / "w", [{"messages": [{"role": "user", "content": Q1},
                                                    {"role": "assistant", "content": A1, "weight": 0},
                                                    {"role": "user", "content": Q2},
                                                    {"role": "assistant", "content": A2, "weight": 1}]}], "jsonl")
    context = write(tmp_path / "pc", [{"prompt": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                                                  {"role": "user", "content": Q2}],
                                       "completion": [{"role": "assistant", "content": A2}]}], "jsonl")
    assert run(tmp_path, [weighted], "d")[1] == run(tmp_path, [context], "e")[1]


@pytest.mark.parametrize("name,content,message", [
    ("two.json", "[" + json.dumps(GOOD) + "]\n[" + json.dumps(GOOD) + "]\n",
     "two.json:2: malformed JSON list: more text after the list's closing ']'"),
    ("weight.jsonl", json.dumps({"messages": [{"role": "user", "content": Q1},
                                              {"role": "assistant", "content": A1, "weight": 0.5}]}) + "\n",
     "weight.jsonl:1: messages[1].weight must be 0 or 1, got 0.5"),
])
def test_more_bad_inputs_are_one_line(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    assert main(["--input", str(tmp_path / name), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}/{message}", err


def test_damaged_gzip_and_dataset_dict_are_one_line(tmp_path, capsys):
    import datasets

    datasets.disable_progress_bars()
    data = gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(2000))).encode())
    middle = len(data) // 2
    (tmp_path / "bad.jsonl.gz").write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                                            + data[middle + 64:])
    datasets.DatasetDict({"a": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "dataset_dict.json").write_text("{not json")
    for path, message in ((tmp_path / "bad.jsonl.gz", "bad.jsonl.gz: cannot be read"),
                          (tmp_path / "dd", "dd: dataset_dict.json is damaged")):
        assert main(["--input", str(path), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix",
                     str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
