"""Teacher GRPO on trl's GRPOTrainer, rewarded by a frozen student.

Only small hooks are overridden:
  * the reward function (a method handed to trl as ``reward_funcs``) runs the
    teacher reward under no_grad with the teacher in eval mode and logs every
    reward component;
  * ``_generate_single_turn`` and ``training_step`` are wrapped to time
    generation, reward scoring and the policy update.
Checkpoints also hold the reference model once ``sync_ref_model`` has mixed the
policy into it (trl's do not), and a resume restores it. Everything else
(advantages, loss, KL to the reference, reference syncing, checkpointing) is
trl's, configured to the reference's GRPO in cfgs/trainer_cfg/grpo.yaml.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOTrainer

from rlt.rewards.teacher_reward import RewardInput, TeacherReward
from rlt.trainers.frozen import (REFERENCE_FILE, deepspeed_stage, load_frozen_weights, offload_frozen,
                                 prepare_frozen, save_frozen_weights)

logger = logging.getLogger(__name__)


class TeacherGRPOTrainer(GRPOTrainer):
    """GRPO for an RLT teacher.

    student_model: the frozen student the reward uses (already inside ``teacher_reward``);
        it is placed (sharded / offloaded) here, never trained.
    teacher_reward: a :class:`TeacherReward` built with that student and the tokenizer.
    use_reference_teacher_model: score teacher log-probs with the reference model
        instead of the current policy.
    offload_untrained_models: keep the student's and the reference's parameters in
        CPU memory between uses (DeepSpeed ZeRO-3).
    logging_prob: probability of writing each scored student text to
        ``output_dir/teacher_chats/log.txt`` (main process).
    save_completions_probability: probability of saving each completion with its
        reward components to ``output_dir/stored_completions/``.
    rollout_pool: a :class:`~rlt.generation.client.VLLMServerPool` to generate with
        (None: trl's in-process generation).
    weight_sync: called with the trainer to push the policy to the servers before a
        generation whenever the optimizer has stepped since the last push.
    peft_config: train LoRA adapters (trl's GRPOTrainer wraps the model); the reward then scores with the
        adapted policy, or with ``use_reference_teacher_model`` the base model (adapters disabled).
    """

    def __init__(self, *, model, student_model, teacher_reward: TeacherReward, args, train_dataset,
                 processing_class, use_reference_teacher_model: bool = False, offload_untrained_models: bool = False,
                 logging_prob: float = 0.0, save_completions_probability: float = 0.0, callbacks=None,
                 rollout_pool=None, weight_sync=None, peft_config=None):
        if (rollout_pool is None) != (weight_sync is None):
            raise ValueError("server rollouts need both a rollout_pool and a weight_sync")
        self.rollout_pool = rollout_pool
        self.weight_sync = weight_sync
        self._synced_step = 0  # the servers start from the checkpoint the policy starts from
        if student_model is None or teacher_reward.student is not student_model:
            raise ValueError("TeacherGRPOTrainer needs the student model that its teacher reward scores with")
        self.teacher_reward = teacher_reward
        self.use_reference_teacher_model = use_reference_teacher_model
        self.logging_prob = float(logging_prob or 0.0)
        self.save_completions_probability = float(save_completions_probability or 0.0)
        self._timing = defaultdict(float)
        super().__init__(model=model, reward_funcs=[self.teacher_reward_fn], args=args, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config)
        self._rng = random.Random(args.seed + 1000 * self.accelerator.process_index)
        self._student_engine = prepare_frozen(student_model, self.accelerator, offload_untrained_models)
        if offload_untrained_models and self.ref_model is not None and deepspeed_stage(self.accelerator) == 3:
            # trl built and placed the reference (its engine, its forward patches); only its shards move
            offload_frozen(getattr(self.ref_model, "module", self.ref_model), "reference model")

    # ------------------------------------------------------------------ reference in checkpoints
    def _reference_syncs(self, step: int) -> int:
        """How many times trl's SyncRefModelCallback has mixed the policy into the reference by ``step``."""
        args = self.args
        if self.ref_model is None or not args.sync_ref_model or not args.ref_model_sync_steps:
            return 0
        return step // args.ref_model_sync_steps

    def _save_checkpoint(self, model, trial):
        """trl's checkpoint, plus the reference model (:data:`REFERENCE_FILE`) once a sync has changed it; written
        before the Trainer's files, so a checkpoint with ``trainer_state.json`` (written last) has it whole."""
        if self._reference_syncs(self.state.global_step) and not self.args.save_only_model:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            t0 = time.perf_counter()
            path = os.path.join(folder, REFERENCE_FILE)
            save_frozen_weights(getattr(self.ref_model, "module", self.ref_model), path, self.args.should_save)
            logger.info("reference model saved to %s in %.1fs", path, time.perf_counter() - t0)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        ckpt = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if ckpt:   # True without a checkpoint: transformers' train refuses it
            self._restore_reference(ckpt)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_reference(self, checkpoint: str) -> None:
        """The reference model of ``checkpoint``, when it holds one; a warning when a sync had changed the
        reference but the checkpoint predates rlt saving it (the reference then restarts from the initial model)."""
        if self.ref_model is None:
            return
        path = os.path.join(checkpoint, REFERENCE_FILE)
        from rlt.runs import checkpoint_step

        step = checkpoint_step(checkpoint)
        if os.path.exists(path):
            load_frozen_weights(getattr(self.ref_model, "module", self.ref_model), path)
            logger.info("reference model restored from %s (step %d)", path, step)
        elif self._reference_syncs(step):
            logger.warning(
                "resuming at step %d: %s holds no reference model (saved before rlt checkpointed it, or by a run "
                "without sync_ref_model), so the reference restarts from model_name_or_path, while this run's "
                "settings would have mixed the policy into it %d time(s) "
                "(sync_ref_model, every %d steps); the KL term differs from an uninterrupted run's until later syncs "
                "shrink the difference (x%.2g each)", step, checkpoint, self._reference_syncs(step),
                self.args.ref_model_sync_steps, 1 - self.args.ref_model_mixup_alpha)

    # ------------------------------------------------------------------ prompts
    def _tokenize_prompts(self, prompts: list):
        """Rendered prompt texts (what rlt gives trl) already hold any BOS their chat template writes, so they are
        tokenized without special tokens, as SFT, the reward and distillation tokenize them (trl would add a
        second BOS with tokenizers that add one, e.g. Llama 3). Conversational prompts: trl's own path."""
        if prompts and isinstance(prompts[0], str):
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}
        return super()._tokenize_prompts(prompts)

    # ------------------------------------------------------------------ models
    def teacher_model(self):
        """The model whose log-probs the reward uses: the policy, or the reference.

        With PEFT it is the policy's causal LM with its LoRA layers in place: the adapted policy, or, inside
        :meth:`scoring_teacher` with ``use_reference_teacher_model``, the base model (adapters disabled, trl's
        reference under PEFT).
        """
        from rlt.models import causal_lm

        m = self.ref_model if self.use_reference_teacher_model and self.ref_model is not None else self.model
        return causal_lm(getattr(m, "module", m))

    @contextlib.contextmanager
    def scoring_teacher(self):
        """Context yielding the model the reward scores teacher log-probs with (see :meth:`teacher_model`)."""
        from rlt.models import is_peft

        policy = self.accelerator.unwrap_model(self.model)
        if self.use_reference_teacher_model and self.ref_model is None and is_peft(policy):
            from trl.trainer.utils import use_adapter

            # trl's reference under PEFT: a "ref" copy of a pretrained adapter, else the adapters disabled
            with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
                yield self.teacher_model()
        else:
            yield self.teacher_model()

    # ------------------------------------------------------------------ reward
    def teacher_reward_fn(self, prompts, completions, question, solution, student_system, **kwargs):
        """trl reward function: one float per completion (trl calls it in train mode with grad on)."""
        t0 = time.perf_counter()
        items = [RewardInput(p, c, q, s, sy) for p, c, q, s, sy in zip(prompts, completions, question, solution,
                                                                        student_system)]
        with torch.no_grad(), self.scoring_teacher() as teacher:
            result = self.teacher_reward(teacher, items)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            metrics = result.metrics()
            metrics["no_end_tag_frac"] = metrics.pop("no_end_tag")  # the batch mean of a 0/1 component
            for name, value in metrics.items():
                log_metric(f"teacher_reward/{name}", value)
        self._record(items, result)
        self._timing["reward"] += time.perf_counter() - t0
        return result.rewards.tolist()

    def _record(self, items, result):
        out = Path(self.args.output_dir)
        step = self.state.global_step + 1  # the optimizer step these completions train (as the logs number it)
        if self.logging_prob > 0 and self.accelerator.is_main_process:
            picked = [i for i in range(len(items)) if self._rng.random() < self.logging_prob]
            if picked:
                (out / "teacher_chats").mkdir(parents=True, exist_ok=True)
                with open(out / "teacher_chats" / "log.txt", "a") as f:
                    for i in picked:
                        f.write(f"===== step {step} | reward {result.rewards[i]:.4f}\n--- teacher prompt\n"
                                f"{items[i].prompt}\n--- completion\n{items[i].completion}\n")
        if self.save_completions_probability > 0:
            picked = [i for i in range(len(items)) if self._rng.random() < self.save_completions_probability]
            if picked:
                d = out / "stored_completions"
                d.mkdir(parents=True, exist_ok=True)
                with open(d / f"step{step:06d}_rank{self.accelerator.process_index}.jsonl", "a") as f:
                    for i in picked:
                        comps = {k: (None if v[i] != v[i] else float(v[i])) for k, v in result.components.items()}
                        # question/solution/system: the row can be piped into `python -m rlt.score`
                        f.write(json.dumps({"step": step, "question": items[i].question, "solution": items[i].solution,
                                            "system": items[i].system, "prompt": items[i].prompt,
                                            "completion": items[i].completion,
                                            "reward": float(result.rewards[i]), "reward_components": comps}) + "\n")

    # ------------------------------------------------------------------ timing
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self.rollout_pool is None:
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            finally:
                self._timing["generation"] += time.perf_counter() - t0
        step = self.state.global_step  # optimizer steps done; these completions train step + 1
        if step != self._synced_step:
            t0 = time.perf_counter()
            self.weight_sync(self)
            self._synced_step = step
            self._timing["weight_sync"] += time.perf_counter() - t0
            logger.info("step %d: policy weights after step %d synced to the vLLM server(s) in %.2fs", step + 1, step,
                        time.perf_counter() - t0)
        t0 = time.perf_counter()
        completion_ids = self.rollout_pool.generate(
            prompt_ids, max_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            extra=self.args.generation_kwargs)
        spent = time.perf_counter() - t0
        self._timing["generation"] += spent
        logger.info("step %d: %d completions (%d tokens) generated by the vLLM server(s) in %.2fs", step + 1,
                    len(completion_ids), sum(map(len, completion_ids)), spent)
        return completion_ids, None

    def training_step(self, *args, **kwargs):
        t0 = time.perf_counter()
        before = sum(self._timing.values())
        loss = super().training_step(*args, **kwargs)
        spent = time.perf_counter() - t0
        self._timing["update"] += spent - (sum(self._timing.values()) - before)
        return loss

    def log(self, logs: dict, *args, **kwargs):
        if self.model.training and self._timing:
            for k, v in self._timing.items():
                logs[f"time/{k}"] = round(v, 4)
            self._timing.clear()
        return super().log(logs, *args, **kwargs)
