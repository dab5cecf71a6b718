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


def test_pieces_and_the_raw_text_of_ids(tmp_path):
    # What word grouping and segment texts read: the file's own spelling of a token, and the text of a few
    # ids as they are (`decode` reads a whole canvas: prefix removed, cut at the end, structure dropped).
    tok = Tokenizer(make_word_tokenizer(tmp_path / "tok.json"), TokenizerConfig(prefix_ids=[1], pad_id=2, eos_id=2))
    the, cat = tok.encode("the")[0], tok.encode("cat")[0]
    assert tok.piece(the) == "the" and tok.piece(2) == "</s>" and tok.piece(tok.vocab_size + 5) == ""
    assert {"<s>", "the", "cat"} <= set(tok.pieces()) and len(list(tok.pieces())) == tok.vocab_size
    assert tok.decode_raw((the, cat)) == "the cat"
    assert tok.decode_raw([1, the, 2, cat]) == "<s> the </s> cat" and tok.decode([1, the, 2, cat]) == "the"
