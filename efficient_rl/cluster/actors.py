"""The actor kinds of the Ray backend: rollout worker, learner rank, distillation teacher. Plain
classes: `ray.remote` wraps them at creation.

Inside an actor it is the same code as embedded: a VLLMEngine, or a learner from LEARNERS
(a DeepSpeed rank sets up torch.distributed itself from the environment set here).
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

from efficient_rl.cluster.teacher import teacher_client
from efficient_rl.config.plugins import import_plugins


class RolloutWorker:
    def __init__(self, recipe, model_dir: Path, verify_prompt: list[int] | None, device: str):
        from efficient_rl.data.prompts import load_tokenizer
        from efficient_rl.rollout.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(
            model_dir,
            load_tokenizer(model_dir),
            recipe.longest_sequence(),
            recipe.seed,
            verify_prompt=verify_prompt,
            dtype=recipe.model.dtype,
            options=recipe.rollout.vllm,
            device=device,
            owns_process=True,
        )
        self.incoming = []  # buckets of the weight update in progress

    def generate(self, prompts, samples, group_ids, settings, seed):
        return self.engine.generate(prompts, samples, group_ids, settings, seed=seed)

    def receive_bucket(self, bucket) -> None:
        self.incoming.append(bucket)

    def apply_weights(self) -> dict[str, float]:
        """Load the buckets received since the last call, as one update."""
        named = [pair for bucket in self.incoming for pair in bucket.unpack()]
        self.incoming = []
        return self.engine.load_weights(named)

    # Weight sync by collective broadcast (efficient_rl/cluster/broadcast.py: gloo or NCCL)
    def join_weight_broadcast(self, kind: str, host: str, port: int, rank: int, world_size: int, plan: list) -> None:
        from efficient_rl.cluster.broadcast import BucketReceiver, join_group

        self.receiver = BucketReceiver(join_group(kind, host, port, rank, world_size), plan)

    def receive_broadcast(self) -> dict[str, float]:
        """Receive a sync bucket by bucket while the engine loads it: one bucket held at a time."""
        metrics = self.engine.load_weights(self.receiver.weights())
        self.receiver.check_complete()
        return {**metrics, "sync/receive_peak_bytes": float(self.receiver.held.peak)}

    def pid(self) -> int:
        return os.getpid()


class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self.communicator = None  # rank 0's end of a collective weight transport, once joined

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (asked of rank 0)."""
        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    def setup(
        self, imports: list[str], pickled_plan: bytes, model_dir: Path, base_model_dir: Path, master: tuple[str, int]
    ) -> None:
        """Runs on every rank at once: torch.distributed joins them here. A Ray-hosted teacher
        reaches the learner as its client, so the learner never deals with Ray itself."""
        import_plugins(imports)  # the recipe's own methods register themselves in this process too
        plan = pickle.loads(pickled_plan)
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
        )
        self.learner = plan["learner.backend"](plan, model_dir, base_model_dir, teacher=teacher_client(plan.recipe))

    def update(self, batch):
        return self.learner.update(batch)

    def token_statistics(self, batch, names):
        return self.learner.token_statistics(batch, names)

    def weight_buckets(self, bucket_bytes: int) -> list:
        """Object-store references to the weight buckets (rank 0; other ranks help gather)."""
        import ray

        return [(ray.put(bucket.on_host()), bucket.nbytes) for bucket in self.learner.weight_buckets(bucket_bytes)]

    # Weight sync by collective broadcast (efficient_rl/cluster/broadcast.py: gloo or NCCL)
    def weight_plan(self, bucket_bytes: int) -> list:
        return self.learner.weight_plan(bucket_bytes)

    def join_weight_broadcast(self, kind: str, host: str, port: int, world_size: int) -> None:
        from efficient_rl.cluster.broadcast import join_group

        if self.rank == 0:
            self.communicator = join_group(kind, host, port, rank=0, world_size=world_size)

    def broadcast_weights(self, bucket_bytes: int) -> None:
        from efficient_rl.cluster.broadcast import send_buckets

        # Every rank gathers (ZeRO-3); only rank 0's weight_buckets yields buckets, and sends them.
        send_buckets(self.communicator, self.learner.weight_buckets(bucket_bytes))

    def save(self, directory: str) -> None:
        self.learner.save(Path(directory))

    def load_state(self, directory: str) -> None:
        self.learner.load_state(Path(directory))

    def pid(self) -> int:
        return os.getpid()


class TeacherWorker:
    """The on-policy distillation teacher, asked by every learner rank through cluster/teacher.py."""

    def __init__(self, recipe, device: str):
        from efficient_rl.learner.teacher import embedded_teacher
        from efficient_rl.models.modeling import torch_device

        self.teacher = embedded_teacher(recipe, torch_device(device))

    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def logprobs(self, rows, selected):
        return self.teacher.logprobs(rows, selected)
