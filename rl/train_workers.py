"""The sharded GRPO policy update (RL.md §7): `grpo.train_workers: N` (> 1) Ray actors forming one
torch.distributed group (gloo on the CPU, NCCL when `grpo.train_num_gpus >= 1`), each holding an
FSDP2 shard of the policy (and of the frozen reference) through `lance_platform.parallel.apply_fsdp`,
the wrapper the training stages use (HSDP with `grpo.train_shard_size`).

Every worker builds the policy as the driver does (`rl.policy.build_run_policy`, same config and
seed, so the KL reference is the same starting policy everywhere), loads the driver's current
weights (`setup`; with LoRA only the adapters), then shards. Per iteration the driver puts the
rollout's trajectories in the object store once; every rank runs `rl.update.run_update` on its
share of every micro-batch's samples (their latents, old log-probs and advantages), with the loss
normalised by the micro-batch's global kept-sample count, so the gradients, the AdamW step and the
updated weights are the single-process update's (up to float summation order).

After the update the driver asks for the weights (`weights`: every rank takes part in gathering the
full tensors, rank 0 returns them; with LoRA only the adapter tensors), loads them into its own
unsharded copy (checkpoints, held-out evaluation) and pushes the same object to the rollout actors.
`optimizer_state` gathers the name-keyed optimizer state for a checkpoint; `load_optimizer_state`
shards a restored one onto the workers. Sharded workers are not offloaded in the colocated layout
(FSDP2 already keeps only a shard resident between forwards).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from lance_model.generation import DenoisingSession, LanceGenerator
from lance_platform import checkpoint as ckpt
from lance_platform import lora, parallel

from .config import RLConfig
from .policy import build_run_policy, load_pushed, sampler_options
from .rollout import Trajectories
from .update import UpdateContext, UpdateStats, run_update

log = logging.getLogger(__name__)


class TrainWorker:
    """One rank of the sharded update (a Ray actor)."""

    def __init__(self, cfg: RLConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        use_gpu = cfg.grpo.train_num_gpus > 0
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"grpo.train_num_gpus={cfg.grpo.train_num_gpus} but training worker {rank} sees no GPU")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.backend = "nccl" if use_gpu else "gloo"
        self.policy, self.reference = build_run_policy(cfg, self.device)
        self.builder = LanceGenerator(self.policy).builder
        self.options = sampler_options(cfg)
        self.lora = cfg.lora.enabled
        self.optimizer: torch.optim.Optimizer | None = None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), parallel.free_port()

    def setup(self, address: str, port: int, state: dict[str, torch.Tensor]) -> int:
        """Join the group, load the driver's weights, shard the models, build the optimizer."""
        parallel.init_group(address, port, self.rank, self.world_size, self.backend)
        load_pushed(self.policy, state, self.lora, "the driver's weights")
        shard_size = self.cfg.grpo.train_shard_size
        parallel.apply_fsdp(self.policy, self.device, bf16=False, shard_size=shard_size)
        if self.reference is not None:
            parallel.apply_fsdp(self.reference, self.device, bf16=False, shard_size=shard_size)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        return self.rank

    def layout(self) -> dict[str, Any]:
        """How this rank holds the policy: its device mesh's dimension names and shape (`()`, `(2,)` for
        FSDP over 2 workers; `("replicate", "shard")`, `(2, 1)` for HSDP of 2 replicas of 1 worker) and
        the distinct placements of its trainable parameters."""
        from torch.distributed.tensor import DTensor

        sharded = [p for p in self.params if isinstance(p, DTensor)]
        if not sharded:
            return {"mesh_dims": (), "mesh_shape": (), "placements": []}
        mesh = sharded[0].device_mesh
        return {"mesh_dims": tuple(mesh.mesh_dim_names or ()), "mesh_shape": tuple(mesh.shape),
                "placements": sorted({str(p.placements) for p in sharded})}

    def _session(self, model, samples) -> DenoisingSession:
        return DenoisingSession(model, self.builder, samples, self.options, use_cache=False)

    def update(self, step: int, trajs: list[Trajectories], advantages: torch.Tensor, keep: torch.Tensor
               ) -> UpdateStats:
        reference = self.policy if self.lora and self.cfg.grpo.beta > 0 else \
            (self.reference if self.cfg.grpo.beta > 0 else None)
        ctx = UpdateContext(self.policy, reference, self.optimizer, self.params, self._session, self.device,
                            lora=self.lora, sharded=True)
        return run_update(ctx, self.cfg, step, trajs, advantages, keep, shard=(self.rank, self.world_size))

    def weights(self) -> dict[str, torch.Tensor] | None:
        """Full tensors of the trained weights (a collective); rank 0 returns them, the others None."""
        state = lora.adapter_state(self.policy) if self.lora else self.policy.state_dict()
        full = {k: parallel.full_tensor(v).detach().cpu() for k, v in state.items()}
        return full if self.rank == 0 else None

    def optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer state keyed by parameter name, full tensors (a collective; rank 0 returns it)."""
        named = ckpt.optimizer_state_by_name(self.policy, self.optimizer)
        named["state"] = {n: {k: parallel.full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in e.items()}
                          for n, e in named["state"].items()}
        return named if self.rank == 0 else None

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Full (or adapter) tensors into the local shards."""
        stored = set(self.policy.state_dict())  # parameters and persistent buffers (not e.g. rotary tables)
        params = {n: t for n, t in [*self.policy.named_parameters(), *self.policy.named_buffers()] if n in stored}
        key = (lambda n: n.replace(f".{lora.ADAPTER}.", ".")) if self.lora else ckpt.plain_name
        names = {key(n): n for n in params}
        missing = sorted(set(names) - set(state)) if not self.lora else []
        if missing:
            raise ckpt.CheckpointError(f"pushed weights miss {len(missing)} tensor(s): {', '.join(missing[:5])}")
        items = [(names[k], params[names[k]]) for k in state if k in names]
        parallel.fill_local(items, lambda n, shape, a, b: state[key(n)][a:b] if shape else state[key(n)])

    def load_optimizer_state(self, named: dict[str, Any]) -> None:
        """A full name-keyed optimizer state (as `optimizer_state` returns) onto the local shards."""
        from torch.distributed.tensor import DTensor

        for name, p in self.policy.named_parameters():
            entry = named["state"].get(ckpt.plain_name(name))
            if entry is None or not p.requires_grad:
                continue
            out = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and tuple(value.shape) == tuple(p.shape) and isinstance(p, DTensor):
                    local, a, b = parallel.local_part(p)
                    value = DTensor.from_local(value[a:b].to(local.device, local.dtype).contiguous(), p.device_mesh,
                                               p.placements, shape=p.shape, stride=p.stride())
                out[key] = value
            self.optimizer.state[p] = out


class TrainGroup:
    """`grpo.train_workers` `TrainWorker`s in one process group, driven from the GRPO trainer."""

    def __init__(self, cfg: RLConfig, state: dict[str, torch.Tensor]) -> None:
        import ray

        g = cfg.grpo
        n = g.train_workers
        if n < 2:
            raise ValueError(f"grpo.train_workers={n}: a sharded update needs at least 2 workers")
        remote = ray.remote(TrainWorker).options(num_cpus=g.train_num_cpus, num_gpus=g.train_num_gpus, max_restarts=0)
        self.workers = [remote.remote(cfg, rank, n) for rank in range(n)]
        address, port = ray.get(self.workers[0].address.remote())
        state_ref = ray.put(state)
        ray.get([w.setup.remote(address, port, state_ref) for w in self.workers])
        log.info("sharded GRPO update on %d workers (%s)", n, "NCCL" if g.train_num_gpus > 0 else "gloo")

    def _all(self, method: str, *args):
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def update(self, step: int, trajs: list[Trajectories], advantages: torch.Tensor, keep: torch.Tensor
               ) -> UpdateStats:
        import ray

        return self._all("update", step, ray.put(trajs), advantages, keep)[0]

    def weights_ref(self):
        """Object ref of the gathered weights (rank 0's result; the others take part and return None)."""
        refs = [w.weights.remote() for w in self.workers]
        import ray

        ray.get(refs[1:])
        return refs[0]

    def optimizer_state(self) -> dict[str, Any]:
        return self._all("optimizer_state")[0]

    def load(self, state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
        import ray

        ref = ray.put(state)
        self._all("load_weights", ref)
        if optimizer_state is not None:
            self._all("load_optimizer_state", ray.put(optimizer_state))

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
