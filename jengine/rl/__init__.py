"""jengine.rl: the trainer side of an RL loop over jengine rollouts.

  token_logprobs    differentiable, batched logprobs; forward values bitwise the engine's
  completion_mask   which output columns are completion tokens
  pack              host-side padding of (prompt, completion, rollout logprobs) into arrays
  mismatch_metrics  ratio / clip / k1 / k3 / |r| / ESS / bitwise-equal counts, as trainers log them
  routing_mismatches  tokens a mixture-of-experts model routed differently (rollout vs trainer)
  truncated_is, masked_is, token_ratios, sequence_ratios   opt-in corrections (TIS, MIS, GSPO)
  group_advantages, grpo_loss, gspo_loss                   GRPO / GSPO objectives
  RolloutActor, GroupRequest, Group   pipelined rollouts: a background thread owns the engine,
                                      finished groups (of requests, or of trajectories when the
                                      request has an env) arrive on a bounded queue
  Trajectory, Turn, ChatTemplate      multi-turn rollouts in token ids (`rl.trajectory`): model
                                      turns (mask 1) and environment turns (mask 0)
  multi_turn, MultiTurn               the multi-turn loop: environments as sync / async callables
"""

from jengine.rl.corrections import (
    log_ratios,
    masked_is,
    sequence_log_ratios,
    sequence_ratios,
    token_ratios,
    truncated_is,
)
from jengine.rl.logprobs import completion_mask, pack, token_logprobs
from jengine.rl.losses import group_advantages, grpo_loss, gspo_loss
from jengine.rl.metrics import bitwise_equal, mismatch_metrics, routing_mismatches, to_host
from jengine.rl.multi_turn import MultiTurn, multi_turn
from jengine.rl.pipeline import Group, GroupRequest, RolloutActor
from jengine.rl.trajectory import ChatTemplate, Trajectory, Turn

__all__ = [
    "bitwise_equal", "ChatTemplate", "completion_mask", "Group", "GroupRequest",
    "group_advantages", "grpo_loss", "gspo_loss", "log_ratios", "masked_is", "mismatch_metrics",
    "multi_turn", "MultiTurn", "pack", "RolloutActor", "routing_mismatches",
    "sequence_log_ratios", "sequence_ratios", "to_host", "token_logprobs", "token_ratios",
    "Trajectory", "truncated_is", "Turn",
]  # fmt: skip
