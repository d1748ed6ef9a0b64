"""Stop strings over a token stream (speculant/stopping.py), against the oracle "decode everything,
cut before the first stop string", on a byte-level tokenizer whose tokens split multi-byte
characters, with steps of random sizes (a stop string inside one step or across several)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from speculant.stopping import StopStringDecoder, find_stop, partial_stop_start, reference_cut
from speculant.tokenizer import Tokenizer
from tests.conftest import byte_level_backend

SPECIALS = ["<|endoftext|>"]


def byte_level_tokenizer() -> Tokenizer:
    """Byte-level BPE: the 256 byte symbols, one special token, merges "ab" and "cd"."""
    return Tokenizer(byte_level_backend(SPECIALS), eos_ids=[0])


TOKENIZER = byte_level_tokenizer()
# Ids of single bytes and merges: ASCII, "ab"/"cd", the bytes of "é" (2) and "€" (3) one at a time
# (drawn alone or out of order they decode to U+FFFD), and id 0, <|endoftext|> (skipped when decoding).
ALPHABET_IDS = sorted({i for text in ["a", "b", "c", "d", " ", "\n", "ab", "cd", "é€"]
                       for i in TOKENIZER.encode(text, False)} | {0})


@st.composite
def cases(draw):
    """(ids, step cuts, stop strings): half the stop strings are pieces of the decoded text, so they occur."""
    ids = draw(st.lists(st.sampled_from(ALPHABET_IDS), max_size=24))
    cuts = draw(st.lists(st.integers(0, 24), max_size=6))
    whole = TOKENIZER.decode(ids)
    stop = []
    for _ in range(draw(st.integers(0, 3))):
        if whole and draw(st.booleans()):
            start = draw(st.integers(0, len(whole) - 1))
            stop.append(whole[start: start + draw(st.integers(1, 4))])
        else:
            stop.append(draw(st.text(alphabet="abcd \né€", min_size=1, max_size=4)))
    return ids, cuts, stop



def steps_of(ids: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = sorted({min(c, len(ids)) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in itertools.pairwise(bounds)]


def run_decoder(decoder_cls, ids, cuts, stop):
    decoder = decoder_cls(TOKENIZER, stop)
    pieces = []
    for step in steps_of(ids, cuts):
        pieces.append(decoder.add(step))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    return decoder, "".join(pieces)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_streamed_text_is_the_whole_decode_cut_before_the_first_stop_string(case):
    ids, cuts, stop = case
    decoder, streamed = run_decoder(StopStringDecoder, ids, cuts, stop)
    whole = TOKENIZER.decode(ids)
    assert streamed == reference_cut(whole, stop) == decoder.text
    found = find_stop(whole, stop)
    if found is None:
        assert decoder.stopped is None and decoder.kept_ids == ids
    else:
        at, s = found
        assert decoder.stopped == s
        # kept ids: up to and including the token that completed the stop string, no further
        kept = decoder.kept_ids
        assert kept == ids[: len(kept)]
        assert TOKENIZER.decode(kept).startswith(whole[: at + len(s)])
        assert not TOKENIZER.decode(kept[:-1]).startswith(whole[: at + len(s)])


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_text_is_held_back_only_while_it_could_start_a_stop_string_or_is_an_unfinished_character(case):
    ids, cuts, stop = case
    decoder = StopStringDecoder(TOKENIZER, stop)
    seen: list[int] = []
    for step in steps_of(ids, cuts):
        decoder.add(step)
        seen.extend(step)
        if decoder.stopped:
            return
        stable = TOKENIZER.decode(seen).rstrip("\ufffd") if seen else ""
        assert len(decoder.text) == partial_stop_start(stable, stop) if stop else decoder.text == stable


def test_a_stop_string_that_spans_two_steps_ends_the_output_before_it():
    decoder = StopStringDecoder(TOKENIZER, ["END"])
    assert decoder.add(TOKENIZER.encode("x = 1 E", False)) == "x = 1 "  # "E" could start "END": held
    assert decoder.add(TOKENIZER.encode("N", False)) == ""
    assert decoder.add(TOKENIZER.encode("D and more", False)) == "" and decoder.stopped == "END"
    assert decoder.text == "x = 1 " and TOKENIZER.decode(decoder.kept_ids) == "x = 1 END"
    assert decoder.add(TOKENIZER.encode("ignored", False)) == "" and decoder.finish() == ""


def test_a_held_tail_comes_out_when_the_next_step_rules_the_stop_out_or_at_finish():
    decoder = StopStringDecoder(TOKENIZER, ["END"])
    assert decoder.add(TOKENIZER.encode("AEN", False)) == "A"
    assert decoder.add(TOKENIZER.encode("X E", False)) == "ENX "
    assert decoder.finish() == "E" and decoder.stopped is None


def test_a_stop_string_inside_one_step_drops_that_steps_later_tokens():
    decoder = StopStringDecoder(TOKENIZER, ["\n\n"])
    ids = TOKENIZER.encode("one\n\ntwo three", False)
    assert decoder.add(ids) == "one" and decoder.stopped == "\n\n"
    assert TOKENIZER.decode(decoder.kept_ids) == "one\n\n"


def test_an_unfinished_multibyte_character_is_held_until_its_last_byte():
    euro = TOKENIZER.encode("€", False)
    assert len(euro) == 3
    decoder = StopStringDecoder(TOKENIZER, ["€!"])
    assert decoder.add(euro[:2]) == ""
    assert decoder.add(euro[2:]) == ""  # a whole "€" now, but it could start "€!"
    assert decoder.add(TOKENIZER.encode("?", False)) == "€?"


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StopStringDecoder(TOKENIZER, [""])


class StepwiseStopCheck(StopStringDecoder):
    """Negative control: looks for stop strings only inside each step's own new text, holding nothing
    back (the bug a server has when it checks one step's tokens at a time)."""

    def add(self, ids):
        if self.stopped is not None:
            return ""
        ids = [int(i) for i in ids]
        self.ids.extend(ids)
        piece = self._stream.add(ids)
        found = find_stop(piece, self.stop)
        if found is not None:
            self.stopped = found[1]
            piece = piece[: found[0]]
        self.text += piece
        return piece

    def finish(self):
        if self.stopped is not None:
            return ""
        piece = self._stream.flush()
        self.text += piece
        return piece


def test_the_oracle_catches_a_decoder_that_checks_each_step_alone():
    def wrong(example):
        ids, cuts, stop = example
        return run_decoder(StepwiseStopCheck, ids, cuts, stop)[1] != reference_cut(TOKENIZER.decode(ids), stop)

    example = find(cases(), wrong, settings=settings(max_examples=2000, deadline=None, database=None))
    assert wrong(example)
