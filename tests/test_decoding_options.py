"""DecodingOptions' string forms (one parser for the CLI and bench) and model configs with retired fields."""

import json

import pytest

from whisfusion_cli.decoding import RETIRED_FIELDS, DecodingOptions
from whisfusion_cli.transcribe import parse_pad_context, parse_schedule


@pytest.mark.parametrize("name,text,value", [
    ("steps", "8", 8), ("candidates", " 4 ", 4), ("refine", "0", 0), ("shortlist", "16", 16),
    ("temperature", "0.7", 0.7), ("repeat_penalty", "0", 0.0), ("tokens_per_second", "5", 5.0),
    ("shortlist_int8", "1", True), ("shortlist_int8", "true", True), ("shortlist_int8", "On", True),
    ("shortlist_int8", "0", False), ("shortlist_int8", "false", False), ("shortlist_int8", "off", False),
    ("schedule", "1.0, 0.9,0.85,0.8", (1.0, 0.9, 0.85, 0.8)), ("schedule", "1,0.5", (1.0, 0.5)),
    ("pad_context", "5", 5), ("pad_context", "0", 0), ("pad_context", "off", None), ("pad_context", "none", None),
    ("seed", "0", 0), ("seed", "-3", -3), ("seed", "none", None),
    ("seq_len", "64", 64), ("seq_len", "auto", None), ("seq_len", "AUTO", None), ("seq_len", "audio", None),
    ("seq_len", "none", None), ("strategy", "confidence", "confidence"), ("selection", "rover", "rover"),
])
def test_parse_gives_the_typed_value(name, text, value):
    parsed = DecodingOptions.parse(name, text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_gives_what_the_cli_parsers_give():
    for text in ("1.0,0.9,0.85,0.8", "1, 0.5", "0.3"):
        assert DecodingOptions.parse("schedule", text) == parse_schedule(text)
    for text in ("off", "OFF", "0", "7"):
        assert DecodingOptions.parse("pad_context", text) == parse_pad_context(text)
    for text in ("1.0,x", "1.5", ""):  # what parse_schedule refuses, refused
        with pytest.raises(ValueError, match="schedule"):
            DecodingOptions.parse("schedule", text)
    for text in ("some", "-2", "2.5"):
        with pytest.raises(ValueError, match="pad_context"):
            DecodingOptions.parse("pad_context", text)


@pytest.mark.parametrize("name,text,message", [
    ("steps", "0", "steps='0' must be a positive integer"),
    ("candidates", "x", "candidates='x' must be a positive integer"),
    ("shortlist", "x", "shortlist='x' must be a non-negative integer"),
    ("refine", "-1", "refine='-1' must be a non-negative integer"),
    ("pad_context", "-2", "pad_context='-2' must be a non-negative integer or 'off'"),
    ("shortlist_int8", "yes", "shortlist_int8='yes' must be 0 or 1"),
    ("seq_len", "big", "seq_len='big' must be an integer >= 2 or 'auto'"),
    ("seq_len", "1", "seq_len='1' must be an integer >= 2 or 'auto'"),
    ("seed", "x", "seed='x' must be an integer or 'none'"),
    ("temperature", "hot", "temperature='hot' must be a number"),
    ("schedule", "1.0,1.5", r"schedule='1.0,1.5' must be comma-separated mask ratios in \[0, 1\]"),
    ("strategy", "beam", "strategy='beam' must be one of remask, confidence"),
    ("selection", "vote", "selection='vote' must be one of confidence, mbr, rover"),
    ("beam", "5", "unknown decoding option 'beam'"),
])
def test_parse_names_the_field_of_a_bad_value(name, text, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions.parse(name, text)


def test_with_strings_parses_and_validates_the_whole():
    base = DecodingOptions(seed=0)
    options = base.with_strings(strategy="confidence", steps="8", schedule="1,0.5", pad_context="off",
                                shortlist="16", shortlist_int8="on", seq_len="auto", seed="none")
    assert options == DecodingOptions(strategy="confidence", steps=8, schedule=(1.0, 0.5), pad_context=None,
                                      shortlist=16, shortlist_int8=True, seq_len=None, seed=None)
    assert base.with_strings() == base and base.with_strings(seed="4").seed == 4
    with pytest.raises(ValueError, match="shortlist needs the confidence strategy"):  # valid alone, not together
        base.with_strings(shortlist="8")
    with pytest.raises(ValueError, match="steps="):
        base.with_strings(steps="many")


def test_the_shipped_config_loads_with_its_retired_fields():
    from whisfusion_cli.checkpoint import read_model_config
    from whisfusion_cli.loading import DEFAULT_MODEL_DIR

    decoding = read_model_config(DEFAULT_MODEL_DIR)["decoding"]
    options = DecodingOptions.from_config(decoding)
    assert options.to_dict() == {k: v for k, v in decoding.items() if k not in RETIRED_FIELDS}
    assert DecodingOptions.from_config({**decoding, "some_future_key": 1}) == options  # unknown keys: ignored
    assert DecodingOptions.from_config(json.loads(json.dumps(options.to_dict()))) == options
    for name, value in (("blocks", 3), ("fast", False), ("cut_at_pad", False)):
        with pytest.raises(ValueError, match=name):
            DecodingOptions.from_config({**decoding, name: value})
