"""serve/stopping.py: answer text cut at stop strings, and streamed deltas that add up to it."""

from raybench.serve.stopping import AnswerStream, cut_at_stop

WORDS = {1: "the", 2: "red", 3: "END", 4: "square", 5: "é"}


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids).strip()


def streamed(ids: list[int], stop: list[str], step: int = 1) -> tuple[str, list[str]]:
    answer = AnswerStream(decode, stop)
    deltas = [answer.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(answer.finish())
    return "".join(deltas), [d for d in deltas if d]


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop("the red END square", ["square", "END"]) == ("the red ", True)
    assert cut_at_stop("the red", ["END"]) == ("the red", False)


def test_chunks_concatenate_to_the_cut_answer_and_never_show_the_stop_string():
    ids = [1, 2, 3, 4]
    for stop in ([], ["END"], ["red END"], ["nowhere"]):
        for step in (1, 2, 4):
            text, deltas = streamed(ids, stop, step)
            assert text == cut_at_stop(decode(ids), stop)[0], (stop, step)
            assert not any(s and s in d for d in deltas for s in stop)


def test_a_possible_stop_prefix_is_held_back_until_it_is_not():
    answer = AnswerStream(decode, ["red square"])
    assert answer.push([1]) == "the"
    assert answer.push([2]) == " "        # "red" may begin "red square"
    assert answer.push([1]) == "red the"  # it did not
