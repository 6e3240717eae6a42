"""Stop strings and stop token ids have vLLM's semantics, and change no other bit.

vLLM's documented rules (`SamplingParams.stop`, `stop_token_ids`, `include_stop_str_in_output`;
`CompletionOutput.stop_reason`), checked against a plain-Python reference that decodes whole
prefixes of the request's own unstopped output:
  * a stop string is looked for in the generated text only (a stop string inside the prompt, or
    one straddling the prompt's end, stops nothing); the request ends at the token that completes
    it, that token kept in `token_ids`; the text is cut before the stop string (after it with
    `include_stop_str_in_output`); finish_reason 'stop', stop_reason the string, also when that
    token is the last `max_tokens` allows;
  * a stop token id ends the request with stop_reason that id, its text left out of the output
    text unless `include_stop_str_in_output`;
  * the tokens and logprobs before the stop are the unstopped run's, bit for bit, in a batch or
    alone.
The tokenizer (tests/conftest.py) decodes every id to ASCII, so whole-prefix decodes are the text.
"""

from __future__ import annotations

import dataclasses

import pytest

from jengine import Engine, EngineConfig, SamplingParams
from tests.conftest import same_bits

PROMPTS = ([5, 6, 7], [40, 41, 42, 43, 44], [300, 12, 99])
BASE = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)


def reference(tok, generated: list[int], stop: str, include: bool):
    """(tokens kept, text, stopped) by vLLM's rules: the shortest prefix whose text holds `stop`."""
    for j in range(1, len(generated) + 1):
        text = tok.decode(generated[:j])
        if stop in text:
            at = text.index(stop)
            return generated[:j], text[: at + len(stop) if include else at], True
    return generated, tok.decode(generated), False


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_tokenizer):
    # tests/test_engine.py's configuration: the same compiled steps
    cfg = EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)
    return Engine(tiny_model, cfg, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def unstopped(engine):
    params = [dataclasses.replace(BASE, seed=i) for i in range(len(PROMPTS))]
    return params, engine.generate(list(PROMPTS), params)


def _spanning_stop(tok, generated: list[int]) -> str:
    """A 2-character string made of the end of one token's text and the start of the next's,
    found nowhere earlier in the text and in no single token's text."""
    pieces = [tok.decode([t]) for t in generated]
    for k in range(2, len(pieces) - 1):
        s = pieces[k][-1:] + pieces[k + 1][:1]
        if len(s) == 2 and s not in tok.decode(generated[: k + 1]):
            if not any(s in p for p in pieces):
                return s
    raise AssertionError("no spanning stop string in this output; pick other seeds")


def test_a_stop_string_spanning_two_tokens(engine, unstopped, tiny_tokenizer):
    tok = tiny_tokenizer
    params, outs = unstopped
    for o in outs:  # no stop: the text is the whole decode, no stop_reason
        assert o.text == tok.decode(o.token_ids) and o.stop_reason is None
    stops = [_spanning_stop(tok, o.token_ids) for o in outs]
    requests, expected = [], []
    for include in (False, True):
        for p, sp, o, s in zip(PROMPTS, params, outs, stops):
            stopping = dataclasses.replace(sp, stop=("zzzz", s), include_stop_str_in_output=include)
            requests.append((p, stopping))
            expected.append((o, s, *reference(tok, o.token_ids, s, include)))
    fillers = [([7, 7, 7, 7], SamplingParams(max_tokens=20, seed=9)) for _ in range(3)]
    batched = engine.generate(*zip(*(requests + fillers)))
    alone = [engine.generate([p], sp)[0] for p, sp in requests]
    for got_batched, got_alone, (o, s, kept, text, stopped) in zip(batched, alone, expected):
        assert stopped and len(kept) < len(o.token_ids)
        for got in (got_batched, got_alone):
            assert got.token_ids == kept and got.text == text
            assert got.finish_reason == "stop" and got.stop_reason == s
            assert same_bits(got.logprobs, o.logprobs[: len(kept)])


def test_a_stop_string_at_max_tokens_is_a_stop(engine, unstopped, tiny_tokenizer):
    params, outs = unstopped
    s = _spanning_stop(tiny_tokenizer, outs[0].token_ids)
    kept, text, _ = reference(tiny_tokenizer, outs[0].token_ids, s, False)
    got = engine.generate([PROMPTS[0]], dataclasses.replace(params[0], stop=(s,),
                                                            max_tokens=len(kept)))[0]  # fmt: skip
    assert (got.finish_reason, got.stop_reason, got.token_ids, got.text) == ("stop", s, kept, text)


def test_a_stop_string_in_the_prompt_stops_nothing(engine, tiny_tokenizer):
    """The prompt ends with the text of `inside`, and `straddling` joins the prompt's last
    character to the first generated one: neither ends the request (vLLM searches the generated
    text only); where the generated text itself holds one, it stops there."""
    tok = tiny_tokenizer
    prompt = list(PROMPTS[1]) + tok.encode("<calc>")
    sp = dataclasses.replace(BASE, seed=5)
    o = engine.generate([prompt], sp)[0]
    inside, straddling = "<calc>", ">" + o.text[0]
    assert (tok.decode(prompt) + o.text).count(straddling) >= 1
    got = engine.generate([prompt], dataclasses.replace(sp, stop=(inside, straddling)))[0]
    want = min((reference(tok, o.token_ids, s, False) for s in (inside, straddling)),
               key=lambda r: len(r[0]))  # fmt: skip
    assert (got.token_ids, got.text) == want[:2] and len(got.token_ids) > 1
    assert got.finish_reason == ("stop" if want[2] else "length")


def test_stop_token_ids_name_the_token_and_leave_out_its_text(engine, unstopped, tiny_tokenizer):
    tok = tiny_tokenizer
    params, outs = unstopped
    o = outs[2]
    stop_id = o.token_ids[6]
    end = o.token_ids.index(stop_id) + 1
    for include in (False, True):
        sp = dataclasses.replace(params[2], stop_token_ids=(stop_id,),
                                 include_stop_str_in_output=include)  # fmt: skip
        got = engine.generate([PROMPTS[2]], sp)[0]
        assert got.token_ids == o.token_ids[:end] and same_bits(got.logprobs, o.logprobs[:end])
        assert got.finish_reason == "stop" and got.stop_reason == stop_id
        assert got.text == tok.decode(o.token_ids[: end if include else end - 1])
