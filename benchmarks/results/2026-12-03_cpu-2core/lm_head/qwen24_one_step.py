"""Bytes kept for backward by one training forward of the Qwen2.5-0.5B-shaped LoRA model (24 layers,
gradient checkpointing, 2 x 512 tokens): unpatched PEFT vs tunefast.patch (LoRA layers + fused head), the
harness's own counter (tunefast.profiling.saved_activation_bytes). One step each: a full harness case takes
~12 steps of ~70 s CPU on this box."""
import copy, json, sys, time
import torch
sys.path.insert(0, ".")  # run from the repository root
torch.set_num_threads(1)
import peft, tunefast
from benchmarks import bench_lm_head as B
from tunefast.profiling import saved_activation_bytes
torch.manual_seed(0)
template = B._model("qwen", B.QWEN, 24, torch.device("cpu"), torch.float32)
ids = torch.randint(0, B.QWEN["vocab"], (B.QWEN["batch"], B.QWEN["seq"]))
out = {}
for which in ("peft_lora", "tunefast"):
    model = copy.deepcopy(template)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=B.RANK, lora_alpha=B.ALPHA, lora_dropout=0.0,
                                target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    if which == "tunefast":
        print(tunefast.patch(model).kernels(), flush=True)
    t = time.process_time()
    kept = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss.backward(), model)  # as the harness: fwd + bwd
    out[which] = dict(act_bytes=kept, act_mib=round(kept / 2**20, 2), step_cpu_s=round(time.process_time() - t, 1))
    print(which, out[which], flush=True)
    del model
out["ratio"] = out["tunefast"]["act_bytes"] / out["peft_lora"]["act_bytes"]
print(json.dumps(out))
