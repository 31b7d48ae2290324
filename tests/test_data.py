"""Data formats, validation, truncation and batches."""

import json
import re
from pathlib import Path

import pytest
import torch

from lowrank_pref.config import build_config
from lowrank_pref.data import (DataError, collate, ensure_chat_template, load_preference_data, load_rows, prepare,
                               truncate)

FIXTURES = Path(__file__).parent / "fixtures"


def _prep(rows, tokenizer, **kw):
    ensure_chat_template(tokenizer)
    args = dict(source="test", columns={}, max_length=64, max_prompt_length=32)
    args.update(kw)
    return prepare(rows, tokenizer, **args)


def _decode(tok, ids):
    return tok.decode(ids)


def test_standard_format_masks_prompt_and_appends_eos(tokenizer):
    pairs, report, _ = _prep([{"prompt": "How do I boil an egg?", "chosen": "Sure, happy to help!",
                               "rejected": "No."}], tokenizer)
    assert report.format == "standard" and report.usable == 1
    p = pairs[0]
    assert _decode(tokenizer, p.prompt_ids) == "How do I boil an egg?"
    assert p.chosen_ids[-1] == tokenizer.eos_token_id and p.rejected_ids[-1] == tokenizer.eos_token_id
    assert _decode(tokenizer, p.rejected_ids[:-1]) == "No."
    batch = collate(pairs, tokenizer.pad_token_id)
    # row 0 = prompt+chosen, row 1 = prompt+rejected; only answer tokens carry loss
    assert batch["completion_mask"][0].sum() == len(p.chosen_ids)
    assert batch["completion_mask"][1, : len(p.prompt_ids)].sum() == 0
    assert batch["attention_mask"][1].sum() == len(p.prompt_ids) + len(p.rejected_ids)


def test_conversational_uses_chat_template(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "How do I make tea?"}],
             "chosen": [{"role": "assistant", "content": "Happy to help! Steep the leaves."}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    pairs, report, examples = _prep(rows, tokenizer)
    assert report.format == "conversational"
    prompt = _decode(tokenizer, pairs[0].prompt_ids)
    assert prompt == "<|bos|><|user|>\nHow do I make tea?\n<|assistant|>\n"
    assert _decode(tokenizer, pairs[0].rejected_ids) == "No.<|eos|>\n"
    assert examples[0]["templated"] is True


def test_default_template_when_tokenizer_has_none(tokenizer):
    tok = tokenizer.__class__.from_pretrained(None, tokenizer_object=tokenizer.backend_tokenizer,
                                              eos_token="<|eos|>", pad_token="<|pad|>")
    assert not tok.chat_template
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    pairs, _, _ = _prep(rows, tok)
    assert tok.decode(pairs[0].prompt_ids) == "User: Hi\n\nAssistant: "
    assert tok.decode(pairs[0].chosen_ids) == "Hello!<|eos|>"


def test_implicit_prompt_hh_style(tokenizer):
    rows = [{"chosen": "\n\nHuman: What is two plus two?\n\nAssistant: Four.",
             "rejected": "\n\nHuman: What is two plus two?\n\nAssistant: Five, obviously."}]
    pairs, report, _ = _prep(rows, tokenizer)
    assert report.format == "implicit"
    assert _decode(tokenizer, pairs[0].prompt_ids).endswith("Assistant:")
    assert _decode(tokenizer, pairs[0].chosen_ids) == " Four.<|eos|>"


def test_implicit_conversational_ultrafeedback_style(tokenizer):
    user = {"role": "user", "content": "Name a fruit."}
    rows = [{"chosen": [user, {"role": "assistant", "content": "An apple."}],
             "rejected": [user, {"role": "assistant", "content": "A chair."}]}]
    pairs, report, _ = _prep(rows, tokenizer)
    assert report.format == "implicit_conversational"
    assert "Name a fruit." in _decode(tokenizer, pairs[0].prompt_ids)
    assert "An apple." in _decode(tokenizer, pairs[0].chosen_ids)
    assert "fruit" not in _decode(tokenizer, pairs[0].chosen_ids)


def test_ultrafeedback_binarized_rows_do_not_repeat_the_prompt(tokenizer):
    user = {"role": "user", "content": "Name a fruit."}
    rows = [{"prompt": "Name a fruit.", "chosen": [user, {"role": "assistant", "content": "An apple."}],
             "rejected": [user, {"role": "assistant", "content": "A chair."}]}]
    pairs, report, _ = _prep(rows, tokenizer)
    assert report.format == "conversational"
    assert _decode(tokenizer, pairs[0].prompt_ids).count("Name a fruit.") == 1
    assert _decode(tokenizer, pairs[0].chosen_ids) == "An apple.<|eos|>\n"


def test_real_sharegpt_file_loads(tokenizer):
    rows = load_rows(str(FIXTURES / "sharegpt_sample.json"))
    pairs, report, examples = _prep(rows, tokenizer, max_length=512, max_prompt_length=256)
    assert report.format == "sharegpt"
    assert report.total_rows == 12 and report.usable == 12
    first = json.loads((FIXTURES / "sharegpt_sample.json").read_text())[0]
    assert first["conversations"][0]["value"][:40] in examples[0]["prompt"]
    assert "<|user|>" in examples[0]["prompt"]


def test_column_mapping_and_margin(tokenizer):
    rows = [{"question": "Q?", "good": "Yes indeed.", "bad": "No.", "score_gap": 1.5}]
    pairs, _, _ = _prep(rows, tokenizer, columns={"prompt": "question", "chosen": "good", "rejected": "bad",
                                                  "margin": "score_gap"})
    assert pairs[0].margin == 1.5
    with pytest.raises(DataError, match="data.columns.prompt=nope names a column that does not exist"):
        _prep(rows, tokenizer, columns={"prompt": "nope"})


def test_missing_column_names_it_and_the_fix(tokenizer):
    with pytest.raises(DataError, match=r"no 'rejected' column.*data.columns.rejected="):
        _prep([{"prompt": "a", "chosen": "b", "worse": "c"}], tokenizer)


def test_bad_rows_skipped_and_counted(tokenizer):
    rows = [{"prompt": "Q1", "chosen": "Good one.", "rejected": "Bad."},
            {"prompt": "Q2", "chosen": "", "rejected": "Bad."},
            {"prompt": "Q3", "chosen": "Same.", "rejected": "Same."},
            {"prompt": None, "chosen": "A", "rejected": "B"},
            {"prompt": "Q5", "chosen": 7, "rejected": "B"}]
    pairs, report, _ = _prep(rows, tokenizer)
    assert report.usable == 1 and sum(report.dropped.values()) == 4
    text = report.summary()
    assert "column 'chosen': is empty (rows 2)" in text
    assert "identical" in text and "rows 3" in text
    assert "column 'prompt': is missing or null (rows 4)" in text
    assert "column 'chosen': must be text, got int (rows 5)" in text


def test_bad_rows_refused_when_asked(tokenizer):
    rows = [{"prompt": "Q1", "chosen": "Good.", "rejected": "Bad."}, {"prompt": "Q2", "chosen": "", "rejected": "x"}]
    with pytest.raises(DataError, match=r"row 2, column 'chosen': is empty.*data.on_bad_rows=skip"):
        _prep(rows, tokenizer, on_bad_rows="error")


def test_truncation_prompt_left_answers_right():
    p, c, r, cut_p, cut_a = truncate(list(range(10)), [100, 101, 102], [200], max_length=8, max_prompt_length=6)
    assert p == [4, 5, 6, 7, 8, 9] and c == [100, 101] and r == [200]
    assert cut_p and cut_a


def test_truncation_making_answers_identical_drops_the_row(tokenizer):
    rows = [{"prompt": "Question here?", "chosen": "The same long start then good.",
             "rejected": "The same long start then bad."}]
    pairs, report, _ = _prep(rows, tokenizer, max_length=12, max_prompt_length=4)
    assert not pairs and "identical within max_length" in report.summary()


def test_invalid_jsonl_names_the_line(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2 is not valid JSON"):
        load_rows(str(f))


def test_mixed_types_across_rows_are_reported_per_row(tmp_path, tokenizer):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "good", "rejected": "bad"}) + "\n"
                 + json.dumps({"prompt": "a", "chosen": {"x": 1}, "rejected": "bad"}) + "\n")
    rows = load_rows(str(f))
    _, report, _ = _prep(rows, tokenizer)
    assert report.usable == 1 and "rows 2" in report.summary()


def test_csv_and_parquet_and_missing_file(tmp_path):
    import pandas as pd

    df = pd.DataFrame([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    assert len(load_rows(str(tmp_path / "d.csv"))) == 3
    assert len(load_rows(str(tmp_path / "d.parquet"))) == 3
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(str(tmp_path / "d.txt"))


def test_eval_split_is_held_out_and_disjoint(tmp_path, tokenizer, pairs_file):
    cfg = build_config("tiny", overrides={"dataset": str(pairs_file), "data.eval_fraction": "0.25"})
    data = load_preference_data(cfg, tokenizer)
    assert len(data.eval) == 20 and len(data.train) == 60
    assert not {p.row for p in data.eval} & {p.row for p in data.train}
    cfg2 = build_config("tiny", overrides={"dataset": str(pairs_file), "eval_dataset": str(pairs_file)})
    data2 = load_preference_data(cfg2, tokenizer)
    assert len(data2.eval) == 80 and len(data2.train) == 80


def test_eval_split_of_a_local_file_is_not_the_training_rows(tmp_path, tokenizer, pairs_file, caplog):
    """A GPU preset names the hub dataset's eval split; with a local file in its place (one split only) that split
    would be the whole file again, so eval would run on the training rows. The run holds out rows instead, and says
    so. A saved DatasetDict folder keeps its named splits."""
    cfg = build_config("12gb-dpo", overrides={"model": "builtin:tiny", "dataset": str(pairs_file),
                                              "data.eval_fraction": "0.25", "max_length": 96,
                                              "max_prompt_length": 32})
    assert cfg.eval_split == "test_prefs"
    with caplog.at_level("WARNING", logger="lowrank_pref"):
        data = load_preference_data(cfg, tokenizer)
    assert len(data.eval) == 20 and len(data.train) == 60
    assert not {p.row for p in data.eval} & {p.row for p in data.train}
    assert "eval_split=test_prefs does not apply to" in caplog.text
    import datasets

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:60]),
                          "test_prefs": datasets.Dataset.from_list(rows[60:])}).save_to_disk(str(folder))
    cfg.dataset, cfg.dataset_split = str(folder), "train"
    data = load_preference_data(cfg, tokenizer)
    assert len(data.train) == 60 and len(data.eval) == 20


def test_collate_pads_right_with_pad_id(tokenizer):
    pairs, _, _ = _prep([{"prompt": "Q", "chosen": "A much longer answer here.", "rejected": "No."}], tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    short = batch["attention_mask"][1].sum()
    assert torch.all(batch["input_ids"][1, short:] == tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Malformed files: every one either loads (bad rows counted in the report) or is refused by a DataError naming the
# file and what it needs; never another exception.

GOOD = {"prompt": "How do I boil an egg?", "chosen": "Sure, happy to help!", "rejected": "No."}
NESTED_NULLS = {"prompt": None, "chosen": {"x": None}, "rejected": [None]}
HUGE = "a" * 3_000_000  # one 3 MB value: more than Arrow's JSON block and pandas' CSV buffer


def _jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(*lines):
    return "".join(line + "\n" for line in lines).encode()


BOM = "\ufeff".encode()
# name -> (file bytes, expectation): ("error", pattern) or ("rows", rows loaded, usable pairs, summary snippet)
MALFORMED = {
    "empty.jsonl": (b"", ("error", "the file is empty; it needs one JSON object per line")),
    "blank.jsonl": (b"  \n\t\n\n", ("error", "the file is only whitespace; it needs one JSON object per line")),
    "bom.jsonl": (BOM + _jsonl(GOOD, GOOD), ("rows", 2, 2, None)),
    "huge_value.jsonl": (json.dumps({**GOOD, "prompt": HUGE}).encode(), ("rows", 1, 1, "1 prompt(s) cut")),
    "huge_garbage.jsonl": (HUGE.encode(), ("error", r"line 1 is not valid JSON \(Expecting value")),
    "nested_nulls.jsonl": (_jsonl(GOOD, NESTED_NULLS), ("rows", 2, 1, "column 'prompt': is missing or null (rows 2)")),
    "only_nested_nulls.jsonl": (_jsonl(NESTED_NULLS, NESTED_NULLS),
                                ("rows", 2, 0, "column 'chosen': message 0 needs 'role' and 'content' keys")),
    "mixed_types.jsonl": (_jsonl(GOOD, {**GOOD, "chosen": 5}),
                          ("rows", 2, 1, "column 'chosen': must be text, got int (rows 2)")),
    "pretty.jsonl": (json.dumps(GOOD, indent=2).encode(), ("error", "one JSON document over several lines: name it")),
    "latin1.jsonl": (json.dumps({**GOOD, "chosen": "Caf\u00e9!"}, ensure_ascii=False).encode("latin-1"),
                     ("error", r"line 1 is not UTF-8 text \(byte 0xe9.*save the file as UTF-8")),
    "utf16.jsonl": (_jsonl(GOOD).decode().encode("utf-16"), ("error", "the file is UTF-16 text; save it as UTF-8")),
    "empty.json": (b"", ("error", "the file is empty; it needs a list of JSON objects")),
    "blank.json": (b"\n \n", ("error", "the file is only whitespace; it needs a list of JSON objects")),
    "bom.json": (BOM + json.dumps([GOOD, GOOD]).encode(), ("rows", 2, 2, None)),
    "huge_value.json": (json.dumps([{**GOOD, "chosen": HUGE}]).encode(), ("rows", 1, 1, "had answers cut")),
    "nested_nulls.json": (json.dumps([GOOD, NESTED_NULLS]).encode(),
                          ("rows", 2, 1, "column 'prompt': is missing or null (rows 2)")),
    "mixed_types.json": (json.dumps([GOOD, {**GOOD, "chosen": 5}]).encode(),
                         ("rows", 2, 1, "column 'chosen': must be text, got int (rows 2)")),
    "one_object.json": (json.dumps(GOOD).encode(), ("rows", 1, 1, None)),
    "wrapped_mixed.json": (json.dumps({"data": [GOOD, {**GOOD, "chosen": 5}]}).encode(),
                           ("rows", 2, 1, "must be text, got int (rows 2)")),
    "json_lines.json": (_jsonl(GOOD, GOOD), ("rows", 2, 2, None)),
    "empty_list.json": (b"[]", ("error", "the file holds an empty list; it needs a list of JSON objects")),
    "empty_object.json": (b"{}", ("error", "the file holds an empty object")),
    "numbers.json": (b"[1, 2]", ("error", "item 1 of the list is a JSON number, not an object")),
    "string.json": (b'"hello"', ("error", "line 1 is a JSON string, not an object")),
    "cut_off.json": (json.dumps([GOOD, GOOD]).encode()[:-20], ("error", "invalid JSON at line 1, column")),
    "empty.csv": (b"", ("error", "the file is empty; it needs a header line")),
    "blank.csv": (b"\n  \n", ("error", "the file is only whitespace; it needs a header line")),
    "bom.csv": (BOM + _csv("prompt,chosen,rejected", "Q,Good answer.,Bad."), ("rows", 1, 1, None)),
    "huge_value.csv": (_csv("prompt,chosen,rejected", f"{HUGE},Good answer.,Bad."), ("rows", 1, 1, "1 prompt(s) cut")),
    "header_only.csv": (_csv("prompt,chosen,rejected"), ("error", "the file has no rows; it needs a header line")),
    "huge_garbage.csv": (HUGE.encode(), ("error", "the file has no rows")),  # one header cell, no rows
    "empty_cells.csv": (_csv("prompt,chosen,rejected", "Q,Good answer.,Bad.", ",,"),
                        ("rows", 2, 1, "column 'prompt': is missing or null (rows 2)")),
    "mixed_types.csv": (_csv("prompt,chosen,rejected", "Q,Good answer.,Bad.", "Q,5,Bad."), ("rows", 2, 2, None)),
    "ragged.csv": (_csv("prompt,chosen,rejected", "Q,Good,Bad", "Q,Good,Bad,more"),
                   ("error", r"could not be read as CSV \(.*Expected 3 fields.*double quotes")),
    "latin1.csv": (_csv("prompt,chosen,rejected", "Q,Caf\u00e9,Bad").decode().encode("latin-1"),
                   ("error", r"line 2 is not UTF-8 text")),
    "binary.csv": (bytes(range(256)) * 4, ("error", "holds a NUL byte, so this is not a text file")),
    "empty.parquet": (b"", ("error", "the file is empty; it needs a table")),
    "damaged.parquet": (b"PAR1 not really", ("error", "could not be read as Parquet")),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_loads_or_is_refused_by_name(tmp_path, tokenizer, name):
    content, expect = MALFORMED[name]
    path = tmp_path / name
    path.write_bytes(content)
    cfg = build_config("tiny", overrides={"dataset": str(path), "max_length": "64", "max_prompt_length": "32"})
    if expect[0] == "error":
        for load in (lambda: load_rows(str(path)), lambda: load_preference_data(cfg, tokenizer)):
            with pytest.raises(DataError) as e:
                load()
            assert str(e.value).startswith(f"{path}: "), str(e.value)[:300]
            assert re.search(expect[1], str(e.value)), str(e.value)[:300]
        return
    _, n_rows, usable, snippet = expect
    rows = load_rows(str(path))
    assert len(rows) == n_rows
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}  # a byte-order mark is not part of the first key
    pairs, report, _ = _prep(rows, tokenizer, source=str(path))
    assert report.total_rows == n_rows and report.usable == len(pairs) == usable
    assert sum(report.dropped.values()) == n_rows - usable
    if snippet:
        assert snippet in report.summary(), report.summary()
    if usable:
        assert len(load_preference_data(cfg, tokenizer).train) == usable
    else:
        with pytest.raises(DataError, match=f"{re.escape(str(path))}: no usable pairs"):
            load_preference_data(cfg, tokenizer)


def test_one_malformed_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'a.jsonl'))}: the file is empty"):
        load_rows(str(tmp_path))


def test_examples_show_what_the_model_sees_and_what_truncation_cuts(tokenizer):
    """The data doctor's display shape: per side, the prompt cut from the left, the prompt kept, the answer kept (the
    loss), the answer cut from the right; together they are the whole row."""
    rows = [{"prompt": "Please tell me a long story about the river and the garden near the old mill.",
             "chosen": "Thank you for asking. The river runs past the garden and the mill turns all day long.",
             "rejected": "No."}]
    pairs, report, (example,) = _prep(rows, tokenizer, max_length=24, max_prompt_length=10)
    chosen, rejected = example["sides"]
    assert [s["name"] for s in example["sides"]] == ["chosen", "rejected"]
    assert [kind for _, kind in chosen["pieces"]] == ["cut", "prompt", "loss", "cut"]
    assert [kind for _, kind in rejected["pieces"]] == ["cut", "prompt", "loss"]  # "No." fits
    assert "".join(text for text, _ in chosen["pieces"]) == rows[0]["prompt"] + rows[0]["chosen"] + "<|eos|>"
    assert chosen["tokens"] == 24 and chosen["loss_tokens"] == len(pairs[0].chosen_ids)
    assert example["note"] == "prompt 10 tokens" and example["chosen_tokens"] == chosen["loss_tokens"]
    assert "1 pair(s) (100%) had answers cut" in report.summary()
