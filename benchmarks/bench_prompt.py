"""Visual prompt tuning (VPT-deep): tunefast's prefix K/V path against the straightforward implementation.

Case vit_step: a ViT-B-shaped classifier (hidden 768, 12 heads, MLP 3072, 224x224 images with 16x16
patches: 197 tokens), 4 layers, batch 8, 10 prompts per layer, fp32; one training step (forward,
cross-entropy, backward, AdamW on the prompts and the head):
  straightforward   VPT-deep as its paper writes it: each layer's prompts concatenated after CLS (one copy
                    per image), the layer run on 207 tokens, its prompt outputs dropped (hooks on the
                    model's own layers; sdpa attention). Everything of the layer is kept for 207 tokens.
  tunefast          prompt.apply(deep=True): the prompts reach the sequence only as a prefix K/V computed
                    once per layer from the layer's own layernorm and k/v projections (10 rows, not
                    8 x 10), attended through prefix_attention; nothing runs for prompt positions.
act_bytes is device-independent; CPU times run the op's plain-PyTorch reference (the Triton kernel only
on a GPU), so CPU times say nothing about the kernel. The GPU sizes are the same model at batch 64.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks import harness

CPU_SIZES = dict(hidden=768, heads=12, intermediate=3072, layers=4, image=224, patch=16, batch=8, prompts=10,
                 labels=100, dtype=torch.float32)
CUDA_SIZES = dict(CPU_SIZES, batch=64, dtype=torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max ||tunefast - straightforward|| / ||straightforward||


def _vit(s, device):
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       intermediate_size=s["intermediate"], image_size=s["image"], patch_size=s["patch"],
                       num_labels=s["labels"])
    cfg._attn_implementation = "sdpa"
    return tf.ViTForImageClassification(cfg).to(device=device, dtype=s["dtype"])


def step_flops(s) -> float:
    """Matmul FLOPs of tunefast's step with a frozen backbone: per linear 4 t n k (forward and dx, no
    weight gradients) over q, k, v, o, fc1, fc2 for B x T tokens; attention over P + T keys (forward 4,
    backward 10 FLOPs per query-key pair and head dim); the prompts' K/V (2 linears on P rows) per layer."""
    t_len = (s["image"] // s["patch"]) ** 2 + 1
    tokens, h, p = s["batch"] * t_len, s["hidden"], s["prompts"]
    linear = 4 * tokens * h * (4 * h + 2 * s["intermediate"])
    attn = 14 * s["batch"] * t_len * (t_len + p) * h
    return s["layers"] * (linear + attn + 2 * 4 * p * h * h)


def vit_case(s, device) -> harness.Case:
    from tunefast.methods import prompt

    def inputs():
        template = _vit(s, device)
        x = torch.randn(s["batch"], 3, s["image"], s["image"], device=device, dtype=s["dtype"])
        y = torch.randint(0, s["labels"], (s["batch"],), device=device)
        return template, x, y

    def step_for(model, trainable, x, y, info):
        opt = torch.optim.AdamW(trainable, lr=1e-3)

        def run():
            F.cross_entropy(model(pixel_values=x).logits.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def check():
            model.eval()
            logits = model(pixel_values=x).logits
            F.cross_entropy(logits.float(), y).backward()
            out = {"logits": logits.detach(), "grads": torch.cat([p.grad.flatten().float() for p in trainable])}
            model.zero_grad(set_to_none=True)
            for p in trainable:
                p.grad = None
            model.train()
            return out

        return harness.Step.for_module(model, run, check, info, extra_state=trainable)

    def prompts_for():
        """Seeded prompts, identical for both variants (VPT's uniform init)."""
        g = torch.Generator().manual_seed(1)
        bound = (6.0 / (3 * s["patch"] ** 2 + s["hidden"])) ** 0.5
        return [((torch.rand(s["prompts"], s["hidden"], generator=g) * 2 - 1) * bound).to(device, s["dtype"])
                for _ in range(s["layers"])]

    def tunefast_setup(inp):
        template, x, y = inp
        model = prompt.apply(copy.deepcopy(template), prompt.PromptConfig(num_tokens=s["prompts"]))
        with torch.no_grad():
            for p, v in zip(prompt.prompt_parameters(model).values(), prompts_for()):
                p.copy_(v)
        report = prompt.report(model)
        info = {"kernels": ", ".join(f"{k} x{n}" for k, n in report.kernels().items())}
        return step_for(model, prompt.trainable_parameters(model), x, y, info)

    def straightforward_setup(inp):
        template, x, y = inp
        model = copy.deepcopy(template)
        for p in model.parameters():
            p.requires_grad_(False)
        leaves = [v.requires_grad_() for v in prompts_for()]
        n = s["prompts"]
        for layer, p in zip(model.vit.layers, leaves):
            def pre(mod, args, kwargs, p=p):
                h = args[0]
                return (torch.cat((h[:, :1], p.expand(h.shape[0], -1, -1), h[:, 1:]), 1), *args[1:]), kwargs

            layer.register_forward_pre_hook(pre, with_kwargs=True)
            layer.register_forward_hook(lambda mod, args, out: torch.cat((out[:, :1], out[:, 1 + n:]), 1))
        head = list(model.classifier.parameters())
        for q in head:
            q.requires_grad_(True)
        return step_for(model, [*leaves, *head], x, y, {"tokens_per_layer": (s["image"] // s["patch"]) ** 2 + 1 + n})

    return harness.Case(
        suite="prompt", name="vit_step", params=dict(s),
        variants={"straightforward": straightforward_setup, "tunefast": tunefast_setup},
        inputs=inputs, flops=step_flops(s), dtype=s["dtype"], tolerance=TOLERANCE[s["dtype"]],
    )


def cases(device: torch.device) -> list[harness.Case]:
    return [vit_case(CUDA_SIZES if device.type == "cuda" else CPU_SIZES, device)]


@harness.parametrize(cases(harness.bench_device()))
def test_prompt(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast":
        # no prompt copies per image, no queries / MLP / residual kept for prompt positions
        assert row["act_ratio"] < 1.0, row
