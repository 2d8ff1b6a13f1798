"""Train a tunefast model (patched PEFT LoRA or prefix tuning, sparse deltas, a side network) under DDP or
FSDP2 — on CPU (gloo) or GPUs (nccl).

    torchrun --nproc_per_node 2 examples/distributed_lora.py --strategy ddp
    torchrun --nproc_per_node 2 examples/distributed_lora.py --strategy fsdp2 [--bf16]

Each rank takes its slice of the same global batch; every step prints the global loss (the mean of
the ranks' losses). Patch before wrapping: ``tunefast.patch(model)`` first, then DDP / fully_shard
(patching after works too — the patched modules are found inside the wrapper — but the order above is
the one documented and tested). The tests (tests/test_distributed.py) run ``train`` below in two
processes and compare with one process on the whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def tiny_model(method: str = "lora", seed: int = 0):
    """A tiny Llama fine-tuned with ``method``: "lora" (PEFT LoRA on all linear layers, random B so LoRA
    matters), "prefix" (PEFT prefix tuning), "sparse" (tunefast sparse deltas, 5%) or "side" (a
    tunefast ladder side network)."""
    import peft
    import transformers as tf

    import tunefast

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = tf.LlamaForCausalLM(cfg)
    if method == "lora":
        return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                         init_lora_weights=False, task_type="CAUSAL_LM"))
    if method == "prefix":
        return peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    if method == "sparse":
        return tunefast.sparse.apply(base, tunefast.sparse.SparseConfig(density=0.05, target_modules="all-linear", seed=0))
    if method == "side":
        return tunefast.side.apply(base, tunefast.side.SideConfig(reduction_factor=8))
    raise ValueError(f"method must be lora, prefix, sparse or side, got {method!r}")


def global_batches(steps: int, micro: int, global_bsz: int = 4, seq: int = 16, seed: int = 1):
    """steps x micro batches of (global_bsz, seq) token ids: arithmetic progressions mod 128."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps * micro):
        start = torch.randint(0, 128, (global_bsz, 1), generator=g)
        step = torch.randint(1, 4, (global_bsz, 1), generator=g)
        out.append((start + step * torch.arange(seq)) % 128)
    return out


def wrap(model, strategy: str, bf16: bool):
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if strategy == "single":
        return model
    raise ValueError(f"strategy must be ddp, fsdp2 or single, got {strategy!r}")


def train(rank: int, world: int, strategy: str, steps: int = 3, micro: int = 2, bf16: bool = False,
          backend: str = "reference", patch: str = "before", lr: float = 1e-2, method: str = "lora"):
    """Run ``steps`` optimizer steps of ``micro`` accumulated micro-batches; returns (losses, grads of
    the first step as full tensors by parameter name, final trainable params). ``patch``: "before"
    or "after" wrapping, or "no"."""
    import tunefast

    model = tiny_model(method)
    if patch == "before" and method in ("lora", "prefix"):  # sparse and side models are tunefast's own
        tunefast.patch(model, backend=backend)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    wrapped = wrap(model, strategy, bf16)
    if patch == "after":
        report = tunefast.patch(wrapped, backend=backend)
        assert sum(e.kernel.startswith("lora_linear") for e in report.patched) == 14, report  # + the fused LM head
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = global_batches(steps, micro)
    losses, first_grads = [], None
    for s in range(steps):
        total = 0.0
        for m in range(micro):
            ids = batches[s * micro + m]
            local = ids.chunk(world)[rank]
            sync = m == micro - 1
            ctx = wrapped.no_sync() if (strategy == "ddp" and not sync) else _null()
            if strategy == "fsdp2":
                wrapped.set_requires_gradient_sync(sync)
            with ctx:
                loss = wrapped(input_ids=local, labels=local).loss / micro
                loss.backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
        if first_grads is None:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters() if n in names}
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {n: _full(p.detach()) for n, p in model.named_parameters() if n in names}
    return losses, first_grads, params


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 params, fp32 reduce")
    p.add_argument("--backend", default="auto")
    p.add_argument("--method", choices=["lora", "prefix", "sparse", "side"], default="lora")
    args = p.parse_args()
    if "RANK" not in os.environ:  # started as a plain script (or `accelerate launch --cpu`): one process
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        torch.set_default_device("cuda")
    losses, _, _ = train(rank, world, args.strategy, steps=args.steps, bf16=args.bf16, backend=args.backend,
                         method=args.method)
    if rank == 0:
        for i, loss in enumerate(losses):
            print(f"step {i + 1}: loss {loss:.5f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
