"""Teacher GRPO semantics on a single CPU process (trainer built directly)."""
import math

import pytest
import torch

from rlt.config import build_train_settings, compose
from rlt.errors import ConfigError
from rlt.rewards.teacher_reward import RewardInput
from rlt.trainers.grpo_run import build_teacher_grpo_trainer, run_teacher_grpo, validate_grpo


def make_trainer(tmp_path, *overrides):
    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "logging_prob=0", "save_completions_probability=0",
                                       *overrides])
    return build_teacher_grpo_trainer(build_train_settings(cfg, num_processes=1))


def test_paper_values_compose():
    cfg = compose("teacher_rlt")
    expect = dict(model_name_or_path="results/pre_rl_model", student_model="bespokelabs/Bespoke-Stratos-7B",
                  max_steps=125, train_batch_size=1024, per_device_train_batch_size=1,
                  generation_aggregation_steps=None, num_generations=64, temperature=0.7, learning_rate=1e-6,
                  lr_scheduler_type="constant", beta=0.04, sync_ref_model=True, ref_model_mixup_alpha=0.9,
                  ref_model_sync_steps=32, max_prompt_length=16384, max_completion_length=16384,
                  answer_log_prob_coeff=[1.0, 0.01], kl_penalty_reward_coeff=[3.0, 0.03],
                  reduction_log_prob_fn=["mean", "min"], reduction_kl_fn=["mean", "max"], not_matched_penalty=-1.0,
                  unbias_student_log_probs_temp=0.7, save_steps=25, save_final_model=True,
                  offload_untrained_models=True, loss_type="grpo", use_bias_correction_kl=False,
                  vllm_importance_sampling_correction=False, scale_rewards="group")
    assert {k: cfg[k] for k in expect} == expect


def test_kl_coeff_override_reaches_the_reward():
    cfg = compose("teacher_rlt", ["kl_penalty_reward_coeff=[0,0]", "output_dir=/tmp/unused"])
    assert build_train_settings(cfg, num_processes=4).reward.kl_penalty_reward_coeff == [0.0, 0.0]


def test_validation_errors(tmp_path):
    def check(overrides, n, match):
        with pytest.raises(ConfigError, match=match):
            cfg = compose("teacher_rlt", [f"output_dir={tmp_path}", *overrides])
            validate_grpo(build_train_settings(cfg, num_processes=n), n)

    check(["generation_aggregation_steps=256"], 8, r"generation_aggregation_steps=256 must divide "
                                                   r"gradient_accumulation_steps=128")
    check(["train_batch_size=1000"], 4, r"train_batch_size=1000 must be a multiple of num_generations=64")
    check(["num_generations=1"], 4, r"at least 2")
    check(["generation_aggregation_steps=2"], 4, r"generation_batch_size \(8\) must be divisible by num_generations \(64\)"
          r".*per_device_train_batch_size x 4 processes x generation_aggregation_steps")
    check(["student_model=null"], 4, "student_model is required")
    check(["use_reference_teacher_model=true", "beta=0"], 4, "needs a reference model")
    check(["answer_log_prob_coeff=[1]"], 4, "answer_log_prob_coeff has 1 value")
    if not torch.cuda.is_available():
        check(["reward_logprob_backend=fused"], 4, "reward_logprob_backend=fused runs on CUDA")
    for bad, match in [("temperature=-1", r"temperature=-1(\.0)? must be > 0"), ("top_p=1.5", r"top_p=1.5 must be in \(0, 1\]"),
                       ("top_p=0", r"top_p=0(\.0)? must be"), ("max_completion_length=0", "max_completion_length=0"),
                       ("repetition_penalty=0", r"repetition_penalty=0(\.0)? must"), ("min_p=2", r"min_p=2(\.0)? must")]:
        check([bad], 4, match)
    # passes on 4 training processes (the paper's layout)
    s = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}"]), num_processes=4)
    validate_grpo(s, 4)
    assert s.args.gradient_accumulation_steps == 256 and s.args.steps_per_generation == 256
    # and on 8 (generation_aggregation_steps: null follows the accumulation: one generation round per step)
    s = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}"]), num_processes=8)
    validate_grpo(s, 8)
    assert s.args.gradient_accumulation_steps == 128 and s.args.steps_per_generation == 128


def test_student_with_another_tokenizer_is_refused(tmp_path):
    from rlt.testing.tiny_model import write_tiny_model

    other = write_tiny_model(tmp_path / "other", seed=2, tokenizer_vocab_size=400, tokenizer_seed=7)
    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}/o", f"student_model={other}"])
    with pytest.raises(ConfigError, match="different tokenizer"):
        run_teacher_grpo(build_train_settings(cfg, num_processes=1))


def test_advantages_by_hand_including_zero_std_group(tmp_path):
    trainer, _ = make_trainer(tmp_path)
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    trainer.reward_funcs[0] = lambda prompts, completions, **kw: rewards[:len(prompts)]
    trainer._generate_single_turn = lambda prompt_ids, *a, **k: ([[7, 8, 9]] * len(prompt_ids), None)
    batch = [trainer.train_dataset[0]] * 4 + [trainer.train_dataset[1]] * 4
    out = trainer._generate_and_score_completions(batch)
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    expect = [(r - 2.5) / (std + 1e-4) for r in rewards[:4]] + [0.0] * 4
    assert out["advantages"].tolist() == pytest.approx(expect, abs=1e-6)


def test_grpo_loss_by_hand_with_beta(tmp_path):
    trainer, _ = make_trainer(tmp_path)
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]], requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
    inputs = {"prompt_ids": torch.ones(2, 2, dtype=torch.long), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
              "completion_ids": torch.ones(2, 3, dtype=torch.long),
              "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
              "advantages": torch.tensor([0.5, -1.0]), "num_items_in_batch": torch.tensor(5),
              "ref_per_token_logps": torch.tensor([[-1.0, -2.0, -1.0], [-2.0, -2.0, -1.0]])}
    beta, ga = 0.04, trainer.args.gradient_accumulation_steps
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ga  # as inside the training loop
    loss = trainer._compute_loss(trainer.model, inputs)
    # on-policy ratio 1: token loss = -A + beta * k3, k3 = e^d - d - 1 with d = ref - logp
    seq1 = (-0.5 * 3 + beta * (math.exp(-1) + 1 - 1)) / 3
    seq2 = (1.0 * 2) / 2  # the masked third token (d = 1) does not count
    assert loss.item() == pytest.approx((seq1 + seq2) / 2 / ga, abs=1e-7)


def test_reward_sees_current_policy_or_reference(tmp_path, tokenizer):
    from rlt.data.formats import resolve_format
    from rlt.data.text import teacher_prompt

    fmt = resolve_format("bespoke_stratos")
    prompt = teacher_prompt(tokenizer, "What is 2+3?", "5", fmt)
    items = [RewardInput(prompt, "Add 2 and 3.\n\n<|end_of_explanation|>", "What is 2+3?", "5")]

    def teacher_kl(trainer):
        return trainer.teacher_reward(trainer.teacher_model(), items).components["thought_kl/mean"].item()

    for use_ref in (False, True):
        trainer, _ = make_trainer(tmp_path / str(use_ref), f"use_reference_teacher_model={str(use_ref).lower()}")
        assert (trainer.teacher_model() is trainer.ref_model) == use_ref
        before = teacher_kl(trainer)
        with torch.no_grad():
            trainer.model.lm_head.weight.add_(0.5 * torch.randn_like(trainer.model.lm_head.weight))
        after = teacher_kl(trainer)
        assert (abs(after - before) > 1e-3) == (not use_ref), (use_ref, before, after)


def test_training_changes_policy_not_student(tmp_path):
    trainer, _ = make_trainer(tmp_path, "max_steps=2", "save_strategy=no")
    student = {k: v.clone() for k, v in trainer.teacher_reward.student.state_dict().items()}
    policy = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.teacher_reward.student.state_dict()[k]) for k, v in student.items())
    assert not any(p.requires_grad for p in trainer.teacher_reward.student.parameters())
    assert not trainer.teacher_reward.student.training   # still in eval mode after train() (no dropout)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, policy[k])]
    assert len(changed) > 5
    logs = [h for h in trainer.state.log_history if "teacher_reward/r_ss" in h]
    assert len(logs) == 2 and all("time/reward" in h and "time/generation" in h for h in logs)


def test_checkpoints_hold_the_synced_reference_and_a_resume_restores_it(tmp_path, caplog):
    """trl checkpoints no reference model; rlt's do once sync_ref_model has changed it (trl mixes it in place:
    ref <- (1 - alpha) ref + alpha policy at the end of every ref_model_sync_steps-th step), and a resume restores
    it, so the resumed run's next sync starts from the saved reference, bit for bit."""
    from safetensors.torch import load_file

    from rlt.trainers.frozen import REFERENCE_FILE

    sync = ["ref_model_sync_steps=1", "beta=0.04", "ref_model_mixup_alpha=0.9"]
    first, _ = make_trainer(tmp_path, "max_steps=1", *sync)
    init = {n: p.detach().clone() for n, p in first.ref_model.named_parameters()}
    first.train()
    ckpt1 = tmp_path / "checkpoint-1"
    assert [f.name for f in ckpt1.glob("*.safetensors")] == ["model.safetensors"]   # all vLLM would load there
    ref1, policy1 = load_file(ckpt1 / REFERENCE_FILE), load_file(ckpt1 / "model.safetensors")
    assert set(ref1) == set(init)

    def mixed(ref, policy):   # trl's SyncRefModelCallback, the same float operations
        return {k: ref[k].clone().mul_(0.1).add_(policy[k], alpha=0.9) for k in ref}

    assert all(torch.equal(v, mixed(init, policy1)[k]) for k, v in ref1.items())
    assert max((ref1[k] - init[k]).abs().max().item() for k in init) > 1e-5   # the sync changed it

    second, _ = make_trainer(tmp_path, "max_steps=2", *sync)
    with caplog.at_level("INFO", logger="rlt.trainers.teacher_grpo"):
        second.train(resume_from_checkpoint=str(ckpt1))
    assert f"reference model restored from {ckpt1 / REFERENCE_FILE} (step 1)" in caplog.text
    ckpt2 = tmp_path / "checkpoint-2"
    ref2, policy2 = load_file(ckpt2 / REFERENCE_FILE), load_file(ckpt2 / "model.safetensors")
    assert all(torch.equal(v, mixed(ref1, policy2)[k]) for k, v in ref2.items())
    restarted = mixed(init, policy2)   # what a resume without the saved reference would have given
    assert max((ref2[k] - restarted[k]).abs().max().item() for k in ref2) > 1e-6

    (ckpt1 / REFERENCE_FILE).unlink()   # a checkpoint saved before rlt kept the reference: a warning says so
    caplog.clear()
    third, _ = make_trainer(tmp_path / "old", "max_steps=1", *sync)
    with caplog.at_level("WARNING", logger="rlt.trainers.teacher_grpo"):
        third._restore_reference(str(ckpt1))
    assert (f"resuming at step 1: {ckpt1} holds no reference model (saved before rlt checkpointed it, or by a run "
            "without sync_ref_model), so the reference restarts from model_name_or_path, while this run's settings "
            "would have mixed the policy into it 1 time(s) (sync_ref_model, every 1 steps)") in caplog.text


def test_resume_true_without_a_checkpoint_is_refused_as_transformers_refuses_it(tmp_path):
    trainer, _ = make_trainer(tmp_path, "max_steps=1", "ref_model_sync_steps=1", "beta=0.04")
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_no_reference_file_before_the_first_sync(tmp_path):
    from rlt.trainers.frozen import REFERENCE_FILE

    trainer, _ = make_trainer(tmp_path, "max_steps=1", "ref_model_sync_steps=2", "beta=0.04")
    trainer.train()
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").exists()
    assert not (tmp_path / "checkpoint-1" / REFERENCE_FILE).exists()   # still model_name_or_path's weights


def test_a_reference_file_of_another_model_is_refused_before_copying(tmp_path):
    from safetensors.torch import save_file

    from rlt.trainers.frozen import load_frozen_weights

    model = torch.nn.Linear(3, 2)
    save_file({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, tmp_path / "ref.safetensors")
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"ref.safetensors: does not fit the model it would restore \(missing "
                                          r"\[\], unexpected \[\], other shapes \['weight'\]\)"):
        load_frozen_weights(model, str(tmp_path / "ref.safetensors"))
    assert torch.equal(model.weight, before)


def zero3_like(device: str):
    """A module whose parameters carry ZeRO-3 shards as DeepSpeed keeps them (``ds_tensor``, with attributes)."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for p in m.parameters():
        p.ds_tensor = torch.randn(p.numel() // 2 + 1, device=device)
        p.ds_tensor.ds_numel = p.ds_tensor.numel()
        p.ds_persist = False
    m[1].bias.ds_persist = True   # kept whole by DeepSpeed: stays where it is
    return m


def test_shards_already_in_cpu_memory_are_left_alone():
    from rlt.trainers.frozen import shards_to

    m = zero3_like("cpu")
    before = [p.ds_tensor for p in m.parameters()]
    assert shards_to(m, "cpu") == (0, set())
    assert [p.ds_tensor for p in m.parameters()] == before
    assert shards_to(torch.nn.Linear(2, 2), "cpu") == (0, set())   # not a ZeRO-3 model: nothing to move


class FakeShard:
    """A GPU shard stand-in for a CPU machine: says where it is, and records where its data is sent."""

    def __init__(self, numel: int, device: str):
        self.device, self.n, self.ds_numel = torch.device(device), numel, numel
        self._data = torch.zeros(numel)

    @property
    def data(self):
        shard = self

        class _Data:
            def to(self, target):
                shard.sent_to = torch.device(target)
                return shard._data

        return _Data()

    @data.setter
    def data(self, value):
        self._data, self.device = value, value.device

    def numel(self):
        return self.n

    def element_size(self):
        return 2   # bf16


def test_shards_on_a_gpu_are_moved_in_place_and_counted():
    from rlt.trainers.frozen import shards_to

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for k, p in enumerate(m.parameters()):
        p.ds_tensor, p.ds_persist = FakeShard(10 + k, "cuda:0"), False
    m[1].bias.ds_persist = True
    m[0].weight.ds_secondary_tensor = FakeShard(5, "cuda:1")   # hpZ's node-local copy moves too
    objects = {id(p): p.ds_tensor for p in m.parameters()}
    moved, came_from = shards_to(m, "cpu")
    assert moved == 2 * (10 + 11 + 12 + 5) and came_from == {"cuda:0", "cuda:1"}   # the persistent bias stays
    assert m[0].weight.ds_secondary_tensor.device.type == "cpu"
    for p in m.parameters():
        assert p.ds_tensor is objects[id(p)]   # the same object: DeepSpeed's attributes on it stay
        assert p.ds_tensor.device.type == ("cuda" if p is m[1].bias else "cpu")
    assert shards_to(m, "cpu") == (0, set())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shards_move_to_cpu_in_place():
    from rlt.trainers.frozen import shards_to

    m = zero3_like("cuda")
    shards = {id(p): p.ds_tensor for p in m.parameters()}
    values = {id(p): p.ds_tensor.cpu().clone() for p in m.parameters()}
    moved, came_from = shards_to(m, "cpu")
    persist = m[1].bias
    want = sum(p.ds_tensor.numel() * 4 for p in m.parameters() if p is not persist)
    assert moved == want and came_from == {"cuda:0"}
    for p in m.parameters():
        assert p.ds_tensor is shards[id(p)] and p.ds_tensor.ds_numel == p.ds_tensor.numel()   # same object
        assert p.ds_tensor.device.type == ("cuda" if p is persist else "cpu")
        assert torch.equal(p.ds_tensor.cpu(), values[id(p)])
    assert shards_to(m, "cpu") == (0, set())


def test_in_process_generation_too_large_for_the_gpu_is_refused(tmp_path):
    """./launch.sh 8 teacher_rlt (no servers): 128 sequences of ~17k tokens per rank in one model.generate, a KV
    cache of up to 120 GB at 7B shape; refused before any model loads, pointing to launch_with_server.sh."""
    from types import SimpleNamespace

    from rlt.config import build_train_settings, compose
    from rlt.trainers.grpo_run import check_in_process_generation, kv_bytes_per_token

    qwen7b = SimpleNamespace(num_attention_heads=28, num_key_value_heads=4, hidden_size=3584, num_hidden_layers=28)
    assert kv_bytes_per_token(qwen7b) == 28 * 2 * 4 * 128 * 2 == 57344   # 56 KiB, as docs/gpu.md counts
    s = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}"]), num_processes=8)
    h100 = 80 * 10**9
    with pytest.raises(ConfigError, match=r"^in-process generation \(no vllm_host, use_vllm=false\) holds 128 "
                                          r"sequences of up to 16384 new tokens per rank at once: a KV cache of up to "
                                          r"120 GB \(prompts not counted\), more than the GPU's 80 GB; run the "
                                          r"rollouts on vLLM servers"):
        check_in_process_generation(s, h100, qwen7b)
    check_in_process_generation(s, None, qwen7b)   # no GPU: nothing to check
    servers = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}", "vllm_host=127.0.0.1"]),
                                   num_processes=4)
    check_in_process_generation(servers, h100, qwen7b)
    short = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}", "max_completion_length=512",
                                                         "train_batch_size=128"]), num_processes=8)
    check_in_process_generation(short, h100, qwen7b)   # 2 x 16 sequences of ~2k tokens: fits
    paged = build_train_settings(compose("teacher_rlt", [f"output_dir={tmp_path}",
                                                         "+use_transformers_continuous_batching=true"]), num_processes=8)
    check_in_process_generation(paged, h100, qwen7b)   # trl's paged cache is bounded
