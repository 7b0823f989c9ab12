"""The policy stage's loop: sample (pass 1), reward, advantages, update (pass 2), log, checkpoint.

One iteration: B trajectories are sampled without grad under the current θ; the frozen reward model
scores the final images as a set; the rewards become advantages; PPO, TRPO, REINFORCE or SAC updates θ.
A non-finite reward, log-prob or gradient skips the update and keeps the last good weights;
`rl.max_nonfinite` such iterations in a row stop the run with an error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from config import Config, check_finetune, config_to_dict
from reward.artifact import RewardModel, RewardOutput, load_artifact
from reward.build import artifact_path
from rl.advantages import (Critic, PerPromptStatTracker, clip_advantages, critic_values, fit_critic, gae,
                           standardize, terminal_rewards)
from rl import distributed
from rl.build import build_policy, build_reward_artifact
from rl.ppo import ppo_update, reinforce_update
from rl.sac import SoftActorCritic, sac_update
from rl.trpo import PenaltyState, kl_penalty_update, trpo_update
from rl.update import Update, UpdateBatch, UpdateStats
from basics import CraterdiffError, latest_checkpoint
from utils import (RunLogger, atomic_checkpoint, image_grid, load_optimizer_state, load_state, peak_mem_mb,
                   prune_checkpoints, resolve_device, rng_state, save_png, save_state, seed_everything, set_rng_state,
                   setup_precision)


UPDATES: dict[str, Update] = {"ppo": ppo_update, "reinforce": reinforce_update, "sac": sac_update,
                              "trpo": trpo_update, "trpo_penalty": kl_penalty_update}
"""Each algorithm's update by `rl.algorithm`; TRPO's penalty mode (`rl.trpo.mode: penalty`) is `trpo_penalty`."""


@dataclass
class RLState:
    """Everything a checkpoint holds besides θ."""
    iteration: int = 0
    nonfinite_in_row: int = 0
    penalty: PenaltyState = field(default_factory=lambda: PenaltyState(beta=1.0))


class Finetuner:
    """Wires the policy, reward model, optimizer and advantage estimator of a config together."""

    def __init__(self, cfg: Config, run_dir: Path, *, device: torch.device | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        r = cfg.rl
        self.world, self.rank = distributed.world_size(), distributed.rank()
        check_finetune(cfg, self.world)
        self.device = device or distributed.process_device() or resolve_device(cfg.device)
        setup_precision(cfg.precision, cfg.tf32, self.device)  # CUDA-only settings fail here, before any work
        # the same seed everywhere (identical LoRA initialisation); each process then samples its own noise
        self.generator = seed_everything(cfg.seed)
        if self.rank:
            self.generator.manual_seed(cfg.seed + 1_000_003 * self.rank)
        self.reward = self._reward_model()
        self.policy = build_policy(cfg, self.device)
        self.sac = None
        if r.algorithm == "sac":
            if r.sac.learn_noise_scale:
                self.policy.enable_noise_scale(max_log_scale=r.sac.max_log_noise_scale)
            self.sac = SoftActorCritic(self.policy, r.sac, r.critic)
        self.optimizer = self._optimizer()
        # dynamic loss scaling for fp16 (a pass-through otherwise); its scale is checkpointed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.critic = self.critic_opt = None
        if r.advantages.gae:
            self.critic = Critic(self.policy.image_shape[0], width=r.critic.width,
                                 num_train_timesteps=self.policy.scheduler.config.num_train_timesteps).to(self.device)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=r.critic.lr)
        self.tracker = PerPromptStatTracker(history=r.advantages.history)
        self.state = RLState(penalty=PenaltyState(beta=r.trpo.penalty_beta))

    # --- pieces -----------------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer | None:
        """AdamW on θ at rl.lr (SAC's ζ, if learned, in its own group at rl.sac.noise_lr); None for TRPO,
        which steps by its natural gradient."""
        r = self.cfg.rl
        if r.algorithm == "trpo" and r.trpo.mode == "trpo":
            return None
        zeta = self.policy.log_noise_scale
        groups = [{"params": [p for p in self.policy.trainable_parameters() if p is not zeta]}]
        if zeta is not None and zeta.requires_grad:
            groups.append({"params": [zeta], "lr": r.sac.noise_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=r.lr, weight_decay=r.weight_decay)

    def _reward_model(self) -> RewardModel:
        path = artifact_path(self.cfg, self.run_dir)
        if not (path / "reward.yaml").is_file() and distributed.is_main():
            tqdm.write(f"no reward artifact at {path}: building it first")
            build_reward_artifact(self.cfg, path)
        distributed.barrier()
        # The config's weights, logged components, OT matching rule, size detector and bandwidth scale and coverage softness, so --set
        # reward.weights.X=... takes effect on an existing artifact; only the weighted and logged components are computed.
        return load_artifact(path, expect_extractor=self.cfg.reward.features.name, device=self.device,
                             weights=vars(self.cfg.reward.weights), ot_match=self.cfg.reward.ot_match,
                             log=self.cfg.reward.log, size_bandwidth_scale=self.cfg.reward.size_bandwidth_scale,
                             coverage_softness=self.cfg.reward.coverage_softness,
                             size_detector=self.cfg.reward.size_detector)

    def advantages(self, rewards: torch.Tensor, traj, prompts: list[str] | None = None) -> torch.Tensor:
        """(B,) rewards -> (B,) advantages, or (T, B) with GAE; `prompts`: each reward's prompt."""
        a, c = self.cfg.rl.advantages, self.cfg.rl.critic
        if a.normalize == "batch":
            r = standardize(rewards)
        elif a.normalize == "per_prompt":
            r = self.tracker(rewards, prompts or [""] * rewards.shape[0])
        else:
            r = rewards.double()
        if a.gae:
            values = critic_values(self.critic, traj.states, traj.timesteps)
            adv = gae(terminal_rewards(r, traj.num_steps), values, gamma=c.gamma, lam=c.lam)
            fit_critic(self.critic, self.critic_opt, traj.states, traj.timesteps, (adv + values[:-1]).float())
            return clip_advantages(standardize(adv), a.clip)
        return clip_advantages(r, a.clip)

    def update(self, traj, adv: torch.Tensor) -> UpdateStats:
        """θ's update by the configured algorithm (UPDATES), handed that algorithm's persistent state."""
        r = self.cfg.rl
        name = "trpo_penalty" if r.algorithm == "trpo" and r.trpo.mode == "penalty" else r.algorithm
        state = {"sac": self.sac, "trpo_penalty": self.state.penalty}.get(name)
        return UPDATES[name](UpdateBatch(self.policy, self.optimizer, traj, adv, r, self.generator, self.scaler), state)

    # --- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every process hands its RNG state to the main one, which writes the checkpoint; all wait for it."""
        ckpt_dir = self.run_dir / "checkpoints"
        rngs = distributed.gather_objects(rng_state(self.generator))
        if distributed.is_main():
            self._write_checkpoint(ckpt_dir, rngs)
        distributed.barrier()
        return ckpt_dir / f"step_{self.state.iteration}"

    def _write_checkpoint(self, ckpt_dir: Path, rngs: list[dict]) -> None:
        with atomic_checkpoint(ckpt_dir, self.state.iteration) as tmp:
            self.policy.save(tmp, pipeline=self.policy.checkpoint_pipeline)
            save_file({k: v.contiguous().cpu() for k, v in self.policy.trainable_state().items()},
                      tmp / "policy.safetensors")
            save_state({
                "iteration": self.state.iteration, "nonfinite_in_row": self.state.nonfinite_in_row,
                "penalty_beta": self.state.penalty.beta,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "critic": self.critic.state_dict() if self.critic else None,
                "critic_optimizer": self.critic_opt.state_dict() if self.critic_opt else None,
                "sac": self.sac.checkpoint_state() if self.sac else None,
                "tracker": self.tracker.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs[0],
                **({"rng_processes": rngs} if len(rngs) > 1 else {}),
            }, tmp / "training_state.pt")
        prune_checkpoints(ckpt_dir, self.cfg.rl.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        state = load_state(path / "training_state.pt")
        try:
            theta = load_file(path / "policy.safetensors")
        except Exception as e:  # truncated or foreign file
            raise CraterdiffError(f"cannot read '{path / 'policy.safetensors'}' ({type(e).__name__}); "
                                  f"delete that checkpoint to resume from an earlier one") from None
        self.policy.load_trainable_state({k: v.to(self.device) for k, v in theta.items()})
        if self.optimizer and state["optimizer"]:
            load_optimizer_state(self.optimizer, state["optimizer"])
        if self.critic and state["critic"]:
            self.critic.load_state_dict(state["critic"])
            load_optimizer_state(self.critic_opt, state["critic_optimizer"])
        if self.sac:
            self.sac.load_checkpoint_state(state["sac"])
        self.tracker.load_state_dict(state["tracker"])
        if state.get("scaler"):  # empty unless the run is fp16
            self.scaler.load_state_dict(state["scaler"])
        self.state = RLState(iteration=int(state["iteration"]), nonfinite_in_row=int(state["nonfinite_in_row"]),
                             penalty=PenaltyState(beta=float(state["penalty_beta"])))
        saved = state.get("rng_processes", [state["rng"]])
        if len(saved) != self.world:
            raise CraterdiffError(f"checkpoint '{path}' was written by {len(saved)} process(es); resume it with "
                                  f"{len(saved)} (accelerate launch --num_processes {len(saved)})")
        set_rng_state(saved[self.rank], self.generator)

    # --- one iteration ----------------------------------------------------------------------------

    def iteration(self) -> tuple[dict[str, float], torch.Tensor]:
        """Sample, reward, update once; returns the log row and the batch's images."""
        r = self.cfg.rl
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        traj = self.policy.sample(r.batch_size // self.world, generator=self.generator, chunk=r.sample_batch)
        t1 = time.perf_counter()
        out, prompts = self.score(traj)
        t2 = time.perf_counter()
        row: dict[str, float] = {}
        weighted = sum(self.reward.weights.get(c, 0.0) * v for c, v in out.components.items())
        row["reward_mean"], row["reward_std"] = float(weighted.mean()), float(weighted.std())
        for c, v in out.components.items():
            row[f"reward_{c}"] = float(v.mean())
        for c, v in out.values.items():
            row[f"value_{c}"] = v
        finite = distributed.all_true(bool(torch.isfinite(out.rewards).all() and torch.isfinite(traj.logp).all()))
        stats = UpdateStats(nonfinite=True)
        if finite:
            snapshot = self.policy.trainable_state()
            own = slice(self.rank * traj.batch_size, (self.rank + 1) * traj.batch_size)
            stats = self.update(traj, self.advantages(out.rewards, traj, prompts)[..., own])
            if not all(torch.isfinite(p).all() for p in self.policy.trainable_parameters()):
                stats.nonfinite = True
            if stats.nonfinite:
                self.policy.load_trainable_state(snapshot)
        t3 = time.perf_counter()
        self.state.nonfinite_in_row = self.state.nonfinite_in_row + 1 if stats.nonfinite else 0
        row.update({k: v for k, v in stats.as_dict().items() if k != "nonfinite"})
        row["skipped"] = float(stats.nonfinite)
        row.update(time_sample_s=t1 - t0, time_reward_s=t2 - t1, time_update_s=t3 - t2, peak_mem_mb=peak_mem_mb(self.device))
        return row, traj.images

    def score(self, traj) -> tuple[RewardOutput, list[str] | None]:
        """The reward of the whole set, and each sample's prompt text (None if unconditional): every
        process's features (crater sizes, realism logits and prompts where needed) are gathered, the main process
        scores the set and shares the result (with one process, gathering and sharing are the identity)."""
        need = self.reward.computed
        feats = distributed.gather(self.reward.features(traj.images))
        sizes = distributed.gather(self.reward.sizes(traj.images)) if "size" in need else None
        logits = distributed.gather(self.reward.realism_logits(traj.images)) if "realism" in need else None
        ids = distributed.gather(traj.prompt_ids) if traj.prompt_ids is not None else None
        out = (self.reward.score(feats, sizes=sizes, realism=logits, generator=self.generator)
               if distributed.is_main() else None)
        out = distributed.broadcast_object(out)
        return out, ([self.policy.prompts[i] for i in ids.tolist()] if ids is not None else None)

    def run(self, *, resume: bool, stop_at: int | None = None) -> Path | None:
        """Train for rl.iterations; `stop_at` ends this call after that iteration (checkpointed)."""
        r = self.cfg.rl
        if resume:
            path = latest_checkpoint(self.run_dir / "checkpoints")
            if distributed.is_main():
                tqdm.write(f"resuming from {path}")
            self.load_checkpoint(path)
            if self.state.iteration >= r.iterations:
                tqdm.write(f"{self.run_dir} already finished its {r.iterations} iterations; raise rl.iterations "
                           f"(--set rl.iterations=N) to continue it")
        main = distributed.is_main()  # only the main process writes logs, samples and checkpoints
        if main and self.world > 1:
            tqdm.write(f"{self.world} processes on {self.device.type}, {r.batch_size // self.world} trajectories each")
        log = (RunLogger(self.run_dir, self.cfg.log, group="policy", hparams=config_to_dict(self.cfg),
                         resume_step=self.state.iteration if resume else None) if main else None)
        bar = tqdm(total=r.iterations, initial=self.state.iteration, desc=f"finetune ({r.algorithm})",
                   dynamic_ncols=True, disable=not main)
        try:
            while self.state.iteration < r.iterations:
                row, images = self.iteration()
                self.state.iteration += 1
                it = self.state.iteration
                bar.update(1)
                if main:
                    log.log(it, row)
                    tqdm.write(summary_line(it, r.iterations, row))
                if self.state.nonfinite_in_row >= r.max_nonfinite:
                    raise CraterdiffError(f"{self.state.nonfinite_in_row} iterations in a row had non-finite rewards, "
                                          f"log-probs or gradients; the last good weights are in the latest checkpoint. "
                                          f"Lower rl.lr or raise sampler.sigma_floor")
                if main and (it % r.sample_every == 0 or it == r.iterations):
                    grid = image_grid(images[:64], scale=2)
                    (self.run_dir / "samples").mkdir(exist_ok=True)
                    save_png(grid, self.run_dir / "samples" / f"iter_{it}.png")
                    log.add_image("samples", grid, it)
                if it % r.checkpoint_every == 0 or it == r.iterations or it == stop_at:
                    self.save_checkpoint()
                if it == stop_at:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        if self.state.iteration < r.iterations:
            return None
        if main:
            self.policy.save(self.run_dir)
        distributed.barrier()
        return self.run_dir / "model"


def summary_line(it: int, total: int, row: dict[str, float]) -> str:
    parts = [f"iter {it}/{total}", f"reward {row['reward_mean']:+.4f}"]
    for c in ("ot", "mmd", "realism"):
        if f"value_{c}" in row:
            parts.append(f"{c} {row[f'value_{c}']:.4g}")
    parts += [f"kl {row['kl']:.2e}", f"clip {row['clip_frac']:.2f}", f"|g| {row['grad_norm']:.3g}"]
    if "accepted" in row:
        parts.append(f"accepted {int(row['accepted'])}")
    parts.append(f"t {row['time_sample_s'] + row['time_reward_s'] + row['time_update_s']:.1f}s")
    if row.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)
