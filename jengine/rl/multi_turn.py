"""Multi-turn rollouts: many trajectories in flight, each model turn a request on the engine.

    trajs = rl.multi_turn(engine, env, prompts, SamplingParams(temperature=0.8, max_tokens=64,
                          stop=("</calc>",)), max_turns=4, max_tokens=1024)
    batch = rl.pack(trajs)          # tokens, loss_mask, logprobs, versions for the trainer

An environment is a plain callable, synchronous or `async`: `env(trajectory)` is called after each
model turn (`trajectory.turns[-1]`, with its `text` when the engine has a tokenizer) and returns
the token ids to append (a tool's output, a user turn: `rl.ChatTemplate.env` renders messages)
or None to end the trajectory. A synchronous environment runs on the calling thread between two
engine steps; an `async` one runs on an event loop thread of its own while the engine keeps
stepping the other trajectories.

Each turn's request has the trajectory's tokens as its prompt, so the earlier turns' KV comes from
the prefix cache (every full page of it; the last, partly filled page and the environment's tokens
are computed) and never changes a bit: prefill == decode, cache on == off. A trajectory keeps one
`SamplingParams` for all its model turns (the trainer scores the row with it); its `max_tokens`
bounds each turn, the loop's `max_tokens` the whole trajectory. A trajectory with no seed gets one
from the engine seed and its index (every turn samples at new positions, so one seed serves all).

Whatever ends a trajectory ends only it, with a status (`trajectory.STATUSES`) and a reason in
`error`: an environment that raises or returns something other than token ids ('env_error'),
tokens past the budget ('budget'), a model turn cut by the budget ('length'), the last allowed
turn ('max_turns'), a request that failed or was aborted in the engine ('error', 'aborted',
e.g. `update_weights(mode="abort")`). Its turn's request has finished by then, so it holds no
pages. Weight updates in between behave as for single requests: each token records its policy
version, and a turn after an update reads no KV computed under older weights.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import itertools
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from jengine import plan as plan_lib
from jengine.config import SamplingParams
from jengine.engine import _PAUSED, Engine, RequestOutput
from jengine.rl.trajectory import Trajectory

Env = Callable[[Trajectory], "Sequence[int] | None | Awaitable[Sequence[int] | None]"]


async def _await(x: Awaitable) -> Any:
    return await x


class MultiTurn:
    """Trajectories in flight on `engine`; drive it with `step()` (or route the engine's outputs
    yourself: `owns` / `handle` / `poll`, as `rl.RolloutActor` does).

    Args:
      max_turns: model turns per trajectory at most.
      max_tokens: a trajectory's token budget (prompt and every turn); at most, and by default,
        the engine's max_model_len.
    Attributes:
      other_outputs: outputs `step()` got from the engine for requests it does not own.
      stats: turns, env_calls, cached_tokens, prefill_tokens (summed over model turns).
    """

    def __init__(self, engine: Engine, *, max_turns: int = 8, max_tokens: int | None = None):
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a jengine Engine, got {type(engine).__name__}")
        for name, value, lo in (("max_turns", max_turns, 1), ("max_tokens", max_tokens or 2, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r} must be an int >= {lo}")
        self.engine, self.max_turns = engine, max_turns
        self.max_tokens = min(max_tokens or engine.max_model_len, engine.max_model_len)
        self._requests: dict[str, Trajectory] = {}  # request id of its turn in flight -> it
        self._envs: dict[int, Env] = {}  # trajectory index -> its environment
        self._pending: dict[concurrent.futures.Future, Trajectory] = {}  # async environments
        self._indices = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.other_outputs: list[RequestOutput] = []
        self.stats: collections.Counter = collections.Counter()

    # -- submitting --------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], env: Env, sampling_params: SamplingParams) -> list[int]:
        """The prompt as a list, or a TypeError / ValueError naming what `add` would refuse."""
        if not callable(env):
            raise TypeError(f"env={env!r} must be a callable (sync or async)")
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got "
                            f"{type(sampling_params).__name__}")  # fmt: skip
        prompt, _, _ = self.engine._validate_request(prompt, sampling_params)
        if len(prompt) >= self.max_tokens:
            raise ValueError(f"prompt has {len(prompt)} tokens; the trajectory budget "
                             f"max_tokens={self.max_tokens} leaves no room for a turn")  # fmt: skip
        return prompt

    def add(self, prompt: Sequence[int], env: Env, sampling_params: SamplingParams,
            meta: Any = None) -> Trajectory:  # fmt: skip
        """Starts a trajectory (its first turn is queued in the engine); returns it."""
        prompt = self.check(prompt, env, sampling_params)
        index = next(self._indices)
        if sampling_params.seed is None:
            seed = (self.engine.config.seed * 1_000_003 + index) % 2**31
            sampling_params = dataclasses.replace(sampling_params, seed=seed)
        traj = Trajectory(prompt, sampling_params, meta=meta, index=index)
        self._submit(traj)
        self._envs[index] = env
        return traj

    def _submit(self, traj: Trajectory) -> None:
        """Queues the trajectory's next model turn: a request whose prompt is all its tokens."""
        tokens, sp = traj.tokens, traj.sampling_params
        turn = dataclasses.replace(sp, max_tokens=min(sp.max_tokens, self.max_tokens - len(tokens)))
        self._requests[self.engine.add_request(tokens, turn)] = traj

    # -- results -----------------------------------------------------------------------------

    def owns(self, request_id: str) -> bool:
        return request_id in self._requests

    def handle(self, out: RequestOutput) -> Trajectory | None:
        """Takes a finished turn of a trajectory this loop owns: appends it, then ends the
        trajectory (returned) or calls its environment and queues the next turn (None)."""
        traj = self._requests.pop(out.request_id)
        prefill = len(out.prompt_token_ids) - out.num_cached_tokens  # computed past the cache
        traj.append_model(out, prefill)
        self.stats.update(turns=1, cached_tokens=out.num_cached_tokens, prefill_tokens=prefill)
        if out.finish_reason in ("error", "aborted"):
            return self._end(traj, out.finish_reason, out.error)
        if len(traj.tokens) >= self.max_tokens:
            return self._end(traj, "length", f"the turn reached the {self.max_tokens}-token budget")
        if len(traj.model_turns) >= self.max_turns:
            return self._end(traj, "max_turns")
        self.stats["env_calls"] += 1
        try:
            result = self._envs[traj.index](traj)
        except Exception as e:  # an environment's failure ends its trajectory only
            return self._end(traj, "env_error", f"environment raised {e!r}")
        if inspect.isawaitable(result):
            future = asyncio.run_coroutine_threadsafe(_await(result), self._event_loop())
            self._pending[future] = traj
            return None
        return self._continue(traj, result)

    def _continue(self, traj: Trajectory, result: Any) -> Trajectory | None:
        if result is None:
            return self._end(traj, "done")
        try:
            ids = plan_lib.check_token_ids("the environment's token ids", result,
                                           self.engine.model.config.vocab_size)  # fmt: skip
        except (TypeError, ValueError) as e:
            return self._end(traj, "env_error", f"{e} (return token ids, or None to end)")
        if len(traj.tokens) + len(ids) >= self.max_tokens:
            return self._end(traj, "budget", f"the environment's {len(ids)} tokens would take the "
                             f"trajectory from {len(traj.tokens)} to {len(traj.tokens) + len(ids)} "
                             f"tokens, leaving no room for a turn in its budget of "
                             f"{self.max_tokens}; they were not appended")  # fmt: skip
        traj.append_env(ids)
        try:
            self._submit(traj)
        except ValueError as e:  # e.g. the engine's pool cannot hold the longer prompt
            return self._end(traj, "error", f"the next turn was refused: {e}")
        return None

    def _end(self, traj: Trajectory, status: str, error: str | None = None) -> Trajectory:
        traj.status, traj.error = status, error
        del self._envs[traj.index]
        return traj

    def poll(self) -> list[Trajectory]:
        """Takes the results of the `async` environments that have finished."""
        finished = []
        for fut in [f for f in self._pending if f.done()]:
            traj = self._pending.pop(fut)
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 -- cancelled, or the environment raised
                finished.append(self._end(traj, "env_error", f"environment raised {e!r}"))
                continue
            if (t := self._continue(traj, result)) is not None:
                finished.append(t)
        return finished

    @property
    def num_unfinished(self) -> int:
        """Trajectories with a turn in the engine or an environment running."""
        return len(self._requests) + len(self._pending)

    def step(self) -> list[Trajectory]:
        """One engine step (when it has work), then the environments; returns the trajectories
        that ended. Waits briefly for an `async` environment when the engine has nothing to do."""
        finished = []
        if self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in self._requests:
                    self.other_outputs.append(out)
                elif (t := self.handle(out)) is not None:
                    finished.append(t)
        elif self._pending:
            concurrent.futures.wait(list(self._pending), timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)  # fmt: skip
        return finished + self.poll()

    # -- shutdown ----------------------------------------------------------------------------

    def abort(self) -> list[Trajectory]:
        """Ends every trajectory in flight with status 'aborted' (their turns aborted in the
        engine, their environments cancelled); returns them."""
        ended = []
        for rid, traj in list(self._requests.items()):
            out = self.engine.abort(rid)
            if out is not None:
                self.handle(out)
            else:  # finished in the engine but not yet delivered: it is dropped
                del self._requests[rid]
                self._end(traj, "aborted")
            ended.append(traj)
        for fut, traj in list(self._pending.items()):
            fut.cancel()
            ended.append(self._end(traj, "aborted"))
        self._pending.clear()
        return ended

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the `async` environments run on (a thread of its own, from first use
        until `close()`)."""
        if self._loop is None:
            loop = self._loop = asyncio.new_event_loop()

            def run() -> None:
                loop.run_forever()
                loop.close()

            threading.Thread(target=run, name="jengine-envs", daemon=True).start()
        return self._loop

    def close(self) -> None:
        """Aborts what is in flight and stops the environments' event loop."""
        self.abort()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


def multi_turn(engine: Engine, envs: Env | Sequence[Env], prompts: Sequence[Sequence[int]],
               sampling_params: SamplingParams | Sequence[SamplingParams], *, max_turns: int = 8,
               max_tokens: int | None = None, meta: Sequence[Any] | None = None,
               progress: bool | None = None) -> list[Trajectory]:  # fmt: skip
    """Runs one trajectory per prompt to its end; returns them in prompt order.

    `envs`: one environment for every trajectory, or one per prompt; `sampling_params` likewise;
    `meta[i]` rides along on trajectory i. Everything is checked before the first turn is queued.
    See the module docstring for environments, budgets and statuses. `progress`: a tqdm bar on
    stderr (default: when a terminal).
    """
    n = len(prompts)
    one_env = callable(envs) or isinstance(envs, (str, bytes)) or not isinstance(envs, Sequence)
    envs = [envs] * n if one_env else list(envs)
    one = isinstance(sampling_params, SamplingParams)
    params = [sampling_params] * n if one else list(sampling_params)
    meta = [None] * n if meta is None else list(meta)
    for name, given in (("envs", envs), ("sampling_params", params), ("meta", meta)):
        if len(given) != n:
            raise ValueError(f"{n} prompts but {len(given)} {name}")
    if engine.paused:
        raise RuntimeError(_PAUSED)
    loop = MultiTurn(engine, max_turns=max_turns, max_tokens=max_tokens)
    for i, (p, env, sp) in enumerate(zip(prompts, envs, params)):
        try:
            loop.check(p, env, sp)
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompts[{i}]: {e}") from None
    from tqdm.auto import tqdm

    trajs = [loop.add(p, env, sp, m) for p, env, sp, m in zip(prompts, envs, params, meta)]
    show = progress or (progress is None and sys.stderr.isatty())
    try:
        with tqdm(total=n, desc="multi_turn", unit="traj", disable=not show) as bar:
            while loop.num_unfinished:
                if engine.paused:
                    raise RuntimeError(_PAUSED)
                bar.update(len(loop.step()))
    finally:
        loop.close()
    return trajs
