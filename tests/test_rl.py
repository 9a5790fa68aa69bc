"""Generation, PPO, RLOO and GRPO on tiny models: the traps from the peers' trackers, each tested."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import learnable_pairs, write_jsonl
from prefalign.config import Sampling
from prefalign.models.generate import completion_mask, encode_prompt, generate
from prefalign.train.methods import make_config
from prefalign.train.run import train


def rl_config(**fields):
    return make_config(**{"method": "ppo", **fields})


REWARDS = Path(__file__).parent / "fixtures" / "rewards.py"
PROMPTS = ["I loved the movie", "the plot", "what", "I hated the story and the actor was bad"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rows = [{"prompt": r["prompt"]} for r in learnable_pairs(32)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def _rows(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_and_scoring_see_the_same_tokens(arch, tiny_models, tokenizer):
    """The tempered log-prob of every sampled token, from the left-padded batch, equals a plain forward
    over that row alone (no padding, positions from 0): same ids, same positions, same temperature."""
    from transformers import AutoModelForCausalLM

    from prefalign.models.logps import completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    roll = generate(model, tokenizer, ids, Sampling(max_new_tokens=12, temperature=0.7), seed=3)
    assert len({len(p) for p in ids}) > 1  # really left-padded
    with torch.no_grad():
        batch = completion_logps(model, roll.input_ids, roll.attention_mask, roll.n_prompt, roll.completion_mask,
                                 temperature=0.7)["logps"]
        for i, p in enumerate(ids):
            comp = roll.completion_ids[i][roll.completion_mask[i].bool()]
            seq = torch.cat([torch.tensor(p), comp])[None]
            logits = model(seq).logits[0, len(p) - 1:-1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, comp[:, None])[:, 0]
            assert torch.allclose(batch[i, :len(comp)], alone, atol=1e-5)
            assert (batch[i, len(comp):] == 0).all()


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(tiny_models, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    cfg = Sampling(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    state = torch.get_rng_state()
    a, b = generate(model, tokenizer, ids, cfg, seed=1), generate(model, tokenizer, ids, cfg, seed=1)
    c = generate(model, tokenizer, ids, cfg, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.completion_texts == b.completion_texts and torch.equal(a.input_ids, b.input_ids)
    assert a.completion_texts != c.completion_texts
    assert a.tokens_per_s > 0 and a.new_tokens == int(a.completion_mask.sum())
    greedy = generate(model, tokenizer, ids, Sampling(max_new_tokens=10, temperature=0), seed=None)
    assert (
        greedy.completion_texts
        == generate(model, tokenizer, ids, Sampling(max_new_tokens=10, temperature=0), seed=9).completion_texts
    )


def test_completion_mask_stops_at_the_first_eos():
    comp = torch.tensor([[5, 7, 2, 9, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    mask, ended = completion_mask(comp, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_is_read_at_the_last_real_token_under_left_padding(arch, tiny_models, tokenizer, tmp_path):
    """A reward model scoring a left-padded rollout gives each row the score of that row alone."""
    from transformers import AutoModelForCausalLM

    from prefalign.judges import RewardModelJudge
    from prefalign.models.scalar import load_scalar_model, score_head, sequence_scores

    rm = load_scalar_model(tiny_models[arch], pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(score_head(rm).weight, std=1.0)  # a head that reads something
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(tmp_path / "rm")
    assert judge.shares_vocab(tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    roll = generate(policy, tokenizer, ids, Sampling(max_new_tokens=8), seed=0)
    batch = judge.score_ids(roll.input_ids, roll.attention_mask)
    for i, p in enumerate(ids):
        comp = roll.completion_ids[i][roll.completion_mask[i].bool()]
        seq = torch.cat([torch.tensor(p), comp])[None]
        with torch.no_grad():
            alone = sequence_scores(judge.model, seq, torch.ones_like(seq))
        assert abs(float(batch[i]) - float(alone)) < 1e-4


def _cfg(tmp_path, model, prompts, method, **kw):
    base = dict(method=method, model=str(model), prompts=str(prompts), reward=f"{REWARDS}:great",
                output=str(tmp_path / method), max_steps=30, batch_size=8, max_new_tokens=8, learning_rate=1e-2,
                lr_schedule="constant", kl_coef=0.01, seed=0)
    base.update(kw)
    return rl_config(**base)


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo"])
def test_callable_reward_is_learned(method, tiny_models, prompt_file, tmp_path):
    # 16 rollout rows of 16 tokens (rloo/grpo: 4 prompts x 4 samples): sampled from the full
    # vocabulary, the target word comes up about once in 400 tokens at the start
    cfg = _cfg(tmp_path, tiny_models["llama"], prompt_file, method, max_steps=40, max_new_tokens=16,
               batch_size=16 if method == "ppo" else 4)
    train(cfg, log=lambda _: None, progress=False)
    rows = _rows(tmp_path / method)
    before = sum(r["ppo/reward"] for r in rows[:3]) / 3
    after = sum(r["ppo/reward"] for r in rows[-3:]) / 3
    assert after > before + 4.0, (before, after)  # from ~0.1 "great" per completion to many
    last = rows[-1]
    for key in ("ppo/reward", "ppo/kl", "ppo/kl_k1", "ppo/kl_k3", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/kl_coef", "ppo/rollout_seconds", "ppo/update_seconds", "tokens_per_s"):
        assert key in last, key
    for r in rows:  # the step's time split: the rollout's share, generation's part of it
        assert r["ppo/rollout_share"] == pytest.approx(r["ppo/rollout_seconds"] / r["step_seconds"], rel=1e-9)
        assert 0 < r["ppo/generation_share"] < r["ppo/rollout_share"] < 1
    assert rows[0]["ppo/kl_k3"] == 0.0 < rows[-1]["ppo/kl_k3"]  # the first rollout is the reference's own
    monitored = [r for r in rows if "kl/policy_ref_seq" in r]
    assert [r["step"] for r in monitored] == [10, 20, 30, 40]  # kl_every unset: about four a run
    assert monitored[-1]["kl/policy_ref_seq"] > monitored[0]["kl/policy_ref_seq"] > 0
    assert ("ppo/value_explained_var" in last) == (method == "ppo")
    summary = json.loads((tmp_path / method / "run.json").read_text())
    assert summary["model_copies"] == 2  # policy + frozen reference (the value head is part of the policy)


def test_ppo_with_lora_critic_model_reward_model_and_adaptive_kl(tiny_models, tokenizer, prompt_file, tmp_path):
    from prefalign.models.scalar import load_scalar_model

    rm = load_scalar_model(tiny_models["llama"], pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cfg = _cfg(tmp_path, tiny_models["llama"], prompt_file, "ppo", reward=str(tmp_path / "rm"), lora=True,
               critic="model", kl_target=1.0, kl_horizon=100, max_steps=3, missing_eos_penalty=1.0,
               reward_norm="running", ppo_epochs=2, num_minibatches=2)
    train(cfg, log=lambda _: None, progress=False)
    rows = _rows(tmp_path / "ppo")
    summary = json.loads((tmp_path / "ppo" / "run.json").read_text())
    # policy (reference = adapters off) + critic model + reward model
    assert summary["model_copies"] == 3 and summary["reference"] == "adapter"
    assert rows[0]["ppo/kl_coef"] != 0.01  # the controller moved it
    assert (tmp_path / "ppo" / "final" / "adapter_config.json").exists()
    # the score the ground truth gave (all 0: a zero head) minus the EOS penalty, normalised
    assert rows[0]["ppo/reward"] == 0.0


def test_shape_scores_penalty_and_running_norm():
    from prefalign.train.ppo import RunningMoments, shape_scores

    cfg = rl_config(model="m", output="o", prompts="p", reward="r", missing_eos_penalty=2.0, reward_clip=1.5)
    out = shape_scores(
        cfg, torch.tensor([1.0, 1.0]), torch.tensor([True, False]), torch.tensor([3, 3]), RunningMoments()
    )
    assert out.tolist() == [1.0, -1.0]
    # min_new_tokens 3: an EOS after 2 tokens (length 3 with EOS) is early, after 3 (length 4) is not,
    # and a completion that never ended is not "early"
    cfg = rl_config(model="m", output="o", prompts="p", reward="r", min_new_tokens=3, early_eos_penalty=0.5)
    out = shape_scores(cfg, torch.zeros(4), torch.tensor([True, True, False, True]), torch.tensor([3, 4, 2, 1]),
                       RunningMoments())
    assert out.tolist() == [-0.5, 0.0, 0.0, -0.5]
    cfg = rl_config(model="m", output="o", prompts="p", reward="r", reward_norm="running")
    mom = RunningMoments()
    shape_scores(cfg, torch.tensor([1.0, 3.0]), torch.tensor([True, True]), torch.tensor([5, 5]), mom)
    shape_scores(cfg, torch.tensor([5.0, 7.0]), torch.tensor([True, True]), torch.tensor([5, 5]), mom)
    assert abs(mom.mean - 4.0) < 1e-3 and abs(mom.var - 5.0) < 1e-2  # population variance of 1, 3, 5, 7


def test_exact_resume(tiny_models, prompt_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_models["gpt2"], prompt_file, "ppo", max_steps=6, save_every=3, keep_checkpoints=5,
               kl_target=2.0, reward_norm="running")
    train(cfg, log=lambda _: None, progress=False)
    full = _rows(tmp_path / "ppo")
    shutil.rmtree(tmp_path / "ppo" / "checkpoints" / "step-6")  # as if the run died after step 3's checkpoint
    train(cfg.model_copy(update={"resume": True}), log=lambda _: None, progress=False)
    resumed = _rows(tmp_path / "ppo")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full[3:], resumed[3:], strict=True):
        for key in ("ppo/reward", "ppo/kl", "loss", "ppo/kl_coef", "ppo/score"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_cli_short_form_and_errors(tiny_models, prompt_file, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True)

    run = cli(
        "train",
        "--method",
        "rloo",
        "--model",
        tiny_models["llama"],
        "--prompts",
        prompt_file,
        "--reward",
        f"{REWARDS}:great",
        "--output",
        tmp_path / "r",
        "max_steps=2",
        "batch_size=2",
        "--no-progress",
    )
    assert run.returncode == 0, run.stderr
    assert len(_rows(tmp_path / "r")) == 2
    run = cli("train", "--method", "ppo", "--model", tiny_models["llama"], "--prompts", prompt_file,
              "--reward", f"{REWARDS}:nope", "--output", tmp_path / "x", "max_steps=1", "--no-progress")
    assert run.returncode == 2 and "has no function 'nope'" in run.stderr  # the judge spec: exit 2
    run = cli("train", "--method", "grpo", "--model", tiny_models["llama"], "--prompts", prompt_file,
              "--reward", f"{REWARDS}:great", "--output", tmp_path / "x", "samples_per_prompt=1")
    assert run.returncode == 2 and "samples_per_prompt must be >= 2" in run.stderr
    run = cli("train", "--method", "ppo", "--model", tiny_models["llama"], "--prompts", prompt_file,
              "--reward", f"{REWARDS}:great", "--output", tmp_path / "x", "kl_coeff=0.1")
    assert run.returncode == 2 and "did you mean 'kl_coef'" in run.stderr


@pytest.mark.parametrize("top_k,finite", [(0, None), (5, 5)])
def test_samples_come_from_the_distribution_ppo_scores(top_k, finite, tiny_models, tokenizer):
    """The processed distribution generation samples from is softmax(logits / T) over the whole
    vocabulary when top_k=0 and top_p=1 (no hidden default such as top_k=50), and exactly top_k
    tokens when asked."""
    from transformers import AutoModelForCausalLM

    from prefalign.models.generate import eos_ids, generation_config

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    cfg = generation_config(Sampling(max_new_tokens=3, temperature=0.7, top_k=top_k), tokenizer.pad_token_id,
                            eos_ids(tokenizer, model))
    cfg.output_scores, cfg.output_logits, cfg.return_dict_in_generate = True, True, True
    ids = torch.tensor([encode_prompt(tokenizer, "I loved the movie")])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    scores, logits = out.scores[0][0], out.logits[0][0]
    if finite is None:
        assert torch.allclose(torch.log_softmax(scores, -1), torch.log_softmax(logits / 0.7, -1), atol=1e-5)
    else:
        assert int(torch.isfinite(scores).sum()) == finite


def test_ppo_and_generation_on_mamba(tiny_models, prompt_file, tmp_path):
    """A state-space model (no attention mask to bend) samples, scores and updates through the same code."""
    train(_cfg(tmp_path, tiny_models["mamba"], prompt_file, "ppo", max_steps=2, batch_size=4, max_new_tokens=6,
                reward=f"{REWARDS}:length"),
           log=lambda _: None, progress=False)
    rows = _rows(tmp_path / "ppo")
    # the first rollout's policy is the reference (KL exactly 0); after its update it is not
    assert len(rows) == 2 and rows[0]["ppo/kl_k3"] == 0.0 < rows[1]["ppo/kl_k3"]


@pytest.mark.parametrize("method,penalty", [("ppo", "loss_full"), ("ppo", "loss_k3"), ("rloo", "loss_full"),
                                            ("grpo", None)])
def test_loss_side_kl_penalties_train(method, penalty, tiny_models, prompt_file, tmp_path):
    kw = {"kl_penalty": penalty} if penalty else {}
    cfg = _cfg(
        tmp_path,
        tiny_models["llama"],
        prompt_file,
        method,
        max_steps=2,
        batch_size=4,
        kl_coef=0.5,
        ppo_epochs=1,
        reward=f"{REWARDS}:length",
        **kw,
    )
    assert cfg.kl_penalty == (penalty or "loss_k3")  # grpo's default: k3 in the loss
    train(cfg, log=lambda _: None, progress=False)
    rows = _rows(tmp_path / method)
    # on the first update the policy is the reference: the penalty's value is 0 there, then positive
    assert abs(rows[0]["ppo/kl_loss"]) < 1e-5 and rows[1]["ppo/kl_loss"] > 1e-6


@pytest.mark.parametrize("lora", [False, True])
def test_loss_full_maps_each_shuffled_minibatch_row_to_its_reference_states(lora, tiny_models, prompt_file, tmp_path):
    """At learning rate 0 the policy is the reference, so the exact KL of every position is 0, unless
    a minibatch row were compared with another row's reference states."""
    cfg = _cfg(tmp_path, tiny_models["llama"], prompt_file, "ppo", max_steps=2, batch_size=8, learning_rate=0.0,
               kl_penalty="loss_full", num_minibatches=4, ppo_epochs=2, kl_every=0, lora=lora,
               reward=f"{REWARDS}:length")
    train(cfg, log=lambda _: None, progress=False)
    assert all(abs(r["ppo/kl_loss"]) < 1e-6 for r in _rows(tmp_path / "ppo"))


@pytest.mark.parametrize("penalty", ["reward_k1", "loss_k3", "loss_full"])
def test_a_strong_kl_coefficient_holds_the_policy_near_the_reference(penalty, tiny_models, prompt_file, tmp_path):
    """End to end, through the trainer: with the same reward pulling away (longer completions), a large
    kl_coef ends at a smaller exact KL (the monitor's) than no penalty at all."""
    kl = {}
    for coef in (0.0, 2.0):
        out = tmp_path / f"{penalty}-{coef}"
        train(_cfg(tmp_path, tiny_models["llama"], prompt_file, "ppo", max_steps=8, batch_size=8, kl_coef=coef,
                    kl_penalty=penalty, learning_rate=2e-2, reward=f"{REWARDS}:length", output=str(out), kl_every=8),
               log=lambda _: None, progress=False)
        kl[coef] = _rows(out)[-1]["kl/policy_ref_seq"]
    assert kl[2.0] < 0.5 * kl[0.0], kl


def test_rl_configurations_that_would_break_the_gradient_are_refused():
    base = dict(model="m", output="o", prompts="p", reward="r")
    with pytest.raises(ValueError, match="cancels kl_coef"):
        rl_config(**base, method="grpo", kl_penalty="reward_k1")
    with pytest.raises(ValueError, match="top_k/top_p truncate"):
        rl_config(**base, top_k=50)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rl_config(**base, temperature=0.0)
    with pytest.raises(ValueError, match="kl_budget is checked against the KL monitor"):
        rl_config(**base, kl_budget=0.1, kl_every=0)


def test_kl_estimator_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="kl_estimator was replaced by kl_penalty"):
        rl_config(model="m", output="o", prompts="p", reward="r", kl_estimator="k3")


def test_non_finite_rewards_are_skipped_and_stop_the_run(tiny_models, prompt_file, tmp_path):
    from prefalign.train.loop import TrainingError

    logs = []
    cfg = _cfg(tmp_path, tiny_models["gpt2"], prompt_file, "ppo", max_steps=3, batch_size=4, kl_every=0,
               reward=f"{REWARDS}:nan_first")
    train(cfg, log=logs.append, progress=False)
    rows = _rows(tmp_path / "ppo")
    assert [r["skipped_steps"] for r in rows] == [1, 1, 1] and "ppo/reward" in rows[-1]
    assert any("non-finite rewards; rollout skipped" in x for x in logs)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(cfg.model_copy(update={"reward": f"{REWARDS}:nan_always", "max_steps": 10, "max_bad_steps": 3,
                                      "output": str(tmp_path / "nan")}), log=lambda _: None, progress=False)
