"""JSONL -> indexed dataset: templates and masks per tokenizer library, truncation, bad input, determinism."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.tokenizers_for_tests import (
    CORPUS, DATA, REPO, SENTENCEPIECE_MODEL, huggingface_dir, tiktoken_vocab,
)

from minorsft_megatron.data.dataset import SFTDataset
from minorsft_megatron.data.preprocess import PreprocessSettings, main, preprocess
from minorsft_megatron.data.templates import resolve_template, tokenize_conversation
from minorsft_megatron.data.tokenizer import TokenizerError, load_tokenizer

TRAIN = os.path.join(DATA, "sft_train.jsonl")
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And twice that, in Ünïcode 日本?"},
    {"role": "assistant", "content": "2 * 42 = 84, ça va."},
]


# ---- expected texts, written out independently of the package's templates --------------------------------

def chatml_text(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chatml_answers(messages):
    return "".join(f"{m['content']}<|im_end|>" for m in messages if m["role"] == "assistant")


def llama3_text(messages):
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return "<|begin_of_text|>" + turns


def llama3_answers(messages):
    return "".join(f"{m['content'].strip()}<|eot_id|>" for m in messages if m["role"] == "assistant")


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(SENTENCEPIECE_MODEL)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {bos: huggingface_dir(str(root / f"bos{int(bos)}"), adds_bos=bos) for bos in (False, True)}


@pytest.mark.parametrize("name,text,answers", [("chatml", chatml_text, chatml_answers),
                                                ("llama3", llama3_text, llama3_answers)])
def test_builtin_template_decodes_to_templated_text_and_masks_answers(sp, name, text, answers):
    ids, mask = tokenize_conversation(CONVERSATION, resolve_template(name, sp), sp)
    assert sp.decode(ids) == text(CONVERSATION)
    assert sp.decode(ids[mask == 1]) == answers(CONVERSATION)
    # the answer tokens are exactly the assistant spans: contiguous runs, one per assistant turn
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])) == 1)
    assert len(runs) == 2


@pytest.mark.parametrize("adds_bos", [False, True])
def test_hugging_face_auto_template(hf_dirs, adds_bos):
    tok = load_tokenizer(hf_dirs[adds_bos])
    assert tok.adds_bos is adds_bos
    template = resolve_template(None, tok)  # default: the tokenizer's own template
    assert template.name == "auto"
    ids, mask = tokenize_conversation(CONVERSATION, template, tok)
    assert tok.decode(ids) == chatml_text(CONVERSATION)  # the chat template adds no BOS, and neither do we
    assert tok.decode(ids[mask == 1]) == chatml_answers(CONVERSATION)


@pytest.mark.parametrize("library", ["sentencepiece", "huggingface-bos", "tiktoken"])
def test_template_none_is_bos_prompt_response_eos(sp, hf_dirs, tmp_path, library):
    tok = {"sentencepiece": lambda: sp, "huggingface-bos": lambda: load_tokenizer(hf_dirs[True]),
           "tiktoken": lambda: load_tokenizer(tiktoken_vocab(str(tmp_path / "vocab.json")))}[library]()
    prompt, response = "What is the capital of Perú?", "Lima, 日本 is elsewhere."
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids, mask = tokenize_conversation(messages, resolve_template("none", tok), tok)
    bos = [tok.bos_id] if library == "huggingface-bos" else []
    answer = tok.encode(response) + [tok.eos_id]
    assert ids.tolist() == bos + tok.encode(prompt) + answer
    assert mask.tolist() == [0] * (len(ids) - len(answer)) + [1] * len(answer)
    assert tok.decode(tok.encode(prompt)) == prompt and tok.decode(tok.encode(response)) == response


def test_template_refusals(sp, tmp_path):
    tik = load_tokenizer(tiktoken_vocab(str(tmp_path / "vocab.json")))
    with pytest.raises(TokenizerError, match="chatml needs the special token"):
        resolve_template("chatml", tik)
    with pytest.raises(TokenizerError, match="auto needs a Hugging Face tokenizer"):
        resolve_template("auto", sp)
    with pytest.raises(TokenizerError, match="is not one of"):
        resolve_template("vicuna", sp)
    with pytest.raises(TokenizerError, match="not a SentencePiece"):
        load_tokenizer(CORPUS)


# ---- the whole tool --------------------------------------------------------------------------------------

def run(tmp_path, inputs, name="out", **settings):
    prefix = str(tmp_path / name)
    settings.setdefault("chat_template", "chatml")
    return preprocess(PreprocessSettings(inputs=inputs, tokenizer=SENTENCEPIECE_MODEL, output_prefix=prefix,
                                         **settings), log=lambda *_: None, warn=lambda *_: None), prefix


def output_bytes(prefix):
    return {s: open(prefix + s, "rb").read() for s in
            ("_tokens.bin", "_tokens.idx", "_answer_mask.bin", "_answer_mask.idx", ".json")}


def test_same_bytes_across_runs_and_worker_counts(tmp_path):
    _, one = run(tmp_path, [TRAIN], "one", workers=1, seq_length=48)
    meta, two = run(tmp_path, [TRAIN], "two", workers=2, seq_length=48)
    _, again = run(tmp_path, [TRAIN], "again", workers=2, seq_length=48)
    first, second, third = output_bytes(one), output_bytes(two), output_bytes(again)
    for suffix in ("_tokens.bin", "_tokens.idx", "_answer_mask.bin", "_answer_mask.idx"):
        assert first[suffix] == second[suffix] == third[suffix]
    strip = lambda b: {k: v for k, v in json.loads(b).items() if k != "files"}  # noqa: E731 (names the prefix)
    assert strip(first[".json"]) == strip(second[".json"]) == strip(third[".json"])
    assert meta["counts"]["records"] == 1200 and meta["counts"]["truncated"] > 0


def test_samples_match_records_in_order(tmp_path, sp):
    meta, prefix = run(tmp_path, [TRAIN, TRAIN], workers=2)  # two inputs: the second continues the first
    data = SFTDataset(prefix)
    records = [json.loads(line) for line in open(TRAIN, encoding="utf-8")]
    assert len(data) == 2 * len(records) == meta["counts"]["samples"]
    for i in (0, 1, 2, 599, 1199, 1200, 2399):
        rec = records[i % len(records)]
        messages = rec.get("messages") or (
            ([{"role": "system", "content": rec["system"]}] if "system" in rec else [])
            + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        )
        assert sp.decode(data.tokens(i)) == chatml_text(messages)
        assert sp.decode(data.tokens(i)[data.answer_mask(i) == 1]) == chatml_answers(messages)


def test_fingerprint_changes_with_inputs_and_settings(tmp_path):
    base, _ = run(tmp_path, [TRAIN], "a")
    assert run(tmp_path, [TRAIN], "b", skip_bad_records=True, workers=2)[0]["fingerprint"] == base["fingerprint"]
    assert run(tmp_path, [TRAIN], "c", chat_template="llama3")[0]["fingerprint"] != base["fingerprint"]
    assert run(tmp_path, [TRAIN], "d", seq_length=200)[0]["fingerprint"] != base["fingerprint"]
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(open(TRAIN, "rb").read().replace(b"Paris", b"Lyon", 1))
    assert run(tmp_path, [str(edited)], "e")[0]["fingerprint"] != base["fingerprint"]


def test_truncation_answer_and_drop_are_counted(tmp_path, sp):
    long_prompt = " ".join(["word"] * 80)
    lines = [
        {"prompt": "What is 2 plus 2?", "response": "2 + 2 = 4."},                    # fits
        {"prompt": "Say a lot.", "response": " ".join(["answer"] * 60)},              # answer cut
        {"prompt": long_prompt, "response": "ok"},                                     # prompt alone too long
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    meta, prefix = run(tmp_path, [str(path)], "cut", seq_length=30, truncate="answer")
    assert (meta["counts"]["truncated"], meta["counts"]["dropped_too_long"], meta["counts"]["samples"]) == (1, 1, 2)
    data = SFTDataset(prefix)
    assert data.lengths.tolist()[1] == 31 and data.answer_mask(1)[1:].any()
    meta, _ = run(tmp_path, [str(path)], "drop", seq_length=30, truncate="drop")
    assert (meta["counts"]["truncated"], meta["counts"]["dropped_too_long"], meta["counts"]["samples"]) == (0, 2, 1)


BAD_RECORDS = {
    "malformed JSON": (b'{"prompt": "a", "response": }', "malformed JSON"),
    "not an object": (b'["prompt", "response"]', "must be a JSON object, got list"),
    "missing field": (b'{"prompt": "hello"}', "'response' is missing"),
    "empty field": (b'{"prompt": "hello", "response": "  "}', "'response' is empty"),
    "wrong type": (b'{"prompt": 7, "response": "x"}', "'prompt' must be a string, got int"),
    "both shapes": (b'{"prompt": "a", "response": "b", "messages": []}', "holds the keys of several formats"),
    "unknown role": (b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "messages[0].role is 'tool'"),
    "no assistant turn": (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    "empty messages": (b'{"messages": []}', "'messages' is empty"),
    "special token in content": (b'{"prompt": "a<|im_end|>b", "response": "c"}', "special token '<|im_end|>'"),
    "invalid UTF-8": (b'{"prompt": "caf\xe9", "response": "x"}', "invalid UTF-8 at byte 15"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_stops_with_file_and_line_and_writes_nothing(tmp_path, capsys, case):
    line, message = BAD_RECORDS[case]
    good = b'{"prompt": "What is 1 plus 1?", "response": "2."}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n" + good)  # the bad record is on line 3 (line 2 is blank)
    prefix = str(tmp_path / "out")
    assert main(["--input", str(path), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix", prefix,
                 "--chat-template", "chatml"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:3: ") and message in err and "\n" not in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing written, no temporaries left


def test_skip_bad_records_counts_each(tmp_path, capsys):
    good = b'{"prompt": "What is 1 plus 1?", "response": "2."}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(good + b"".join(line + b"\n" for line, _ in BAD_RECORDS.values()) + good)
    prefix = str(tmp_path / "out")
    assert main(["--input", str(path), "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix", prefix,
                 "--chat-template", "chatml", "--skip-bad-records", "--workers", "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(BAD_RECORDS) and all(": warning: skipped: " in e for e in err)
    counts = json.load(open(prefix + ".json"))["counts"]
    assert (counts["records"], counts["samples"], counts["bad_records"]) == (len(BAD_RECORDS) + 2, 2, len(BAD_RECORDS))


@pytest.mark.parametrize("argv_tail,message", [
    (["--input", "EMPTY"], "EMPTY: the file is empty"),
    (["--input", "MISSING"], "MISSING: no such file"),
    (["--input", "ALLBAD", "--skip-bad-records"], "no samples (1 records: 1 bad"),
    (["--input", "TRAIN", "--chat-template", "vicuna"], "'vicuna' is not one of"),
    (["--input", "TRAIN", "--truncate", "middle"], "invalid choice: 'middle'"),
])
def test_bad_files_and_settings(tmp_path, capsys, argv_tail, message):
    files = {"EMPTY": tmp_path / "empty.jsonl", "MISSING": tmp_path / "missing.jsonl",
             "ALLBAD": tmp_path / "bad.jsonl", "TRAIN": TRAIN}
    files["EMPTY"].write_bytes(b"")
    files["ALLBAD"].write_bytes(b"{not json}\n")
    argv = [str(files.get(a, a)) for a in argv_tail]
    message = message.replace("EMPTY", str(files["EMPTY"])).replace("MISSING", str(files["MISSING"]))
    before = sorted(os.listdir(tmp_path))
    assert main(argv + ["--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix", str(tmp_path / "out")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert len(lines) == 1 + ("--skip-bad-records" in argv)  # plus the skipped record's warning
    assert sorted(os.listdir(tmp_path)) == before


def test_failed_rerun_leaves_previous_output_intact(tmp_path, monkeypatch):
    meta, prefix = run(tmp_path, [TRAIN])
    before = output_bytes(prefix)
    import minorsft_megatron.data.preprocess as pp

    calls = {"n": 0}
    real = pp._record_result

    def crash_midway(*args):
        calls["n"] += 1
        if calls["n"] == 700:
            raise KeyboardInterrupt  # as if the run were stopped half-way through writing
        return real(*args)

    monkeypatch.setattr(pp, "_record_result", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [TRAIN], seq_length=40)
    assert output_bytes(prefix) == before and len(SFTDataset(prefix)) == meta["counts"]["samples"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "hi", "response": "there"}\n{"prompt": "x"}\n')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_sft_data.py"), "--input", str(path),
         "--tokenizer", SENTENCEPIECE_MODEL, "--output-prefix", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {path}:2: 'response' is missing"
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_bundled_data_and_tokenizer_are_reproduced_by_their_scripts(tmp_path):
    for script, args in (("make_example_data.py", ["--out-dir", str(tmp_path)]),
                         ("train_tokenizer.py", ["--input", CORPUS, "--out", str(tmp_path / "tokenizer.model")])):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *args], check=True,
                       capture_output=True, timeout=120)
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "tokenizer_corpus.txt", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(DATA, name), "rb").read(), name
