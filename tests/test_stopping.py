"""StopChecker: stop sequences across tokens, stop token ids and the token budget."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.text.sampling import SamplingParams
from app.text.stopping import FinishReason, StopChecker

EOS = 2
TEXT_TOKEN = 100  # any id that is not a stop token


def feed(checker: StopChecker, pieces: list[str]) -> tuple[list[str], FinishReason | None]:
    """Feed text pieces as ordinary tokens until the checker finishes; return what it emitted per token."""
    emitted: list[str] = []
    for piece in pieces:
        text, reason = checker.update(TEXT_TOKEN, piece)
        emitted.append(text)
        if reason is not None:
            return emitted, reason
    return emitted, None


def test_plain_text_passes_through() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=10)
    assert feed(checker, ["Hello", " world"]) == (["Hello", " world"], None)
    assert checker.held_text == ""


def test_stop_split_over_three_tokens() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=10)
    emitted, reason = feed(checker, ["Hello ", "ST", "O", "P", " never shown"])
    assert reason == "stop"
    assert emitted == ["Hello ", "", "", ""]
    assert checker.num_tokens == 4


def test_text_before_the_stop_in_the_same_token_is_emitted() -> None:
    checker = StopChecker(stop=["\n\nUser:"], max_tokens=10)
    emitted, reason = feed(checker, ["Sure", ".\n", "\nUser", ": hi"])
    assert reason == "stop"
    assert "".join(emitted) == "Sure."


def test_partial_match_that_is_not_a_stop_is_released() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=10)
    assert checker.update(TEXT_TOKEN, "ST") == ("", None)
    assert checker.held_text == "ST"
    assert checker.update(TEXT_TOKEN, "ART") == ("START", None)
    assert checker.held_text == ""


def test_held_text_keeps_only_a_possible_stop_start() -> None:
    checker = StopChecker(stop=["aab"], max_tokens=10)
    assert checker.update(TEXT_TOKEN, "a") == ("", None)
    assert checker.update(TEXT_TOKEN, "a") == ("", None)
    assert checker.update(TEXT_TOKEN, "a") == ("a", None)  # "aaa": only the last "aa" may still start "aab"
    assert checker.update(TEXT_TOKEN, "b") == ("", "stop")


@pytest.mark.parametrize("stops", [["ab", "abc"], ["abc", "ab"]])
def test_stop_that_is_a_prefix_of_another(stops: list[str]) -> None:
    checker = StopChecker(stop=stops, max_tokens=10)
    emitted, reason = feed(checker, ["x", "a", "b", "c"])
    assert reason == "stop"
    assert "".join(emitted) == "x"
    assert checker.num_tokens == 3  # "ab" completes first


def test_first_stop_to_complete_wins() -> None:
    checker = StopChecker(stop=["b", "ab"], max_tokens=10)
    assert checker.update(TEXT_TOKEN, "xab") == ("x", "stop")  # both end on "b": the longer one
    # "abc" starts first but "b" completes first, whether the text comes in one piece or two.
    assert StopChecker(stop=["abc", "b"], max_tokens=10).update(TEXT_TOKEN, "xabc") == ("xa", "stop")
    assert feed(StopChecker(stop=["abc", "b"], max_tokens=10), ["xa", "bc"]) == (["x", "a"], "stop")


def test_stop_at_the_very_first_token() -> None:
    assert StopChecker(stop=["STOP"], max_tokens=10).update(TEXT_TOKEN, "STOP and more") == ("", "stop")
    assert StopChecker(stop_token_ids={EOS}, max_tokens=10).update(EOS, "<|im_end|>") == ("", "stop")


def test_stop_token_releases_held_text_and_hides_itself() -> None:
    checker = StopChecker(stop=["STOP"], stop_token_ids={EOS}, max_tokens=10)
    assert checker.update(TEXT_TOKEN, "Bye ST") == ("Bye ", None)
    assert checker.update(EOS, "<|im_end|>") == ("ST", "stop")
    assert checker.finish_reason == "stop"


def test_multibyte_characters_around_a_stop() -> None:
    checker = StopChecker(stop=["→"], max_tokens=10)
    assert checker.update(TEXT_TOKEN, "é→ü") == ("é", "stop")

    checker = StopChecker(stop=["日本"], max_tokens=10)
    emitted, reason = feed(checker, ["語", "日", "本", "語"])
    assert (emitted, reason) == (["語", "", ""], "stop")

    checker = StopChecker(stop=["😀!"], max_tokens=10)
    emitted, reason = feed(checker, ["ça 😀", "😀", "?", "😀", "!"])
    assert reason == "stop"
    assert "".join(emitted) == "ça 😀😀?"

    # A detokenizer can give an empty piece while a character is incomplete.
    checker = StopChecker(stop=["ü!"], max_tokens=10)
    emitted, reason = feed(checker, ["é", "", "ü", "", "!"])
    assert ("".join(emitted), reason) == ("é", "stop")


def test_max_tokens() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=3)
    emitted, reason = feed(checker, ["a", "b", "c", "d"])
    assert (emitted, reason) == (["a", "b", "c"], "length")


def test_max_tokens_releases_held_text() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=2)
    emitted, reason = feed(checker, ["x", "ST"])
    assert (emitted, reason) == (["x", "ST"], "length")


def test_stop_on_the_last_allowed_token_is_a_stop() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=3)
    emitted, reason = feed(checker, ["a", "ST", "OP"])
    assert (emitted, reason) == (["a", "", ""], "stop")
    checker = StopChecker(stop_token_ids={EOS}, max_tokens=1)
    assert checker.update(EOS, "") == ("", "stop")


def test_update_after_finish_raises() -> None:
    checker = StopChecker(max_tokens=1)
    assert checker.update(TEXT_TOKEN, "a") == ("a", "length")
    with pytest.raises(RuntimeError, match="after the request finished"):
        checker.update(TEXT_TOKEN, "b")


def test_release_held() -> None:
    checker = StopChecker(stop=["STOP"], max_tokens=5)
    checker.update(TEXT_TOKEN, "okST")
    assert checker.release_held() == "ST"
    assert checker.held_text == ""


def test_for_request_merges_model_stop_ids() -> None:
    params = SamplingParams(stop=("\n\n",), stop_token_ids=(7,), max_tokens=4)
    checker = StopChecker.for_request(params, model_stop_token_ids={0, 2})
    assert checker.update(7, "") == ("", "stop")
    checker = StopChecker.for_request(params, model_stop_token_ids={0, 2})
    assert checker.update(0, "") == ("", "stop")
    checker = StopChecker.for_request(params, model_stop_token_ids=(), max_tokens=1)
    assert checker.update(TEXT_TOKEN, "a") == ("a", "length")


def test_ignore_eos_keeps_going_past_the_models_stop_ids_but_not_the_requests() -> None:
    params = SamplingParams(stop_token_ids=(7,), max_tokens=3, ignore_eos=True)
    checker = StopChecker.for_request(params, model_stop_token_ids={0, 2})
    assert checker.update(2, "") == ("", None)
    assert checker.update(7, "") == ("", "stop")
    checker = StopChecker.for_request(params, model_stop_token_ids={0, 2})
    assert [checker.update(2, "x")[1] for _ in range(3)] == [None, None, "length"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(stop=[""], max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(max_tokens=0)


stop_alphabet = st.sampled_from("abcé😀\n")


@settings(max_examples=500)
@given(
    text=st.text(stop_alphabet, max_size=30),
    stops=st.lists(st.text(stop_alphabet, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10),
)
def test_any_chunking_emits_the_text_up_to_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    pieces = [text[start:end] for start, end in itertools.pairwise(bounds)]
    checker = StopChecker(stop=stops, max_tokens=1000)
    emitted, reason = feed(checker, pieces)
    # Reading one character at a time, the first stop to complete ends the text (the longest one on a tie).
    matches = [(text.find(stop) + len(stop), text.find(stop)) for stop in stops if stop in text]
    if matches:
        assert reason == "stop"
        assert "".join(emitted) == text[: min(matches)[1]]
    else:
        assert reason is None
        assert "".join(emitted) + checker.release_held() == text
    for stop in stops:
        assert stop not in "".join(emitted)
