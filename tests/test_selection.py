"""MBR and ROVER on hand-made candidate sets with known answers."""

import torch

from whisfusion_cli.decoding import DecodingResult, _select, mbr_select, rover_combine


def w(text):
    return text.split()


def test_mbr_picks_the_consensus_candidate():
    cands = [w("the cat sat on a mat"), w("the cat sat on the mat"), w("the cat sat on the mat"), w("a bat sat on the hat")]
    # Two identical candidates agree most with everyone else.
    assert mbr_select(cands) == 1


def test_mbr_weights_and_ties():
    cands = [w("a b"), w("a c")]
    assert mbr_select(cands) == 0  # symmetric risk: the lower index wins
    # Expected risk under the weighted candidates: a heavy candidate pulls the choice to itself or toward
    # the candidates that agree with it.
    cands = [w("go left now"), w("go right now"), w("go right")]
    assert mbr_select(cands) == 1  # risks: 1/3+2/3, 1/3+1/3, 2/2+1/2
    assert mbr_select(cands, weights=[1.0, 1.0, 5.0]) == 2
    assert mbr_select(cands, weights=[5.0, 1.0, 1.0]) == 0


def test_rover_fixes_errors_no_single_candidate_fixes():
    # Every candidate has one error in a different place; the vote recovers the truth.
    truth = w("ask not what your country can do for you")
    cands = [w("ask not what our country can do for you"),
             w("ask not what your country can due for you"),
             w("ask knot what your country can do for you")]
    assert all(c != truth for c in cands)
    assert rover_combine(cands) == truth


def test_rover_handles_insertions_and_deletions():
    cands = [w("go forward ten meters"), w("go forward ten ten meters"), w("go forward meters"),
             w("go forward ten meters")]
    assert rover_combine(cands) == w("go forward ten meters")


def test_rover_confidence_breaks_a_split_vote():
    cands = [w("turn left"), w("turn right")]
    confs = [[0.9, 0.2], [0.9, 0.8]]
    assert rover_combine(cands, confidences=confs) == w("turn right")
    confs = [[0.9, 0.8], [0.9, 0.2]]
    assert rover_combine(cands, confidences=confs) == w("turn left")


def test_rover_candidate_weights():
    cands = [w("one two three"), w("one too three"), w("one too three")]
    assert rover_combine(cands) == w("one too three")
    assert rover_combine(cands, weights=[5.0, 1.0, 1.0]) == w("one two three")


def test_rover_empty_candidates():
    assert rover_combine([[], [], w("noise")]) == []
    assert rover_combine([]) == []


def test_select_on_token_canvases():
    # Three token canvases [BOS, text..., PAD...]; candidate 2 has the best confidence but is the outlier.
    P, pad = 1, 2
    tokens = torch.tensor([[1, 10, 11, 12, 2, 2], [1, 10, 11, 12, 2, 2], [1, 10, 15, 16, 17, 2]])
    conf = torch.tensor([[1, .5, .5, .5, .5, .5], [1, .5, .5, .5, .5, .5], [1, .6, .6, .6, .6, .6]])
    valid = tokens != pad
    scores = (conf * valid).sum(1) / valid.sum(1)
    seqs = [[10, 11, 12], [10, 11, 12], [10, 15, 16, 17]]
    for selection, expected_sel, expected_text in [("confidence", 2, [10, 15, 16, 17]), ("mbr", 0, [10, 11, 12]),
                                                  ("rover", 0, [10, 11, 12])]:
        r = DecodingResult(tokens=tokens, confidences=conf, scores=scores, selected=-1)
        _select(r, seqs, selection, [1], None)
        assert r.selected == expected_sel, selection
        assert r.text_tokens == expected_text, selection
