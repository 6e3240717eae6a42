"""Multi-turn rollouts in token space: the trajectory, the chat template's glue, and packing.

A `Trajectory` is a conversation as the model saw it, in token ids: its prompt, then turns
sampled by the model (loss mask 1: each token with its rollout logprob and policy version) and
turns an environment supplied (tool output, a user turn, chat-template glue: loss mask 0). The
model's tokens are kept as sampled, never decoded and encoded again, so turn n + 1's prompt is
exactly turn n's tokens plus the environment's, and `pack` puts the same ids in front of the
trainer. `ChatTemplate` renders an environment's messages to token ids once, with the model's
chat template. `jengine.rl.multi_turn` runs trajectories on an engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jengine.config import SamplingParams
from jengine.engine import RequestOutput

# running: in flight. done: the environment ended it. max_turns: its model turns ran out.
# length: the model's turn reached the trajectory's token budget (or max_model_len). budget: the
# environment's tokens would pass the budget. env_error: the environment raised or returned
# something other than token ids. error / aborted: the model's turn finished so in the engine.
STATUSES = ("running", "done", "max_turns", "length", "budget", "env_error", "error", "aborted")


@dataclasses.dataclass
class Turn:
    """One turn: `role` 'model' (sampled: `logprobs` f32 and `policy_versions` i32 per token, and
    what the engine said of the request) or 'env' (supplied: loss mask 0).

    cached_tokens / prefill_tokens (model turns): the turn's prompt tokens the prefix cache served
    vs. those the engine computed when it admitted the request."""

    role: str
    token_ids: list[int]
    logprobs: np.ndarray | None = None
    policy_versions: np.ndarray | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None
    cached_tokens: int = 0
    prefill_tokens: int = 0


@dataclasses.dataclass
class Trajectory:
    """A multi-turn rollout: `prompt_token_ids`, then `turns`, sampled with `sampling_params`
    (one setting for every model turn: the trainer scores the row with it). `status` is one of
    `STATUSES`; `error` says why for 'budget', 'env_error' and 'error'. `meta` rides along."""

    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    turns: list[Turn] = dataclasses.field(default_factory=list)
    status: str = "running"
    error: str | None = None
    meta: Any = None
    index: int = 0

    @property
    def tokens(self) -> list[int]:
        """Every token id: the prompt, then each turn's."""
        return [*self.prompt_token_ids, *(t for turn in self.turns for t in turn.token_ids)]

    def _per_token(self, model_value, env_value, dtype) -> np.ndarray:
        parts = [np.full(len(self.prompt_token_ids), env_value, dtype)]
        for turn in self.turns:
            n = len(turn.token_ids)
            parts.append(np.asarray(model_value(turn), dtype) if turn.role == "model"
                         else np.full(n, env_value, dtype))  # fmt: skip
        return np.concatenate(parts)

    @property
    def loss_mask(self) -> np.ndarray:
        """bool[len(tokens)]: the token was sampled by the model."""
        return self._per_token(lambda t: np.ones(len(t.token_ids)), False, np.bool_)

    @property
    def logprobs(self) -> np.ndarray:
        """f32[len(tokens)]: each model token's rollout logprob; 0.0 elsewhere."""
        return self._per_token(lambda t: t.logprobs, 0.0, np.float32)

    @property
    def policy_versions(self) -> np.ndarray:
        """i32[len(tokens)]: each model token's policy version; -1 elsewhere."""
        return self._per_token(lambda t: t.policy_versions, -1, np.int32)

    @property
    def model_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.role == "model"]

    @property
    def num_model_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.model_turns)

    def append_model(self, out: RequestOutput, prefill_tokens: int) -> Turn:
        """Appends the model turn `out` (a request whose prompt was `tokens`)."""
        if out.prompt_token_ids != self.tokens:
            raise ValueError("the turn's prompt is not the trajectory's tokens")
        turn = Turn("model", list(out.token_ids), np.asarray(out.logprobs, np.float32),
                    np.asarray(out.policy_versions, np.int32), out.finish_reason,
                    out.stop_reason, out.text, out.num_cached_tokens, prefill_tokens)  # fmt: skip
        self.turns.append(turn)
        return turn

    def append_env(self, token_ids: Sequence[int]) -> Turn:
        turn = Turn("env", [int(t) for t in token_ids])
        self.turns.append(turn)
        return turn


def pack_trajectories(trajectories: Sequence[Trajectory], length: int | None = None,
                      pad_id: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Host-side: trajectories as `rl.token_logprobs` rows, every array aligned with its output.

    Returns tokens i32[B, L] (right-padded with `pad_id`), prompt_lens i32[B] (the first prompt),
    completion_lens i32[B] (every token after it), and [B, L - 1] arrays whose column t is token
    t + 1: loss_mask (bool, the model sampled it), logprobs (f32, its rollout logprob; 0.0 off the
    mask) and versions (i32, its policy version; -1 off the mask).
    """
    rows = [t.tokens for t in trajectories]
    length = length or max(len(r) for r in rows)
    if (longest := max(len(r) for r in rows)) > length:
        raise ValueError(f"a trajectory has {longest} tokens, more than length={length}")
    out = dict(tokens=np.full((len(rows), length), pad_id, np.int32),
               loss_mask=np.zeros((len(rows), length - 1), np.bool_),
               logprobs=np.zeros((len(rows), length - 1), np.float32),
               versions=np.full((len(rows), length - 1), -1, np.int32))  # fmt: skip
    for i, (t, row) in enumerate(zip(trajectories, rows)):
        out["tokens"][i, : len(row)] = row
        for key, values in (("loss_mask", t.loss_mask), ("logprobs", t.logprobs),
                            ("versions", t.policy_versions)):  # fmt: skip
            out[key][i, : len(row) - 1] = values[1:]
    prompts = np.asarray([len(t.prompt_token_ids) for t in trajectories], np.int32)
    out.update(prompt_lens=prompts, completion_lens=np.asarray([len(r) for r in rows]) - prompts)
    return out


class ChatTemplate:
    """A tokenizer's chat template as token ids for trajectories, each message rendered once.

        chat = rl.ChatTemplate(tokenizer)
        prompt = chat.prompt([{"role": "user", "content": "What is 17 * 23?"}])
        env_ids = chat.env([{"role": "tool", "content": "391"}], after=model_turn_ids)

    `env` gives the ids that follow a model turn: the template's end of an assistant turn, less
    what the model sampled of it (its EOS, e.g. `<|im_end|>`; all of it when a stop string or
    `max_tokens` ended the turn), then the messages, then the next assistant turn's generation
    prompt. Only this glue and the messages are encoded; the model's tokens never are.
    """

    _MARK = "\u2063jengine-model-turn\u2063"  # stands for the model's turn in a rendering

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._MARK}]
        closed = tokenizer.apply_chat_template(turn, add_generation_prompt=False)
        self.close = closed[closed.index(self._MARK) + len(self._MARK) :]

    def prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The conversation's ids with the generation prompt: a trajectory's first prompt."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))

    def env(self, messages: Sequence[Mapping[str, Any]], after: Sequence[int]) -> list[int]:
        """The ids of `messages` following a model turn whose sampled ids are `after`."""
        turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": self._MARK}]
        text = self.tokenizer.apply_chat_template([*turn, *messages], add_generation_prompt=True)
        text = text[text.index(self._MARK) + len(self._MARK) :]
        if not text.startswith(self.close):
            raise ValueError(f"the chat template renders an assistant turn's end as "
                             f"{self.close!r} alone but {text[:len(self.close)]!r} before more "
                             "messages: it cannot be split into turns")  # fmt: skip
        last = list(after[-1:])
        special = self.tokenizer.decode(last, skip_special_tokens=False)
        if special and not self.tokenizer.decode(last) and self.close.startswith(special):
            text = text[len(special) :]  # the model sampled the turn's end (its EOS)
        return self.tokenizer.encode(text)
