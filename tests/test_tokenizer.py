"""Canvas -> text: structure tokens never reach a transcript."""

from test_data import make_word_tokenizer

from whisfusion_cli.tokenizer import Tokenizer, TokenizerConfig


def test_a_predicted_prefix_token_is_not_text(tmp_path):
    # The word tokenizer does not mark <s> special (as some tokenizer files do not); a decoder that predicts
    # BOS inside the text must still give words only.
    tok = Tokenizer(make_word_tokenizer(tmp_path / "tok.json"), TokenizerConfig(prefix_ids=[1], pad_id=2, eos_id=2))
    the, cat = tok.encode("the")[0], tok.encode("cat")[0]
    assert tok.decode([1, the, 1, cat, 2, 1, the]) == "the cat"
    assert tok.decode([1, the, 1, cat, 2, 1, the], cut_at_pad=False) == "the cat the"
