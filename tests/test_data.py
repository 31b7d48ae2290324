"""Data formats, validation, truncation and batches."""

import json
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


def test_collate_pads_right_with_pad_id(tokenizer):
    pairs, _, _ = _prep([{"prompt": "Q", "chosen": "A much longer answer here.", "rejected": "No."}], tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    short = batch["attention_mask"][1].sum()
    assert torch.all(batch["input_ids"][1, short:] == tokenizer.pad_token_id)


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
