"""LoRA (use_peft=true) teachers and students: targets, merged weights for vLLM and saving, the reward's teacher."""
import glob
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cmd, running_server
from rlt.config import build_train_settings, compose
from rlt.errors import ConfigError
from rlt.models import (LoraConfig, full_named_weights, full_weight_metadata, load_causal_lm, peft_config,
                        resolve_model_path)

DEFAULT_TARGETS = {"q_proj", "v_proj"}  # peft's default for qwen2
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def peft_tiny(path, targets=None, b_scale=0.1, seed=0):
    """The tiny model with LoRA adapters whose B matrices are random (so the adapters change the outputs)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           peft_config(LoraConfig(use_peft=True, lora_target_modules=targets)))
    randomize_lora_b(model, b_scale, seed)
    return model.eval()


def randomize_lora_b(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def adapted_modules(model) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def merged_reference(model) -> dict[str, torch.Tensor]:
    import copy

    return copy.deepcopy(model).merge_and_unload().state_dict()


def safetensors_dir(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        out.update(load_file(f))
    return out


def fake_trainer(model, step=1):
    acc = SimpleNamespace(is_main_process=True, unwrap_model=lambda m: m, wait_for_everyone=lambda: None)
    return SimpleNamespace(accelerator=acc, model=model, state=SimpleNamespace(global_step=step))


# ------------------------------------------------------------------------------------------ targets
def test_default_and_all_linear_targets(tiny_path):
    assert adapted_modules(peft_tiny(tiny_path)) == DEFAULT_TARGETS
    model = peft_tiny(tiny_path, ["all-linear"])
    assert adapted_modules(model) == ALL_LINEAR  # lm_head is never adapted
    assert adapted_modules(peft_tiny(tiny_path, ["q_proj", "down_proj"])) == {"q_proj", "down_proj"}
    cfg = compose("tiny_teacher_rlt", ["use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0",
                                       "lora_target_modules=[all-linear]", "output_dir=/tmp/unused"])
    lora = peft_config(build_train_settings(cfg, num_processes=1).lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (4, 8, 0.0, "all-linear")


def test_reference_teacher_with_lora_needs_no_beta(tmp_path):
    from rlt.trainers.grpo_run import validate_grpo

    def settings(*extra):
        return build_train_settings(compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "beta=0",
                                                                 "use_reference_teacher_model=true", *extra]), 1)

    validate_grpo(settings("use_peft=true"), 1)  # the reference is the base model: adapters disabled
    with pytest.raises(ConfigError, match="needs a reference model"):
        validate_grpo(settings(), 1)
    # no reference at all: trl refuses sync_ref_model (the recipes' default) after the models load; refused here
    with pytest.raises(ConfigError, match="beta=0 keeps no reference model, so sync_ref_model=true has nothing"):
        validate_grpo(settings("use_reference_teacher_model=false"), 1)
    validate_grpo(settings("use_reference_teacher_model=false", "sync_ref_model=false"), 1)


def test_an_output_layer_the_reward_would_score_wrongly_is_refused(tmp_path, tiny_path):
    from rlt.rewards.logprobs import HEAD_SCALES, check_output_layer
    from rlt.trainers.grpo_run import validate_grpo

    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "use_peft=true", "lora_target_modules=[q_proj,lm_head]"])
    with pytest.raises(ConfigError, match=r"lora_target_modules=\['q_proj', 'lm_head'\]: lm_head is the output layer"):
        validate_grpo(build_train_settings(cfg, 1), 1)
    check_output_layer(peft_tiny(tiny_path, ["q_proj"]), "teacher")  # adapters elsewhere: the head is plain
    adapted_head = peft_tiny(tiny_path, ["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="teacher: its output layer carries a LoRA adapter"):
        check_output_layer(adapted_head, "teacher")
    with pytest.raises(ConfigError, match="teacher: its output layer carries a LoRA adapter"):
        check_output_layer(adapted_head.get_base_model(), "teacher")
    capped = load_causal_lm(tiny_path, "float32")
    capped.config.final_logit_softcapping = 30.0  # as Gemma-2's config sets it
    with pytest.raises(ConfigError, match=r"student_model: its config sets final_logit_softcapping=30\.0"):
        check_output_layer(capped, "student_model")
    scaled = load_causal_lm(tiny_path, "float32")
    check_output_layer(scaled, "student_model")
    for key in HEAD_SCALES:   # each key, set to another value than 1, is refused; 1 is not
        setattr(scaled.config, key, 1.0)
        check_output_layer(scaled, "student_model")
        setattr(scaled.config, key, 24.0)
        with pytest.raises(ConfigError, match=rf"student_model: its config sets {key}=24\.0"):
            check_output_layer(scaled, "student_model")
        delattr(scaled.config, key)
    rows = scaled.get_output_embeddings().out_features
    scaled.config.unpadded_vocab_size = rows
    check_output_layer(scaled, "student_model")
    scaled.config.unpadded_vocab_size = rows - 3
    with pytest.raises(ConfigError, match=rf"unpadded_vocab_size={rows - 3} below the output layer's {rows} rows"):
        check_output_layer(scaled, "student_model")


def test_the_head_scale_keys_cover_transformers_causal_lm_heads():
    """Every config key that a transformers causal-LM forward uses to scale or cap its logits (or the hidden states
    right before the head) is one check_output_layer refuses: a scan of the installed modeling files."""
    import re

    import transformers

    from rlt.rewards.logprobs import HEAD_SCALES

    root = Path(transformers.__file__).parent / "models"
    # "logits = logits / self.config.K", "hidden_states = outputs[0] / self.config.text_config.K",
    # "self.lm_head(...) * self.model.K", ...
    pattern = re.compile(r"(?:logits|hidden_states|outputs\[0\]|last_hidden_state|\))\s*(?:[*/]=?|=\s*\w+\s*[*/])\s*"
                         r"self\.(?:config\.(?:text_config\.|decoder\.)?|model\.)?(\w+)")
    found = {}
    for f in root.glob("*/modeling_*.py"):
        text = f.read_text()
        for m in re.finditer(r"logits = self\.lm_head\(", text):
            window = text[max(0, m.start() - 400):m.end() + 500]
            for key in pattern.findall(window):
                found.setdefault(key, f.parent.name)
    assert found, "the scan found no scaled head at all: the pattern no longer matches transformers' code"
    assert {"final_logit_softcapping", "logit_scale", "logits_scaling"} <= set(found)
    missed = {k: where for k, where in found.items() if k not in HEAD_SCALES}
    assert not missed, f"config keys that scale logits and are not refused by check_output_layer: {missed}"


# ------------------------------------------------------------------------------------------ merged weights
def test_full_named_weights_equal_merge_and_unload(tiny_path):
    """The iterator both weight syncs (and the merged save) use: checkpoint names, merged values, no adapters."""
    model = peft_tiny(tiny_path, ["all-linear"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expect = merged_reference(model)
    got = dict(full_named_weights(model))
    assert list(got) == list(expect)  # the checkpoint's names, in its order
    assert not [k for k in got if "lora_" in k or "base_layer" in k or k.startswith("base_model")]
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    base = safetensors_dir(tiny_path)
    assert not torch.equal(got["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    # the live weights are left exactly as they were (merge + unmerge alone would round them)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert full_weight_metadata(model) == [(k, str(v.dtype)[6:], list(v.shape)) for k, v in got.items()]
    # without PEFT: the parameters themselves
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    got = dict(full_named_weights(plain))
    assert list(got) == list(plain.state_dict())
    assert all(t.data_ptr() == p.data_ptr() for t, p in zip(got.values(), plain.parameters()))


class FakeNcclClient:
    """Records what trl's VLLMClient would broadcast."""

    def __init__(self):
        self.batched, self.single, self.updates, self.resets = [], [], 0, 0

    def update_named_params(self, metadata, named_params):
        self.metadata = metadata
        self.batched = [(n, t.clone()) for n, t in named_params]

    def update_named_param(self, name, tensor):
        self.single.append((name, tensor.clone()))

    def weight_update(self):
        import contextlib

        self.updates += 1
        return contextlib.nullcontext()

    def reset_prefix_cache(self):
        self.resets += 1


def test_nccl_sync_streams_merged_weights(tiny_path):
    """The NCCL path on CPU with recording clients: one server gets trl's batched call, several get each tensor."""
    from rlt.generation.weight_sync import NcclWeightSync

    model = peft_tiny(tiny_path)
    expect = merged_reference(model)
    def pool(*urls):   # the prefix cache is reset through the pool (checked, under its watchdog), once per server
        resets = []
        return SimpleNamespace(urls=list(urls), resets=resets, reset_prefix_cache=resets.append,
                               health_interval=0.05, health_failures=2, request_timeout=60, alive=lambda i: True)

    def no_failure(message):
        raise AssertionError(f"the sync watchdog fired on healthy servers: {message}")

    one = NcclWeightSync(pool("http://a"), group_port=0, on_fail=no_failure)
    one.clients = [FakeNcclClient()]
    one(fake_trainer(model))
    c = one.clients[0]
    assert [n for n, _ in c.batched] == list(expect) and [m[0] for m in c.metadata] == list(expect)
    assert all(torch.equal(t, expect[n]) for n, t in c.batched)
    assert one.pool.resets == [0] and c.resets == 0   # not trl's unchecked reset
    two = NcclWeightSync(pool("http://a", "http://b"), group_port=0, on_fail=no_failure)
    two.clients = [FakeNcclClient(), FakeNcclClient()]
    two(fake_trainer(model))
    assert two.pool.resets == [0, 1]
    for c in two.clients:
        assert c.updates == 1 and c.resets == 0 and [n for n, _ in c.single] == list(expect)
        assert all(torch.equal(t, expect[n]) for n, t in c.single)


class FakePool:
    def __init__(self):
        self.loaded = []

    def reload_weights(self, path):
        self.loaded.append(path)


def test_filesystem_sync_writes_merged_weights(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlt.generation.weight_sync import FilesystemWeightSync

    model = peft_tiny(tiny_path, ["all-linear"])
    expect = merged_reference(model)
    pool = FakePool()
    sync = FilesystemWeightSync(pool, str(tmp_path))
    try:
        sync(fake_trainer(model, step=3))
        (path,) = pool.loaded
        written = safetensors_dir(path)
        assert sorted(written) == sorted(expect) and all(torch.equal(written[k], expect[k]) for k in expect)
        assert not Path(path, "adapter_config.json").exists()
        loaded = AutoModelForCausalLM.from_pretrained(path)  # what vLLM's reload reads: a plain checkpoint
        assert all(torch.equal(v, expect[k]) for k, v in loaded.state_dict().items())
    finally:
        sync.close()


# ------------------------------------------------------------------------------------------ RL: the reward's teacher
def capture_teacher_logprobs(monkeypatch):
    """Spy on the reward's log-prob calls: the second of each round is the teacher's."""
    import rlt.rewards.teacher_reward as tr

    calls = []
    real = tr.token_logprobs

    def spy(model, sequences, positions, temperature, **kw):
        out = real(model, sequences, positions, temperature, **kw)
        calls.append((model, sequences, positions, temperature, out))
        return out

    monkeypatch.setattr(tr, "token_logprobs", spy)
    return calls


def forward_logprobs(model, ids, positions, temperature):
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].float() / temperature, -1)
    return torch.stack([lp[p - 1, ids[p]] for p in positions])


def test_rl_reward_scores_with_the_adapted_teacher(tmp_path, tokenizer, monkeypatch):
    from peft import PeftModel

    from rlt.data.formats import resolve_format
    from rlt.data.text import teacher_prompt
    from rlt.trainers.grpo_run import build_teacher_grpo_trainer

    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "logging_prob=0", "save_completions_probability=0",
                                       "use_peft=true", "lora_dropout=0"])
    trainer, _ = build_teacher_grpo_trainer(build_train_settings(cfg, num_processes=1))
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.ref_model is None and not trainer.args.sync_ref_model
    assert adapted_modules(model) == DEFAULT_TARGETS
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    randomize_lora_b(model)
    model.eval()

    fmt = resolve_format("bespoke_stratos")
    q, s = "What is 2+3?", "5"
    batch = dict(prompts=[teacher_prompt(tokenizer, q, s, fmt)], completions=["Add 2 and 3.\n\n<|end_of_explanation|>"],
                 question=[q], solution=[s], student_system=[None])
    calls = capture_teacher_logprobs(monkeypatch)

    def teacher_call():
        calls.clear()
        trainer.teacher_reward_fn(**batch)
        (_, [ids], [pos], temp, [lp]) = calls[1]
        assert len(pos) > 3
        return ids, pos, temp, lp

    ids, pos, temp, lp = teacher_call()
    adapted = forward_logprobs(model, ids, pos, temp)
    with model.disable_adapter():
        base = forward_logprobs(model, ids, pos, temp)
    assert (adapted - base).abs().max() > 1e-2
    assert torch.allclose(lp, adapted, atol=1e-4), (lp - adapted).abs().max()

    trainer.use_reference_teacher_model = True  # trl's PEFT reference: the adapters disabled
    _, _, _, ref_lp = teacher_call()
    assert torch.allclose(ref_lp, base, atol=1e-4), (ref_lp - base).abs().max()
    assert torch.allclose(forward_logprobs(model, ids, pos, temp), adapted)  # the adapters are on again


# ------------------------------------------------------------------------------------------ training + saving
def check_lora_output(out: Path, base_path: str, targets: set[str]):
    """An adapter in out/ whose B matrices moved from zero; out/merged a full model equal to base + adapter,
    identical to the base outside the adapted modules (the base was frozen)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    adapter = safetensors_dir(out)
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)  # trained (B starts at zero)
    merged_dir = out / "merged"
    assert (merged_dir / "config.json").exists() and (merged_dir / "tokenizer.json").exists()
    merged, base = safetensors_dir(merged_dir), safetensors_dir(base_path)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(re.search(r"\.(%s)\.weight$" % "|".join(targets), k) for k in changed), changed
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, peft_model(x).logits, atol=1e-5)
    with pytest.raises(ConfigError, match=f"holds a LoRA adapter, not a full model: use {merged_dir}"):
        resolve_model_path(str(out))  # what rlt.distill / rlt.eval / rlt.score and training runs resolve


def test_sft_with_lora_trains_the_adapter_and_saves_merged(tmp_path, tiny_path):
    from rlt.trainers.sft import run_sft

    out = tmp_path / "sft"
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}", "use_peft=true", "save_merged_model=true", "max_steps=2",
                                       "learning_rate=1e-2", "lora_target_modules=[q_proj,k_proj,down_proj]"])
    run_sft(build_train_settings(cfg, num_processes=1))
    check_lora_output(out, tiny_path, {"q_proj", "k_proj", "down_proj"})


@pytest.mark.slow
def test_rl_with_lora_in_process_saves_adapter_and_merged(tmp_path, tiny_path):
    from rlt.trainers.grpo_run import run_teacher_grpo

    out = tmp_path / "rl"
    cfg = compose("tiny_teacher_rlt", [f"output_dir={out}", "use_peft=true", "save_merged_model=true", "max_steps=1",
                                       "save_strategy=no", "learning_rate=1e-2", "logging_prob=0",
                                       "save_completions_probability=0"])
    run_teacher_grpo(build_train_settings(cfg, num_processes=1))
    check_lora_output(out, tiny_path, DEFAULT_TARGETS)


def test_adapter_directory_without_merged_model_is_refused(tmp_path, tiny_path):
    peft_tiny(tiny_path).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a LoRA adapter.*save_merged_model=true"):
        resolve_model_path(str(tmp_path))


# ------------------------------------------------------------------------------------------ ZeRO-3 launches
@pytest.mark.slow
def test_launch_sft_and_rl_with_lora_under_zero3(tmp_path, tiny_path):
    sft = tmp_path / "sft"
    run_cmd(["./launch.sh", "2", "cfgs/run_cfg/tiny_teacher_sft.yaml", f"output_dir={sft}", "use_peft=true",
             "save_merged_model=true", "learning_rate=1e-2", "lora_target_modules=[all-linear]"])
    check_lora_output(sft, tiny_path, ALL_LINEAR)
    # RL from the merged SFT model (a new adapter), the reference = the adapters disabled
    rl = tmp_path / "rl"
    proc = run_cmd(["./launch.sh", "2", "cfgs/run_cfg/tiny_teacher_rlt.yaml", f"output_dir={rl}", "use_peft=true",
                    f"model_name_or_path={sft / 'merged'}", "save_merged_model=true", "max_steps=2",
                    "learning_rate=1e-2", "use_reference_teacher_model=true", "save_strategy=no"])
    assert len(re.findall(r"'teacher_reward/r_ss'", proc.stdout + proc.stderr)) == 2
    check_lora_output(rl, str(sft / "merged"), DEFAULT_TARGETS)


# ------------------------------------------------------------------------------------------ vLLM server
@pytest.fixture
def lora_server(tmp_path, tiny_path):
    with running_server(tiny_path, tmp_path / "server.log") as spec:
        yield spec


@pytest.mark.slow
def test_lora_rl_sync_makes_the_server_serve_the_merged_policy(tmp_path, lora_server):
    from rlt.trainers.grpo_run import build_teacher_grpo_trainer

    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path / 'o'}", "max_steps=1", "learning_rate=0.05",
                                       "save_strategy=no", "vllm_host=127.0.0.1", f"vllm_port={lora_server.port}",
                                       "logging_prob=0", "save_completions_probability=0", "use_peft=true",
                                       "lora_target_modules=[all-linear]"])
    trainer, tok = build_teacher_grpo_trainer(build_train_settings(cfg, num_processes=1))
    pool = trainer.rollout_pool
    ids = tok(trainer.train_dataset[0]["prompt"] + "Step 1: 5 * 5 = 25.", add_special_tokens=False)["input_ids"]

    def policy_logprobs():
        trainer.model.eval()
        return forward_logprobs(trainer.model, ids, list(range(1, len(ids))), 1.0)

    before_server, before_policy = torch.tensor(pool.prompt_logprobs(ids)), policy_logprobs()
    assert torch.allclose(before_server, before_policy, atol=2e-3)  # B = 0: the adapted policy is the base
    try:
        trainer.train()
        trainer.weight_sync(trainer)  # the sync the next generation would run
        after_server, after_policy = torch.tensor(pool.prompt_logprobs(ids)), policy_logprobs()
        assert (after_policy - before_policy).abs().max() > 0.05  # the LoRA step moved the policy
        assert (after_server - before_server).abs().max() > 0.05  # the served outputs changed
        assert torch.allclose(after_server, after_policy, atol=2e-3)  # ... to the merged policy
    finally:
        trainer.weight_sync.close()
